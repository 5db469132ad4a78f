#!/usr/bin/env python
"""Where the host time of an eager prefill call goes at a small shape (H200, issue 3).

At the SmolLM2-135M shape (d 576, F 1536, E 48, T = 4096) the eager ``sparse_ffn`` prefill took
~210 us at every density while its CUDA-graph replay took 42-109 us (bench/results/sparse_ffn_cuda.md):
the host, not the GPU, sets the eager time. This script times the eager call's wall clock per
call (the GPU is far from busy, so that is the host's time), then profiles it with cProfile and
lists the functions with the most cumulative time per call, and times each launch of the prefill
path alone (wall clock of issuing it).

    python3 bench/diag/prefill_host_overhead.py --out /tmp/out      # on the H200, ~20 s
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from common import environment, header_lines, write_results  # noqa: E402
from sparse_ffn_gpu import SHAPES, Weights, fixed_fraction_route  # noqa: E402

import prunepath_ops  # noqa: E402
from prunepath_ops import reference as R  # noqa: E402
from prunepath_ops.ffn import triton_ffn  # noqa: E402


def per_call_us(fn, n: int) -> float:
    """Wall clock per call of ``n`` back-to-back calls (synchronised once at the end)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shape", default="smollm2-135m", choices=tuple(SHAPES))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--active", type=float, default=0.3)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()

    dev = torch.device("cuda")
    d, F, S = SHAPES[args.shape]
    T = args.tokens
    w = Weights(d, F, S, torch.bfloat16, dev, 0)
    p = w.packed
    x = torch.randn(T, d, device=dev).to(torch.bfloat16)
    route = fixed_fraction_route(T, w.E, args.active, dev, 0)
    E = w.E
    env = environment(args, "time.perf_counter around back-to-back eager calls, one synchronisation", device="cuda")
    lines = header_lines(f"Host time of an eager prefill call, {args.shape}, {torch.cuda.get_device_name()}", env, args)
    lines += [f"- T = {T}, {args.shape} (d {d}, F {F}, S {S}, E {E}), bf16, {args.active:.0%} active", ""]

    calls = {
        "prunepath_ops.sparse_ffn (public API, path auto)": lambda: prunepath_ops.sparse_ffn(x, route, p),
        "triton_ffn.sparse_ffn_prefill_triton (launcher alone)": lambda: triton_ffn.sparse_ffn_prefill_triton(
            x, *route, p.w_in, p.b_in, p.w_down, p.b_out, True, "silu"
        ),
        "  ... without the dense groups (dense_group_fraction=2)": lambda: triton_ffn.sparse_ffn_prefill_triton(
            x, *route, p.w_in, p.b_in, p.w_down, p.b_out, True, "silu", dense_group_fraction=2.0
        ),
        "dense FFN (3 F.linear + silu * mul)": lambda: R.dense_ffn(x, w.wg, w.wd, w_up=w.wu),
    }
    h = torch.empty(T, E * S, dtype=x.dtype, device=dev)
    bm = triton_ffn._prefill_tiles(2, 2 * S, False)[0]
    counts = triton_ffn._align(route.expert_ids, route.num_active, E, bm)[3]
    group = triton_ffn._dense_group_config(2, 2 * S, False)[1]
    parts = {
        "align_experts (C++ op, 3 kernels)": lambda: triton_ffn._align(route.expert_ids, route.num_active, E, bm),
        "zero_fill (1 Triton launch)": lambda: triton_ffn.zero_fill(h),
        "torch.zeros_like(h) (torch's fill)": lambda: torch.zeros_like(h),
        "dense_group_flags (2 Triton launches)": lambda: triton_ffn.dense_group_flags(
            route.expert_ids, route.num_active, counts, group, 0.9
        ),
        "torch.mm(h, w_down)": lambda: torch.mm(h, p.w_down.view(E * S, d)),
    }
    lines += ["| call | wall us per call (host-bound) |", "|---|---:|"]
    payload: dict = {"env": env, "calls": {}, "parts": {}}
    for name, fn in {**calls, **parts}.items():
        us = per_call_us(fn, args.calls)
        payload["calls" if name in calls else "parts"][name] = us
        lines.append(f"| {name} | {us:.1f} |")

    prof = cProfile.Profile()
    fn = calls["prunepath_ops.sparse_ffn (public API, path auto)"]
    fn()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(args.calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(35)
    lines += ["", f"cProfile of {args.calls} calls of the public API (cumulative seconds over all calls):", "", "```"]
    lines += [ln for ln in buf.getvalue().splitlines() if ln.strip()][:60]
    lines += ["```"]
    report = "\n".join(lines) + "\n"
    print(report)
    write_results(args.out, f"prefill_host_overhead_{args.shape}", report, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
