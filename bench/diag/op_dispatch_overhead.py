#!/usr/bin/env python
"""Host cost of calling an op implemented in Python: ``torch.library.custom_op`` against a kernel
registered on the dispatcher (``prunepath_ops._library.define_op``), and what each
``torch.ops.prunepath`` Python op adds on top of its own body.

Two throwaway ops with the schema shape of ``kv_decode_attention`` (a mutated tensor, optional
tensors, a float and a string) and a body that returns at once are timed both ways; then
``kv_decode_attention`` and ``sparse_ffn`` (tiny CPU tensors) through ``torch.ops`` against their
registered Python kernels called directly, with the bodies alone (``kv_decode_attention``'s CPU
composite; ``expert_ffn``, the C++ op that ``sparse_ffn`` calls on the CPU). Interleaved rounds, minimum and median per
call, one thread.

    python bench/diag/op_dispatch_overhead.py --out bench/results    # CPU, ~20 s
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from common import write_texts  # noqa: E402

import prunepath_ops  # noqa: E402
from prunepath_ops.attention.cpu import kv_decode_attention_cpu  # noqa: E402
from prunepath_ops.attention.ops import kv_decode_attention_op  # noqa: E402
from prunepath_ops.ffn.ops import sparse_ffn_op  # noqa: E402


def per_call_us(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    lib = torch.library.Library("prunepath_dispatch_bench", "DEF")
    lib.define("direct(Tensor q, Tensor(a!) k, Tensor? kn, float? s, str backend) -> Tensor")

    def body(q, k, kn, s, backend):
        return q.new_empty(0)

    lib.impl("direct", body, "CPU")

    @torch.library.custom_op("prunepath_dispatch_bench::decorated", mutates_args=("k",))
    def decorated(
        q: torch.Tensor, k: torch.Tensor, kn: torch.Tensor | None, s: float | None, backend: str
    ) -> torch.Tensor:
        return q.new_empty(0)

    B, Hq, Hkv, D, S = 1, 4, 1, 16, 8
    q = torch.randn(B, Hq, D)
    k, v = torch.zeros(B, S, Hkv, D), torch.zeros(B, S, Hkv, D)
    lens = torch.tensor([3], dtype=torch.int32)
    ops = torch.ops.prunepath_dispatch_bench
    d, F, S = 64, 128, 16
    packed = prunepath_ops.pack_experts(torch.randn(F, d), torch.randn(d, F), S, w_up=torch.randn(F, d))
    x = torch.randn(1, d)
    route = prunepath_ops.topp_route(torch.randn(1, F // S), 0.5)
    ffn_args = (x, *route, packed.w_in, packed.b_in, packed.w_down, packed.b_out, packed.gated, packed.act)
    cases = {
        "empty op, torch.library.custom_op": lambda: ops.decorated(q, k, None, None, "auto"),
        "empty op, registered on the dispatcher": lambda: ops.direct(q, k, None, None, "auto"),
        "empty body called directly": lambda: body(q, k, None, None, "auto"),
        "kv_decode_attention through torch.ops": lambda: torch.ops.prunepath.kv_decode_attention(
            q, k, v, lens, None, None, None, None, None, "auto"
        ),
        "kv_decode_attention kernel called directly (checks + body)": lambda: kv_decode_attention_op(
            q, k, v, lens, None, None, None, None, None, "auto"
        ),
        "kv_decode_attention CPU body alone": lambda: kv_decode_attention_cpu(q, k, v, lens, None, None, None),
        "sparse_ffn through torch.ops (C++ CPU kernel inside)": lambda: torch.ops.prunepath.sparse_ffn(
            *ffn_args, "auto", "auto"
        ),
        "sparse_ffn kernel called directly (checks + body)": lambda: sparse_ffn_op(*ffn_args, "auto", "auto"),
        "expert_ffn (C++ op) through torch.ops": lambda: torch.ops.prunepath.expert_ffn(*ffn_args),
    }
    times = {name: [] for name in cases}
    for fn in cases.values():
        per_call_us(fn, args.calls // 5)  # warm
    for _ in range(args.rounds):
        for name, fn in cases.items():
            times[name].append(per_call_us(fn, args.calls))
    lines = [
        "# Host cost of a Python-implemented op call (CPU)",
        "",
        f"- command: `python bench/diag/op_dispatch_overhead.py` ({args.rounds} interleaved rounds of {args.calls} calls, one thread)",
        f"- torch {torch.__version__}, python {platform.python_version()}, {platform.processor() or platform.machine()}, "
        f"prunepath_ops {getattr(prunepath_ops, '__version__', '?')}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        "",
        "| call | min us | median us |",
        "|---|---:|---:|",
    ]
    for name, ts in times.items():
        lines.append(f"| {name} | {min(ts):.1f} | {statistics.median(ts):.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_texts(args.out, {"op_dispatch_overhead_cpu.md": text})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
