#!/usr/bin/env python
"""Decode router on the H200: ``F.linear`` + ``topp_route`` against the fused ``linear_topp_route``.

At batch 1 the router of a Llama-3-8B FFN (E = 448 experts over d = 4096, bf16) reads 3.7 MB of
weights, under a microsecond of HBM time, yet took ~12 us per layer in the decode step (a cuBLAS
GEMV and the rank kernel, two launches). This script measures, per shape and batch T:

- ``linear+topp``: ``F.linear(x, W)`` then ``topp_route(logits, tau)`` (the unfused module path);
- ``fused``, ``fused-pdl``: ``linear_topp_route`` without and with programmatic dependent launch;
- ``linear``, ``topp``: each half of the unfused path alone.

Every variant runs 32 calls captured in one CUDA graph, cycling over enough router-weight copies
that the weights come from HBM as in a 32-layer model (> 64 MB in all); the time is graph replay
time / 32 (median of 20 replays, CUDA events), so it is device time with the launch gaps a graphed
decode step has, without Python. Bandwidth is the weight bytes over that time against
``--peak-tbps`` (the measured copy bandwidth, ENVIRONMENT.md). Before timing, the fused routing is
checked against ``topp_route`` on its own logits (bit-identical) and the logits against ``F.linear``.

    python3 bench/router_decode_gpu.py --out bench/results       # on the H200, ~20 s
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import capture, environment, header_lines, write_results  # noqa: E402

import prunepath_ops  # noqa: E402
from prunepath_ops.testing import assert_close  # noqa: E402

SHAPES = {"smollm2-135m": (576, 48), "llama3-8b": (4096, 448), "llama3-70b": (8192, 896)}
CALLS = 32
H200_COPY_TBPS = 4.24


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--tau", type=float, default=0.3)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--peak-tbps", type=float, default=H200_COPY_TBPS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="router_decode_cuda")
    args = ap.parse_args(argv)
    args.device = "cuda"
    return args


def time_graph(fn, replays: int) -> float:
    """us per call of ``fn`` (which makes CALLS calls), from CUDA-event timed graph replays."""
    replay, _ = capture(fn)
    for _ in range(3):
        replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return statistics.median(times)


def check(x, w, tau) -> None:
    logits, route = prunepath_ops.linear_topp_route(x, w, tau)
    assert_close(logits.double(), F.linear(x.double(), w.double()), dtype=x.dtype)
    again = prunepath_ops.topp_route(logits, tau)
    for a, b in zip(route, again, strict=True):
        assert torch.equal(a, b), "fused routing differs from topp_route on its logits"


def run_shape(name: str, d: int, E: int, T: int, args) -> dict:
    dtype = torch.bfloat16
    bytes_w = E * d * 2
    copies = max(2, -(-64 * 2**20 // bytes_w))  # > 64 MB of weights: HBM reads, as in a 32-layer model
    gen = torch.Generator(device="cuda").manual_seed(T * 1000 + E)
    ws = [torch.randn(E, d, device="cuda", dtype=dtype, generator=gen) / d**0.5 for _ in range(copies)]
    x = torch.randn(T, d, device="cuda", dtype=dtype, generator=gen)
    tau = torch.full((1,), args.tau, device="cuda")
    tickets = torch.zeros(16, dtype=torch.int32, device="cuda")
    check(x, ws[0], tau)
    logits0 = F.linear(x, ws[0])

    def loop(body):
        def fn():
            for i in range(CALLS):
                body(ws[i % copies])

        return fn

    variants = {
        "linear+topp": loop(lambda w: prunepath_ops.topp_route(F.linear(x, w), tau)),
        "fused": loop(lambda w: prunepath_ops.linear_topp_route(x, w, tau, tickets=tickets, pdl=False)),
        "fused-pdl": loop(lambda w: prunepath_ops.linear_topp_route(x, w, tau, tickets=tickets, pdl=True)),
        "linear": loop(lambda w: F.linear(x, w)),
        "topp": loop(lambda w: prunepath_ops.topp_route(logits0, tau)),
    }
    row = {"shape": name, "d": d, "E": E, "T": T, "weight_bytes": bytes_w, "copies": copies}
    for key, fn in variants.items():
        row[key] = time_graph(fn, args.replays)
    assert not tickets.any(), "the fused kernel left a ticket counter non-zero"
    best = min(row["fused"], row["fused-pdl"])
    row["speedup"] = row["linear+topp"] / best
    row["fused_TBps"] = bytes_w / (best * 1e-6) / 1e12
    return row


def report(args, env, rows) -> str:
    lines = header_lines("Decode router: F.linear + topp_route vs linear_topp_route (H200, bf16)", env, args)
    lines += [
        f"- {CALLS} calls per CUDA graph over router-weight copies (> 64 MB: HBM reads); us per call, "
        f"median of {args.replays} replays; tau = {args.tau}",
        "",
        "| shape | T | E x d | linear+topp us | linear us | topp us | fused us | fused-pdl us | speedup | fused TB/s | % of peak |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['T']} | {r['E']} x {r['d']} | {r['linear+topp']:.2f} | {r['linear']:.2f} | "
            f"{r['topp']:.2f} | {r['fused']:.2f} | {r['fused-pdl']:.2f} | {r['speedup']:.2f}x | "
            f"{r['fused_TBps']:.2f} | {100 * r['fused_TBps'] / args.peak_tbps:.0f} % |"
        )
    lines.append(
        "\nspeedup: linear+topp over the faster fused variant. In a graph the PDL variant overlaps each call's "
        "weight loads with the previous call, as in the decode step."
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment(args, f"CUDA graph of {CALLS} calls, CUDA events, median of {args.replays} replays")
    rows = []
    with torch.no_grad():
        for name in args.shapes:
            d, E = SHAPES[name]
            for T in args.batches:
                rows.append(run_shape(name, d, E, T, args))
                print(rows[-1], flush=True)
    text = report(args, env, rows)
    print(text)
    write_results(args.out, args.name, text, {"env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
