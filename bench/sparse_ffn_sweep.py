#!/usr/bin/env python
"""Tile sweep of the Triton routed-FFN kernels on the GPU (picks the launchers' defaults).

Decode (T in {1, 4, 16}): ``rows`` (neurons per program), ``block_k = block_n``, ``num_stages``
and ``pdl`` (programmatic dependent launch) of
:func:`prunepath_ops.ffn.triton_ffn.sparse_ffn_decode_triton`, timed twice: one call captured in
a CUDA graph and replayed ("graph"), and 20 calls in one graph cycling over 4 copies of the
weights, time per call ("steady": no weights left in L2, no graph launch, the gaps between the
kernels as in a decode step). Prefill (T = 4096): the up kernel's ``block_m``, ``block_k``,
``num_warps``, ``num_stages`` (down projection ``mm``). Llama-3-8B FFN shape
(d=4096, F=14336, S=32, E=448), bf16, every token keeping exactly the given fraction of experts.
Every configuration is checked against ``reference.masked_dense_ffn`` (fp32) before it is timed.

    python3 bench/sparse_ffn_sweep.py --out bench/results            # on the H200, ~3 minutes
    TRITON_INTERPRET=1 python3 bench/sparse_ffn_sweep.py --device cpu --tiny   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import capture, environment, header_lines, make_timer, write_results  # noqa: E402
from sparse_ffn_gpu import H200_COPY_TBPS, Weights, cuda_graphed, fixed_fraction_route, union_experts  # noqa: E402

from prunepath_ops import reference as R  # noqa: E402
from prunepath_ops.ffn.triton_ffn import sparse_ffn_decode_triton, sparse_ffn_prefill_triton  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shape, few configs (CPU smoke test)")
    ap.add_argument("--what", choices=("decode", "prefill", "both"), default="both")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.3])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="decode T values")
    ap.add_argument("--defaults-only", action="store_true", help="decode: only the launcher's defaults, PDL on and off")
    ap.add_argument("--out", default=None)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--rep", type=float, default=40.0)
    ap.add_argument("--timer", default="auto")
    ap.add_argument("--steady-calls", type=int, default=20, help="decode calls per steady-state graph (0: skip)")
    ap.add_argument("--steady-copies", type=int, default=4, help="weight copies the steady calls cycle over")
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

    # Weight copies for the steady-state decode timing (4 x 352 MB against a 50 MB L2).
    steady = args.steady_calls > 0 and device.type == "cuda" and args.what in ("decode", "both")
    packs = [p] + ([dataclasses.replace(p, w_in=p.w_in.clone(), w_down=p.w_down.clone())
                    for _ in range(args.steady_copies - 1)] if steady else [])  # fmt: skip

    def record(kind, T, frac, cfg, fn, x, route, graphed):
        row = {"kind": kind, "T": T, "frac": frac, **cfg}
        try:
            err = rel_err(fn(x), w, x, route)
            row.update({"rel_err": err, "ok": err < tol})
            if row["ok"]:
                timed = cuda_graphed(fn, x) if graphed and x.is_cuda else (lambda: fn(x))
                row["us"] = timer(timed)[0] * 1e3
                n_bytes = union_experts(route, w.E) * w.expert_bytes
                row["TBps"] = n_bytes / (row["us"] * 1e-6) / 1e12
                if graphed and steady:
                    n = args.steady_calls

                    def calls():
                        for i in range(n):
                            fn(x, pk=packs[i % len(packs)])

                    row["steady_us"] = timer(capture(calls)[0])[0] * 1e3 / n
                    row["steady_TBps"] = n_bytes / (row["steady_us"] * 1e-6) / 1e12
        except Exception as exc:  # e.g. out of shared memory for a large tile
            row["error"] = repr(exc)[:200]
        rows.append(row)
        print(json.dumps(row), flush=True)

    start = time.perf_counter()
    with torch.inference_mode():
        if args.what in ("decode", "both"):
            for T, frac in itertools.product(args.batches, args.fractions):
                x = torch.randn(T, d, device=device).to(dtype)
                route = fixed_fraction_route(T, w.E, frac, device, 0)
                # Around the per-expert schedule's defaults (rows 32; 256-wide tiles and 3 stages at
                # T = 1, 128 above), 4 warps (8 never won). Two "balanced" schedules (an equal share of
                # the selected neurons per SM) measured 1.1-2.6x slower: bench/results/sparse_ffn_sweep_decode_balanced_*.
                # (rows, block_k, block_n, num_stages, pdl, extra). The down loop streams a third of
                # the bytes with its own tile width (block_n): wider tiles keep as many bytes in
                # flight as the gate/up loop does (session 4: one program per SM at 30 %, so the
                # bytes in flight per SM set the bandwidth); rows 16 with 512-wide tiles puts two
                # programs on each SM with as many bytes in flight each. (Prefetching the first down
                # tile during the gate/up loop was measured too, no gain, and removed:
                # bench/results/sparse_ffn_sweep_decode_tiles_cuda.md.)
                if args.tiny:
                    exp = [(16, 32, 32, 2, False, {})]
                elif T == 1:
                    exp = [(32, 256, 256, 3, False, {}), (32, 256, 256, 3, True, {}),
                           (32, 256, 512, 3, True, {}), (32, 256, 512, 3, True, {"num_warps": 8}),
                           (32, 256, 512, 3, True, {"block_d": 32}), (32, 256, 512, 3, True, {"block_d": 64}),
                           (16, 512, 512, 3, True, {}), (16, 512, 1024, 3, True, {}),
                           (16, 256, 512, 4, True, {})]  # fmt: skip
                else:
                    exp = [(32, 128, 128, 3, False, {}), (32, 128, 128, 3, True, {}),
                           (32, 128, 256, 3, True, {}), (32, 128, 128, 4, True, {})]  # fmt: skip
                configs = [{"rows": r, "block_k": bk, "block_n": bn, "num_stages": ns, "num_warps": 4,
                            "pdl": pdl, **extra} for r, bk, bn, ns, pdl, extra in exp]  # fmt: skip
                if args.defaults_only:
                    configs = [{"pdl": False}, {"pdl": True}]
                for cfg in configs:

                    def fn(x, cfg=cfg, route=route, pk=p):
                        return sparse_ffn_decode_triton(
                            x, *route, pk.w_in, pk.b_in, pk.w_down, pk.b_out, pk.gated, pk.act, **cfg
                        )

                    record("decode", T, frac, cfg, fn, x, route, graphed=True)
        if args.what in ("prefill", "both"):
            T = 24 if args.tiny else 4096
            for frac in sorted({*args.fractions, 1.0}):
                x = torch.randn(T, d, device=device).to(dtype)
                route = fixed_fraction_route(T, w.E, frac, device, 0)
                # block_m 256 halves the weight tiles re-read per expert (the x rows gathered per
                # (token, expert) pair are the same whatever block_m): the earlier sweeps stopped at 128.
                grid = [(16, 16, 4, 2)] if args.tiny else [
                    (128, 64, 4, 4), (128, 64, 8, 4), (128, 128, 8, 4),
                    (256, 64, 8, 3), (256, 64, 8, 4), (256, 32, 8, 4), (256, 32, 8, 5), (256, 64, 4, 3),
                ]  # fmt: skip
                configs = [{"down": "mm", "block_m": bm, "block_k": bk, "num_warps": nw, "num_stages": ns,
                            "one_dot": True} for bm, bk, nw, ns in grid]  # fmt: skip
                for cfg in configs:

                    def fn(x, cfg=cfg, route=route):
                        return sparse_ffn_prefill_triton(
                            x, *route, p.w_in, p.b_in, p.w_down, p.b_out, p.gated, p.act, **cfg
                        )

                    record("prefill", T, frac, cfg, fn, x, route, graphed=False)
    env["elapsed_s"] = time.perf_counter() - start
    lines = [*header_lines(f"sparse_ffn tile sweep on {env.get('gpu') or env['cpu']}", env, args),
             f"- decode timed as CUDA-graph replays (one call: \"us\"; {args.steady_calls} calls cycling over "
             f"{args.steady_copies} weight copies, per call: \"steady\"); TB/s over the union of selected experts' "
             f"weights (peak {H200_COPY_TBPS} TB/s); prefill timed eagerly", "",
             "| kind | T | active | config | us | TB/s | steady us | steady TB/s | rel err |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
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
            "pdl",
        )
        cfg = ", ".join(f"{k}={r[k]}" for k in keys if k in r and r[k] is not None)
        us = f"{r['us']:.1f}" if "us" in r else ("ERROR" if "error" in r else "FAIL")
        tb = f"{r['TBps']:.2f}" if "TBps" in r else "-"
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
        st = f"{r['steady_us']:.1f} | {r['steady_TBps']:.2f}" if "steady_us" in r else "- | -"
        lines.append(f"| {r['kind']} | {r['T']} | {r['frac']:.0%} | {cfg} | {us} | {tb} | {st} | {err} |")
    report = "\n".join(lines) + "\n"
    print(report)
    name = "sparse_ffn_sweep_" + args.device + ("_tiny" if args.tiny else "")
    write_results(args.out, name, report, {"environment": env, "rows": rows})
    return 0 if all(r.get("ok", False) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
