#!/usr/bin/env python
"""Batch-1 decode FFN: the CUDA kernel of ``prunepath::expert_ffn`` against the Triton decode kernels.

Llama-3-8B FFN shape (d 4096, F 14336, S 32, E 448), bf16, one token keeping exactly the given
fraction of the experts. Every configuration is timed in the steady state of a decode step (20 calls
in one CUDA graph cycling over 4 copies of the weights, time per call: no weights left in L2, no
graph launch), all in one process, so the columns compare. The CUDA kernel's grid knobs are the
environment variables its glue reads at every call: ``PRUNEPATH_EXPERT_FFN_BLOCKS_PER_SM`` (blocks
per SM of the partial kernel, i.e. how many pieces a token's selected neurons are cut into) and
``PRUNEPATH_EXPERT_FFN_CAP`` (1: unused shared memory keeps more blocks off an SM, so they spread
evenly). Each configuration is checked against ``reference.masked_dense_ffn`` (fp32) first.

    python3 bench/diag/expert_ffn_cuda_sweep.py --out bench/results     # on the H200, ~1 minute
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from common import capture, environment, header_lines, make_timer, write_results  # noqa: E402
from sparse_ffn_gpu import H200_COPY_TBPS, Weights, fixed_fraction_route  # noqa: E402

import prunepath_ops  # noqa: E402
from prunepath_ops import reference as R  # noqa: E402

CONFIGS = [("triton", None, None)] + [("cuda", b, c) for b, c in ((1, 1), (2, 1), (3, 1), (4, 1), (2, 0), (4, 0))]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.3, 0.35, 0.5, 1.0])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--warmup", type=float, default=10)
    ap.add_argument("--rep", type=float, default=40)
    ap.add_argument("--timer", default="auto")
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="expert_ffn_cuda_sweep")
    args = ap.parse_args(argv)
    args.device, args.peak_tbps = "cuda", H200_COPY_TBPS
    return args


def set_knobs(blocks, cap) -> None:
    for key, v in (("PRUNEPATH_EXPERT_FFN_BLOCKS_PER_SM", blocks), ("PRUNEPATH_EXPERT_FFN_CAP", cap)):
        if v is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = str(v)


def main(argv=None) -> None:
    args = parse_args(argv)
    timer_desc, timer = make_timer(args)
    env = environment(args, timer_desc)
    w = Weights(4096, 14336, 32, torch.bfloat16, "cuda", 0)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    packs = [w.packed] + [
        prunepath_ops.PackedExperts(
            **{**vars(w.packed), "w_in": w.packed.w_in.clone(), "w_down": w.packed.w_down.clone()}
        )
        for _ in range(args.copies - 1)
    ]
    rows = []
    for frac in args.fractions:
        route = fixed_fraction_route(1, w.E, frac, "cuda", 0)
        n = int(route.num_active[0])
        nbytes = n * w.expert_bytes
        ref = R.masked_dense_ffn(x.float(), w.wg32, w.wd32, *route, w.S, w_up=w.wu32)
        row = {"frac": frac, "n_active": n, "bytes": nbytes, "floor_us": nbytes / (H200_COPY_TBPS * 1e12) * 1e6}
        for backend, blocks, cap in CONFIGS:
            set_knobs(blocks, cap)
            key = backend if blocks is None else f"cuda_b{blocks}_cap{cap}"
            out = prunepath_ops.sparse_ffn(x, route, w.packed, backend=backend).float()
            rel = float((out - ref).norm() / ref.norm())
            same = torch.equal(out, prunepath_ops.sparse_ffn(x, route, w.packed, backend=backend).float())
            if not (rel < 2e-2 and same):
                row[key] = None
                row[key + "_error"] = f"rel {rel:.2e}, repeat equal {same}"
                continue

            def calls(backend=backend, route=route):
                for i in range(args.calls):
                    prunepath_ops.sparse_ffn(x, route, packs[i % args.copies], backend=backend)

            row[key] = timer(capture(calls)[0])[0] * 1e3 / args.calls
            row[key + "_rel_err"] = rel
        set_knobs(None, None)
        rows.append(row)
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items() if not k.endswith("rel_err")})

    keys = [("triton" if b is None else f"cuda_b{b}_cap{c}") for _, b, c in CONFIGS]
    head = "| active | experts | floor us | " + " | ".join(keys) + " |"
    lines = [
        *header_lines("Batch-1 decode FFN: CUDA expert_ffn kernel vs Triton (H200 steady state)", env, args),
        f"- Llama-3-8B FFN (d 4096, F 14336, S 32, E 448), bf16, T = 1; us per call, {args.calls} calls per graph "
        f"over {args.copies} weight copies; floor = selected bytes / {H200_COPY_TBPS} TB/s; "
        "cuda_bB_capC: B blocks per SM, C = 1 caps the blocks per SM at B",
        "",
        head,
        "|" + "---:|" * (3 + len(keys)),
    ]
    for r in rows:
        cells = [f"{r[k]:.2f}" if r.get(k) is not None else "FAIL" for k in keys]
        lines.append(f"| {r['frac']:.0%} | {r['n_active']} | {r['floor_us']:.1f} | " + " | ".join(cells) + " |")
    report = "\n".join(lines) + "\n"
    print(report)
    write_results(args.out, args.name, report, {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
