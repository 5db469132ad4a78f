#!/usr/bin/env python
"""Attention projections at decode on the H200: ``F.linear`` (cuBLAS) against ``decode_linear`` (CUDA and Triton GEMVs).

Llama-3-8B shapes, bf16: the fused q/k/v projection (6144 x 4096, 50 MB) and the output projection
(4096 x 4096, 34 MB), for a few decode batch sizes. ``decode_linear``'s two GPU backends: ``cuda``
(``prunepath::decode_gemv``, with and without programmatic dependent launch) and ``triton``. Each variant runs 32 calls in one CUDA graph over
enough weight copies that every call streams its weight from HBM (as 32 layers do); time = replay
time / 32 (median of 20 replays). Bandwidth = weight bytes / time, against ``--peak-tbps`` (the
measured copy bandwidth, ENVIRONMENT.md). Results are checked against ``F.linear`` first.

    python3 bench/decode_linear_gpu.py --out bench/results     # on the H200, ~15 s
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import environment, header_lines, write_results  # noqa: E402
from router_decode_gpu import CALLS, H200_COPY_TBPS, time_graph  # noqa: E402

from prunepath_ops.decode_step import decode_linear  # noqa: E402
from prunepath_ops.testing import assert_close  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096)}
KEYS = ("cublas", "cuda", "cuda_nopdl", "triton")


def run(name: str, N: int, K: int, B: int, args) -> dict:
    dtype = torch.bfloat16
    nbytes = N * K * 2
    copies = max(2, -(-256 * 2**20 // nbytes))  # > 256 MB of weights: no L2 reuse between calls
    gen = torch.Generator(device="cuda").manual_seed(N + B)
    ws = [torch.randn(N, K, device="cuda", dtype=dtype, generator=gen) / K**0.5 for _ in range(copies)]
    x = torch.randn(B, K, device="cuda", dtype=dtype, generator=gen)
    want = F.linear(x.double(), ws[0].double()).float()
    for backend in ("cuda", "triton"):
        assert_close(decode_linear(x, ws[0], backend=backend).float(), want, dtype=dtype)

    def loop(fn):
        return lambda: [fn(x, ws[i % copies]) for i in range(CALLS)]

    row = {"shape": name, "N": N, "K": K, "B": B, "weight_bytes": nbytes}
    row["cublas_us"] = time_graph(loop(F.linear), args.replays)
    row["cuda_us"] = time_graph(loop(lambda x, w: decode_linear(x, w, backend="cuda")), args.replays)
    row["cuda_nopdl_us"] = time_graph(loop(lambda x, w: torch.ops.prunepath.decode_gemv(x, w, False)), args.replays)
    row["triton_us"] = time_graph(loop(lambda x, w: decode_linear(x, w, backend="triton")), args.replays)
    for key in KEYS:
        row[f"{key}_TBps"] = nbytes / (row[f"{key}_us"] * 1e-6) / 1e12
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--peak-tbps", type=float, default=H200_COPY_TBPS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="decode_linear_cuda")
    args = ap.parse_args(argv)
    args.device = "cuda"
    env = environment(args, f"CUDA graph of {CALLS} calls, CUDA events, median of {args.replays} replays")
    rows = []
    with torch.no_grad():
        for name, (N, K) in SHAPES.items():
            for B in args.batches:
                rows.append(run(name, N, K, B, args))
                print(rows[-1], flush=True)
    lines = header_lines(
        "Attention projections at decode: cuBLAS vs decode_linear, CUDA and Triton (H200, bf16)", env, args
    )
    lines += [
        f"- {CALLS} calls per CUDA graph over > 256 MB of weight copies; us per call, median of {args.replays} replays",
        "",
        f"- TB/s: weight bytes over time; % of peak: against {args.peak_tbps} TB/s; speedup: cuBLAS time over"
        " the CUDA kernel's (PDL on, the default)",
        "",
        "| projection | N x K | B | cuBLAS us | TB/s | cuda us | TB/s | % of peak | cuda no-PDL us | triton us | TB/s |"
        " speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['N']} x {r['K']} | {r['B']} | {r['cublas_us']:.2f} | {r['cublas_TBps']:.2f} | "
            f"{r['cuda_us']:.2f} | {r['cuda_TBps']:.2f} | {100 * r['cuda_TBps'] / args.peak_tbps:.0f} % | "
            f"{r['cuda_nopdl_us']:.2f} | {r['triton_us']:.2f} | {r['triton_TBps']:.2f} | "
            f"{r['cublas_us'] / r['cuda_us']:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(args.out, args.name, text, {"env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
