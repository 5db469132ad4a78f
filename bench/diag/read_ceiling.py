#!/usr/bin/env python
"""How fast can one call read the KV bytes of a decode-attention case at all? A streaming-read ceiling.

For each case of issue 4's grid (bf16, Hkv = 8, D = 128, caches ``[B, S_max, Hkv, D]`` with
S_max = L + 256, as ``bench/kv_attention_gpu.py``), a Triton kernel reads exactly the bytes attention
must read (the valid rows of K and V, each sequence's prefix contiguous) and does nothing else but
sum them into one float per program: no dependent loads, no softmax, no second kernel. Timed the
way the attention benchmark times its ``graphed`` column (one call captured in a CUDA graph,
``triton.testing.do_bench`` with L2 flushed, median) and its ``steady`` column (20 calls in one
graph over copies of the caches), the best of a few grid and tile sizes. Also timed: a graph holding
one tiny kernel (what the graphed timer costs with no bytes to read).

So the numbers bound what any decode-attention kernel can reach under the same timer: issue 4 asks
B = 1 / 16k for 3.5 TB/s; if reading those 67 MB alone does not reach it, the target is out of
reach of any kernel timed this way.

    python bench/diag/read_ceiling.py --out bench/results     # on the GPU, ~1 minute
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from common import capture, environment, header_lines, make_timer, write_results  # noqa: E402

HKV, D, SLACK = 8, 128, 256
PEAK_TBPS = 4.24  # measured H200 copy (ENVIRONMENT.md)


@triton.jit
def stream_read_kernel(k_ptr, v_ptr, lens_ptr, out_ptr, seq_stride, row_elems, BLOCK: tl.constexpr):
    """Program (b, part, which) sums its share of sequence b's valid K (which 0) or V (1) elements."""
    b = tl.program_id(0)
    part = tl.program_id(1)
    which = tl.program_id(2)
    parts = tl.num_programs(1)
    n = tl.load(lens_ptr + b).to(tl.int64) * row_elems
    chunk = tl.cdiv(tl.cdiv(n, parts), BLOCK) * BLOCK
    start = part * chunk
    stop = tl.minimum(start + chunk, n)
    base = b.to(tl.int64) * seq_stride
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if which == 0:
        for i in range(start, stop, BLOCK):
            acc += tl.load(k_ptr + base + i + offs, mask=i + offs < stop, other=0.0).to(tl.float32)
    else:
        for i in range(start, stop, BLOCK):
            acc += tl.load(v_ptr + base + i + offs, mask=i + offs < stop, other=0.0).to(tl.float32)
    tl.store(out_ptr + (b * parts + part) * 2 + which, tl.sum(acc, axis=0))


@triton.jit
def tiny_kernel(out_ptr):
    tl.store(out_ptr, 1.0)


def reader(k, v, lens, parts: int, block: int, warps: int):
    B = k.shape[0]
    out = torch.empty(B * parts * 2, dtype=torch.float32, device=k.device)
    seq_stride, row_elems = k.stride(0), k.shape[2] * k.shape[3]

    def fn():
        stream_read_kernel[(B, parts, 2)](k, v, lens, out, seq_stride, row_elems, BLOCK=block, num_warps=warps)
        return out

    return fn


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--steady-calls", type=int, default=20)
    ap.add_argument("--steady-mb", type=float, default=256.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--rep", type=float, default=50.0)
    ap.add_argument("--timer", choices=("auto", "do_bench", "events"), default="auto")
    ap.add_argument("--peak-tbps", type=float, default=PEAK_TBPS, help="bandwidth of the floor column, TB/s")
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="read_ceiling_cuda")
    args = ap.parse_args(argv)
    args.device = "cuda"
    return args


def run_case(B: int, L: int, args, timer, sms: int) -> dict:
    S_max = L + SLACK
    gen = torch.Generator(device="cuda").manual_seed(B * 100003 + L)
    k = torch.randn(B, S_max, HKV, D, device="cuda", generator=gen).bfloat16()
    v = torch.randn(B, S_max, HKV, D, device="cuda", generator=gen).bfloat16()
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    nbytes = 2 * B * L * HKV * D * k.element_size()
    row = {"case": f"B={B} L={L}", "B": B, "L": L, "S_max": S_max, "kv_bytes": nbytes,
           "floor_us": nbytes / (args.peak_tbps * 1e12) * 1e6, "configs": []}  # fmt: skip
    expected = float(k[:, :L].float().sum() + v[:, :L].float().sum())
    for programs_per_sm in (2, 4, 8):
        parts = max(1, math.ceil(programs_per_sm * sms / (2 * B)))
        for block, warps in ((4096, 8), (8192, 8)):
            fn = reader(k, v, lens, parts, block, warps)
            got = float(fn().sum())
            assert math.isclose(got, expected, rel_tol=1e-3, abs_tol=1.0), (got, expected)  # it read the bytes
            replay, _ = capture(fn)
            us = timer(replay)[0] * 1e3
            row["configs"].append({"parts": parts, "block": block, "warps": warps, "graph_us": us})
    best = min(row["configs"], key=lambda c: c["graph_us"])
    row.update(best_config=best, graph_us=best["graph_us"], graph_TBps=nbytes / best["graph_us"] / 1e6)
    # Steady: the best graphed configuration, calls back to back over copies of the caches.
    n = args.steady_calls
    copies = max(1, min(8, math.ceil(args.steady_mb * 2**20 / (2 * k.numel() * k.element_size()))))
    kvs = [(k, v)] + [(k.clone(), v.clone()) for _ in range(copies - 1)]
    fns = [reader(kc, vc, lens, best["parts"], best["block"], best["warps"]) for kc, vc in kvs]

    def steady():
        for i in range(n):
            fns[i % copies]()

    replay, _ = capture(steady)
    row["steady_us"] = timer(replay)[0] * 1e3 / n
    row["steady_TBps"] = nbytes / row["steady_us"] / 1e6
    return row


def report(args, env, rows, empty_us, elapsed) -> str:
    lines = [
        *header_lines(f"Streaming-read ceiling of the decode-attention cases on {env.get('gpu')}", env, args),
        f"- cases: bf16, Hkv = {HKV}, D = {D}, caches [B, S_max, Hkv, D] with S_max = L + {SLACK}; bytes = the valid "
        "rows of K and V (what kv_decode_attention reads)",
        "- reader: `stream_read_kernel` (this file): grid (B, parts, 2), each program sums a contiguous share of "
        "one sequence's K or V prefix in BLOCK-element loads; the best of 2 / 4 / 8 programs per SM x BLOCK "
        "4096 / 8192 (8 warps) by the graphed time; its output checked against torch's sum",
        "- graphed: one call captured in a CUDA graph, replayed under the timer (as kv_attention_gpu.py's graphed "
        f"column); steady: {args.steady_calls} calls in one graph over copies of the caches (at most 8, "
        f"{args.steady_mb:.0f} MB), time / calls (as its steady column)",
        f"- a graph with one one-thread kernel under the same timer: **{empty_us:.1f} us** (what the graphed "
        "column costs with nothing to read)",
        f"- floor = bytes / {args.peak_tbps} TB/s; total {elapsed:.0f} s",
        "",
        "| case | MB | read graphed us | TB/s | read steady us | TB/s | floor us | best grid (parts x block) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        c = r["best_config"]
        lines.append(
            f"| {r['case']} | {r['kv_bytes'] / 1e6:.1f} | {r['graph_us']:.1f} | {r['graph_TBps']:.2f} "
            f"| {r['steady_us']:.1f} | {r['steady_TBps']:.2f} | {r['floor_us']:.1f} | {c['parts']} x {c['block']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("read_ceiling: needs a CUDA device", file=sys.stderr)
        return 2
    t0 = time.time()
    desc, timer = make_timer(args)
    env = environment(args, desc)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    one = torch.zeros(1, device="cuda")
    replay, _ = capture(lambda: tiny_kernel[(1,)](one))
    empty_us = timer(replay)[0] * 1e3
    rows = []
    for B in args.batches:
        for L in args.contexts:
            rows.append(run_case(B, L, args, timer, sms))
            r = rows[-1]
            print(f"{r['case']}: graphed {r['graph_us']:.1f} us ({r['graph_TBps']:.2f} TB/s), "
                  f"steady {r['steady_us']:.1f} us ({r['steady_TBps']:.2f} TB/s)", flush=True)  # fmt: skip
    md = report(args, env, rows, empty_us, time.time() - t0)
    print(md)
    if args.out:
        write_results(args.out, args.name, md, {"env": env, "empty_graph_us": empty_us, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
