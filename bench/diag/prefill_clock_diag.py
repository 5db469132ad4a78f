#!/usr/bin/env python
"""Does the dense prefill FFN slow down under sustained load, and does the sparse one (H200, issue 3)?

The dense Llama-3-8B FFN at T = 4096 measured 1929-2060 us in ``bench/sparse_ffn_gpu.py`` (one
do_bench of 60 ms, dense timed once before the sparse cases) and 2343-2400 us in
``bench/diag/prefill_up_diag.py`` (rounds of 150 ms, interleaved with the sparse calls) on the
same machine in the same device call. This script runs each FFN back to back for a few seconds,
alternating, and records the time per call in windows of CUDA events beside the SM clock, power
draw and temperature sampled by ``nvidia-smi`` every 20 ms (the GPU's settings are left alone), so
that the time per call can be read against the clock it ran at.

    python3 bench/diag/prefill_clock_diag.py --out /tmp/out      # on the H200, ~1 minute
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from common import environment, header_lines, write_results  # noqa: E402
from sparse_ffn_gpu import dense_fn, llama3_8b_prefill  # noqa: E402

import prunepath_ops  # noqa: E402


class SmiSampler:
    """``nvidia-smi`` in loop mode on a thread: (wall time, SM MHz, watts, deg C) samples."""

    def __init__(self, period_ms: int = 20):
        self.samples: list[tuple[float, float, float, float]] = []
        self.proc = None
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        query = "clocks.sm,power.draw,temperature.gpu"
        self.proc = subprocess.Popen(
            [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits", f"-lms={period_ms}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                mhz, watts, temp = (float(v) for v in line.strip().split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), mhz, watts, temp))

    def between(self, t0: float, t1: float) -> tuple[float, float, float, int] | None:
        got = [s for s in self.samples if t0 <= s[0] <= t1]
        if not got:
            return None
        return (statistics.mean(s[1] for s in got), statistics.mean(s[2] for s in got),
                max(s[3] for s in got), len(got))  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


def run_phase(fn, seconds: float, window: int) -> list[tuple[float, float, float]]:
    """``fn`` back to back for ``seconds``: (wall start, wall end, us per call) per window of calls."""
    out = []
    end = time.time() + seconds
    while time.time() < end:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.time()
        a.record()
        for _ in range(window):
            fn()
        b.record()
        b.synchronize()
        out.append((t0, time.time(), a.elapsed_time(b) * 1e3 / window))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--active", type=float, default=0.3)
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each back-to-back phase")
    ap.add_argument("--rounds", type=int, default=3, help="dense/sparse alternations")
    ap.add_argument("--idle", type=float, default=2.0, help="idle seconds before each phase")
    ap.add_argument("--window", type=int, default=10, help="calls per timed window")
    args = ap.parse_args()

    T = args.tokens
    w, x, route = llama3_8b_prefill(T, args.active, torch.device("cuda"))
    dense = dense_fn(w)
    fns = {"dense": lambda: dense(x), "sparse": lambda: prunepath_ops.sparse_ffn(x, route, w.packed)}
    for fn in fns.values():  # compile and warm up
        for _ in range(3):
            fn()
    torch.cuda.synchronize()

    env = environment(args, "CUDA events around windows of back-to-back calls", device="cuda")
    lines = header_lines(
        f"Prefill FFN under sustained load: time per call against the SM clock, {torch.cuda.get_device_name()}",
        env,
        args,
    )
    lines += [f"- T = {T}, Llama-3-8B FFN (d 4096, F 14336, S 32, E 448), bf16, {args.active:.0%} active "
              f"(random routing); {args.rounds} rounds of: {args.idle:g} s idle, dense {args.seconds:g} s back to "
              f"back, {args.idle:g} s idle, sparse {args.seconds:g} s; windows of {args.window} calls; clock, power "
              "and temperature from `nvidia-smi -lms=20` (means over the part of the phase, temperature its maximum)",
              ""]  # fmt: skip
    smi = SmiSampler()
    phases = []
    try:
        for r in range(args.rounds):
            for name, fn in fns.items():
                time.sleep(args.idle)
                phases.append((r, name, run_phase(fn, args.seconds, args.window)))
    finally:
        time.sleep(0.1)
        smi.stop()
    if not smi.samples:
        lines += ["(no nvidia-smi samples: clock columns empty)", ""]
    lines += ["| round | FFN | part of the phase | us per call (median of windows) | SM MHz | W | max deg C |",
              "|---:|---|---|---:|---:|---:|---:|"]  # fmt: skip
    payload: dict = {"env": env, "phases": [], "smi": smi.samples}
    summary: dict = {}
    for r, name, wins in phases:
        t_start = wins[0][0]
        parts = {"first 200 ms": [v for v in wins if v[1] - t_start <= 0.2],
                 "last 1 s": [v for v in wins if v[1] >= wins[-1][1] - 1.0]}  # fmt: skip
        for label, sel in parts.items():
            if not sel:
                continue
            us = statistics.median(v[2] for v in sel)
            clk = smi.between(sel[0][0], sel[-1][1])
            cells = [f"{clk[0]:.0f}", f"{clk[1]:.0f}", f"{clk[2]:.0f}"] if clk else ["", "", ""]
            lines.append(f"| {r} | {name} | {label} | {us:.1f} | " + " | ".join(cells) + " |")
            summary.setdefault((name, label), []).append(us)
        payload["phases"].append({"round": r, "ffn": name, "windows": wins})
    lines += ["", "| part of the phase | dense us | sparse us | dense / sparse |", "|---|---:|---:|---:|"]
    for label in ("first 200 ms", "last 1 s"):
        if (("dense", label) in summary) and (("sparse", label) in summary):
            dn, sp = statistics.median(summary["dense", label]), statistics.median(summary["sparse", label])
            lines.append(f"| {label} (median over rounds) | {dn:.1f} | {sp:.1f} | {dn / sp:.2f}x |")
    report = "\n".join(lines) + "\n"
    print(report)
    write_results(args.out, "prefill_clock_diag", report, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
