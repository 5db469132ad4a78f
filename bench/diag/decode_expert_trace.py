#!/usr/bin/env python
"""Where the batch-1 decode expert programs run, and for how long (H200 diagnosis).

Nsight Compute showed the expert kernel's SMs active only ~72 % of its duration at 30 % of the
Llama-3-8B experts (bench/results/decode_expert_diag_h200.md). The kernel's ``TRACE`` records each
program's SM id and ``%globaltimer`` at its start and end; this script reports, per fraction, how
many active programs each SM held, the programs' durations, the spread of their starts and ends,
and the per-call time of 20 calls in one CUDA graph over 4 weight copies ("steady", as in
bench/sparse_ffn_sweep.py). With ``--out``, one line per active program at 30 % goes to
``decode_expert_trace_programs.txt``.

    python3 bench/diag/decode_expert_trace.py --out /tmp/out    # on the H200, ~30 s
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from common import capture, write_texts  # noqa: E402
from sparse_ffn_gpu import Weights, fixed_fraction_route  # noqa: E402

from prunepath_ops.ffn.triton_ffn import sparse_ffn_decode_triton  # noqa: E402


def call(w: Weights, x, route, **kw):
    p = w.packed
    return sparse_ffn_decode_triton(x, *route, p.w_in, p.b_in, p.w_down, p.b_out, p.gated, p.act, **kw)


def trace_once(w: Weights, x, route, dump: list[str] | None = None) -> list[str]:
    E = w.E
    trace = torch.zeros(E, 4, dtype=torch.int64, device="cuda")
    for _ in range(3):  # warm: the last call's trace is kept
        call(w, x, route, trace=trace)
    torch.cuda.synchronize()
    rows = trace.cpu().tolist()
    active = [r for r in rows if r[3]]
    per_sm = collections.Counter(r[0] for r in active)
    hist = collections.Counter(per_sm.values())
    idle_sms = 132 - len(per_sm)
    t0 = min(r[1] for r in rows)
    dur = [(r[2] - r[1]) / 1e3 for r in active]
    starts = [(r[1] - t0) / 1e3 for r in active]
    ends = [(r[2] - t0) / 1e3 for r in active]
    pairs = sum(1 for i in range(0, E - 1, 2) if rows[i][0] == rows[i + 1][0])
    if dump is not None:  # one line per active program, with how many active programs shared its SM
        dump += [f"{pid} {r[0]} {per_sm[r[0]]} {(r[1] - t0) / 1e3:.2f} {(r[2] - t0) / 1e3:.2f}"
                 for pid, r in enumerate(rows) if r[3]]  # fmt: skip
    return [
        f"  active programs {len(active)}; SMs holding 0/1/2/3 active: {idle_sms}/{hist.get(1, 0)}/"
        f"{hist.get(2, 0)}/{hist.get(3, 0)}; program pairs (2i, 2i+1) on one SM: {pairs} of {E // 2}",
        f"  durations us: min {min(dur):.1f} median {statistics.median(dur):.1f} max {max(dur):.1f}",
        f"  starts us after the first: median {statistics.median(starts):.2f} max {max(starts):.2f}; "
        f"ends: min {min(ends):.1f} median {statistics.median(ends):.1f} max {max(ends):.1f}",
        "  first 12 programs' SMs: " + " ".join(str(r[0]) for r in rows[:12]),
    ]


def steady_us(ws: list[Weights], x, route, calls: int = 20, reps: int = 20) -> float:
    def many():
        for i in range(calls):
            call(ws[i % len(ws)], x, route)

    replay, _ = capture(many)
    for _ in range(3):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ws = [Weights(4096, 14336, 32, torch.bfloat16, "cuda", seed) for seed in range(4)]
    x = torch.randn(1, 4096, device="cuda").bfloat16()
    lines = [f"# decode expert program trace, {torch.cuda.get_device_name()}, torch {torch.__version__}", ""]
    dump = ["# fraction 0.3: program, SM, active programs on that SM, start us, end us"]
    with torch.inference_mode():
        for frac in args.fractions:
            route = fixed_fraction_route(1, ws[0].E, frac, "cuda", 0)
            lines.append(f"fraction {frac}:")
            lines += trace_once(ws[0], x, route, dump if frac == 0.3 else None)
            us = [steady_us(ws, x, route) for _ in range(args.rounds)]  # their spread is the noise
            lines.append(
                f"fraction {frac}: steady us per call, {args.rounds} rounds: " + ", ".join(f"{u:.2f}" for u in us)
            )
    text = "\n".join(lines)
    print(text)
    write_texts(args.out, {"decode_expert_trace.txt": text, "decode_expert_trace_programs.txt": "\n".join(dump)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
