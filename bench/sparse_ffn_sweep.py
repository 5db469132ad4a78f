#!/usr/bin/env python
"""Tile sweep of the Triton routed-FFN kernels on the GPU (picks the launchers' defaults).

Decode (T in {1, 4, 16}): ``rows`` (neurons per program), ``block_k = block_n`` and ``num_warps``
of :func:`prunepath_ops.ffn.triton_ffn.sparse_ffn_decode_triton`, timed as CUDA-graph replays
(the way a decode step runs). Prefill (T = 4096): the down projection (``mm`` or ``blocksparse``)
and the up kernel's ``block_m``, ``block_k``, ``num_warps``, ``num_stages``. Llama-3-8B FFN shape
(d=4096, F=14336, S=32, E=448), bf16, every token keeping exactly the given fraction of experts.
Every configuration is checked against ``reference.masked_dense_ffn`` (fp32) before it is timed.

    python3 bench/sparse_ffn_sweep.py --out bench/results            # on the H200, ~3 minutes
    TRITON_INTERPRET=1 python3 bench/sparse_ffn_sweep.py --device cpu --tiny   # smoke test
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import environment, header_lines, make_timer, write_results  # noqa: E402
from sparse_ffn_gpu import H200_COPY_TBPS, Weights, cuda_graphed, fixed_fraction_route, union_experts  # noqa: E402

from prunepath_ops import reference as R  # noqa: E402
from prunepath_ops.ffn.triton_ffn import sparse_ffn_decode_triton, sparse_ffn_prefill_triton  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shape, few configs (CPU smoke test)")
    ap.add_argument("--what", choices=("decode", "prefill", "both"), default="both")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.3])
    ap.add_argument("--out", default=None)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--rep", type=float, default=40.0)
    ap.add_argument("--timer", default="auto")
    args = ap.parse_args(argv)
    args.quick = True
    args.peak_tbps = H200_COPY_TBPS
    return args


def rel_err(out: torch.Tensor, w: Weights, x: torch.Tensor, route) -> float:
    n = min(x.shape[0], 64)
    ids, gates, na = (t[:n] for t in route)
    ref = R.masked_dense_ffn(x[:n].float(), w.wg32, w.wd32, ids, gates, na, w.S, w_up=w.wu32)
    return float((out[:n].float() - ref).norm() / ref.norm().clamp_min(1e-30))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_float32_matmul_precision("highest")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    timer_desc, timer = make_timer(args)
    env = environment(args, timer_desc)
    d, F, S = (64, 256, 32) if args.tiny else (4096, 14336, 32)
    w = Weights(d, F, S, dtype, device, seed=0)
    p = w.packed
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    rows = []

    def record(kind, T, frac, cfg, fn, x, route, graphed):
        row = {"kind": kind, "T": T, "frac": frac, **cfg}
        try:
            err = rel_err(fn(x), w, x, route)
            row.update({"rel_err": err, "ok": err < tol})
            if row["ok"]:
                timed = cuda_graphed(fn, x) if graphed and x.is_cuda else (lambda: fn(x))
                row["us"] = timer(timed)[0] * 1e3
                n_union = union_experts(route, w.E)
                row["TBps"] = n_union * w.expert_bytes / (row["us"] * 1e-6) / 1e12
        except Exception as exc:  # e.g. out of shared memory for a large tile
            row["error"] = repr(exc)[:200]
        rows.append(row)
        print(json.dumps(row), flush=True)

    start = time.perf_counter()
    with torch.inference_mode():
        if args.what in ("decode", "both"):
            for T, frac in itertools.product((1, 4, 16), args.fractions):
                x = torch.randn(T, d, device=device).to(dtype)
                route = fixed_fraction_route(T, w.E, frac, device, 0)
                # Around the per-expert schedule's defaults (rows 32; 256-wide tiles and 3 stages at
                # T = 1, 128 above), 4 warps (8 never won). Two "balanced" schedules (an equal share of
                # the selected neurons per SM) measured 1.1-2.6x slower: bench/results/sparse_ffn_sweep_decode_balanced_*.
                if args.tiny:
                    exp = [(16, 32, 2)]
                elif T == 1:
                    exp = [(32, 256, 3), (32, 256, 4), (32, 128, 4), (32, 512, 2)]
                else:
                    exp = [(32, 128, 3), (32, 128, 4)]
                configs = [{"rows": r, "block_k": b, "block_n": b, "num_stages": ns, "num_warps": 4}
                           for r, b, ns in exp]  # fmt: skip
                for cfg in configs:

                    def fn(x, cfg=cfg, route=route):
                        return sparse_ffn_decode_triton(
                            x, *route, p.w_in, p.b_in, p.w_down, p.b_out, p.gated, p.act, **cfg
                        )

                    record("decode", T, frac, cfg, fn, x, route, graphed=True)
        if args.what in ("prefill", "both"):
            T = 24 if args.tiny else 4096
            for frac in sorted({*args.fractions, 1.0}):
                x = torch.randn(T, d, device=device).to(dtype)
                route = fixed_fraction_route(T, w.E, frac, device, 0)
                base = {"down": "mm", "block_m": 16 if args.tiny else 128}
                configs = [{**base, "block_k": 16 if args.tiny else 64, "num_warps": 4, "num_stages": 2 if args.tiny
                            else 4, "one_dot": False}]  # fmt: skip
                grid = ((16,), (4,), (2,)) if args.tiny else ((64, 128), (4, 8), (3, 4, 5))
                for bk, nw, ns in itertools.product(*grid):
                    configs.append({**base, "block_k": bk, "num_warps": nw, "num_stages": ns, "one_dot": True})
                for cfg in configs:

                    def fn(x, cfg=cfg, route=route):
                        return sparse_ffn_prefill_triton(
                            x, *route, p.w_in, p.b_in, p.w_down, p.b_out, p.gated, p.act, **cfg
                        )

                    record("prefill", T, frac, cfg, fn, x, route, graphed=False)
    env["elapsed_s"] = time.perf_counter() - start
    lines = [*header_lines(f"sparse_ffn tile sweep on {env.get('gpu') or env['cpu']}", env, args),
             f"- decode timed as CUDA-graph replays; TB/s over the union of selected experts' weights "
             f"(peak {H200_COPY_TBPS} TB/s)", "",
             "| kind | T | active | config | us | TB/s | rel err |", "|---|---:|---:|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        keys = (
            "rows",
            "block_n",
            "use_dot",
            "slot_grid_one_token",
            "block_d",
            "down",
            "one_dot",
            "block_m",
            "block_k",
            "num_warps",
            "num_stages",
        )
        cfg = ", ".join(f"{k}={r[k]}" for k in keys if k in r and r[k] is not None)
        us = f"{r['us']:.1f}" if "us" in r else ("ERROR" if "error" in r else "FAIL")
        tb = f"{r['TBps']:.2f}" if "TBps" in r else "-"
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
        lines.append(f"| {r['kind']} | {r['T']} | {r['frac']:.0%} | {cfg} | {us} | {tb} | {err} |")
    report = "\n".join(lines) + "\n"
    print(report)
    name = "sparse_ffn_sweep_" + args.device + ("_tiny" if args.tiny else "")
    write_results(args.out, name, report, {"environment": env, "rows": rows})
    return 0 if all(r.get("ok", False) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
