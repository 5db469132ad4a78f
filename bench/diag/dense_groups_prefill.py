#!/usr/bin/env python
"""Prefill FFN with and without dense expert groups, across routing densities (H200 diagnosis).

For each fraction of active experts
per token (random distinct experts, as bench/sparse_ffn_gpu.py) and each dense-group threshold
(``off`` = grouped kernel only), one prefill call of ``sparse_ffn_prefill_triton`` at
Llama-3-8B's shape (T = 4096, bf16) timed with triton.testing.do_bench (L2 flushed, median),
plus the dense FFN of ``reference.dense_ffn`` in the same run. Every output is compared with the
grouped-only output (the same up to the rounding of the accumulation order).

    python3 bench/diag/dense_groups_prefill.py --out /tmp/out    # on the H200, ~1-2 minutes
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from common import environment, header_lines, write_results  # noqa: E402
from sparse_ffn_gpu import Weights, dense_fn, fixed_fraction_route  # noqa: E402

from prunepath_ops.ffn import triton_ffn  # noqa: E402
from prunepath_ops.ffn.triton_ffn import sparse_ffn_prefill_triton  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--active", type=float, nargs="+", default=[0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9, 1.0])
    ap.add_argument("--warmup", type=float, default=25)
    ap.add_argument("--rep", type=float, default=200)
    args = ap.parse_args()
    from triton.testing import do_bench

    dev = torch.device("cuda")
    w = Weights(4096, 14336, 32, torch.bfloat16, dev, 0)
    p = w.packed
    x = torch.randn(args.tokens, 4096, device=dev).to(torch.bfloat16)

    def timed(fn) -> float:
        return 1e3 * do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")

    dense = dense_fn(w)
    dense_us = timed(lambda: dense(x))
    rows = []
    for frac in args.active:
        route = fixed_fraction_route(args.tokens, w.E, frac, dev, 0)

        def call(th, route=route):
            return sparse_ffn_prefill_triton(
                x, *route, p.w_in, p.b_in, p.w_down, p.b_out, True, "silu", dense_group_fraction=th
            )

        base = call(2.0).float()
        row = {"active": frac, "off": timed(lambda: call(2.0))}
        for th in args.thresholds:
            out = call(th).float()
            err = ((out - base).abs().max() / base.abs().max()).item()
            row[f"{th:g}"] = timed(lambda th=th: call(th))
            row[f"err {th:g}"] = err
        rows.append(row)
        print(row, flush=True)
    # Tiles of the dense-group kernel at 100 % active (every group dense): (BLOCK_M, G, BLOCK_K, stages, warps).
    configs = [(128, 4, 64, 4, 8), (128, 4, 64, 3, 8), (128, 4, 128, 2, 8)]
    route = fixed_fraction_route(args.tokens, w.E, 1.0, dev, 0)
    default_config = triton_ffn._dense_group_config
    base = None
    config_rows = []
    for cfg in configs:
        triton_ffn._dense_group_config = lambda elem, rows_in, interp, cfg=cfg: cfg
        try:

            def call(route=route):
                return triton_ffn.sparse_ffn_prefill_triton(
                    x, *route, p.w_in, p.b_in, p.w_down, p.b_out, True, "silu", dense_group_fraction=0.75
                )

            out = call().float()
            base = out if base is None else base
            err = ((out - base).abs().max() / base.abs().max()).item()
            config_rows.append((cfg, timed(call), err))
        except Exception as exc:  # e.g. out of shared memory
            config_rows.append((cfg, float("nan"), repr(exc)[:120]))
        print(config_rows[-1], flush=True)
    triton_ffn._dense_group_config = default_config
    env = environment(args, "triton.testing.do_bench (L2 flushed, median)", device="cuda")
    lines = header_lines("Prefill FFN with dense expert groups on NVIDIA H200", env, args)
    lines += [
        f"- Llama-3-8B FFN (d 4096, F 14336, S 32, E 448), bf16, T = {args.tokens}; routing: every token keeps "
        "exactly the given fraction of the experts (random distinct, bench/sparse_ffn_gpu.py)",
        f"- dense FFN (reference.dense_ffn, three F.linear) in the same run: {dense_us:.1f} us",
        "- columns: us per prefill call with the dense-group threshold (`off`: grouped kernel only); "
        "err: max |out - out(off)| / max |out(off)|",
        "",
        "| active | off us | " + " | ".join(f"{t:g} us" for t in args.thresholds) + " | best vs dense | max err |",
        "|---:|---:|" + "---:|" * len(args.thresholds) + "---:|---:|",
    ]
    for r in rows:
        best = min([r["off"]] + [r[f"{t:g}"] for t in args.thresholds])
        err = max(r[f"err {t:g}"] for t in args.thresholds)
        cells = " | ".join(f"{r[f'{t:g}']:.1f}" for t in args.thresholds)
        lines.append(f"| {r['active']:.0%} | {r['off']:.1f} | {cells} | {dense_us / best:.2f}x | {err:.1e} |")
    lines += [
        "",
        "Dense-group kernel tiles at 100 % active (every group dense; err against the first row):",
        "",
        "| BLOCK_M | G | BLOCK_K | stages | warps | us | vs dense | err |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for cfg, us, err in config_rows:
        lines.append("| " + " | ".join(str(v) for v in cfg) + f" | {us:.1f} | {dense_us / us:.2f}x | {err} |")
    report = "\n".join(lines) + "\n"
    print(report)
    payload = {"dense_us": dense_us, "rows": rows, "configs": [list(c) + [us, str(e)] for c, us, e in config_rows]}
    write_results(args.out, "dense_groups_prefill", report, {**payload, "env": env})
    return 0


if __name__ == "__main__":
    sys.exit(main())
