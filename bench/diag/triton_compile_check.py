#!/usr/bin/env python
"""Compile the prefill FFN's Triton kernels for sm_90 on a machine without a GPU and show their pipelining.

Whether Triton software-pipelines a kernel's main loop (cp.async copies into a ring of shared
memory buffers, wgmma left in flight) decides much of its speed, and it can be checked without
the H200: ``triton.compile`` with an explicit target runs the whole pipeline down to SASS. The
pointer and size arguments are declared 16-divisible, as the JIT specialises them at Llama-3-8B's
shape; without that the loads stay 2-byte scalars and nothing is pipelined.

    python bench/diag/triton_compile_check.py            # ~1 minute on the CI machine
    python bench/diag/triton_compile_check.py --dump /tmp/ttgir   # also write each kernel's TTGIR

Session 13 (triton 3.6.0 and 3.9.0): both the grouped up kernel (with and without the dense-group
skip) and the dense-group kernel pipeline their K loop (4 stages: 160 and 192 KB of shared memory,
one wgmma in flight), so the grouped kernel's speed at 30 % is not a pipelining problem.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from prunepath_ops.ffn import kernels  # noqa: E402

BF16_PTR, FP32_PTR, I32_PTR, I8_PTR, I32 = "*bf16", "*fp32", "*i32", "*i8", "i32"
GROUPED = {
    "sig": {"x_ptr": BF16_PTR, "w_in_ptr": BF16_PTR, "b_in_ptr": BF16_PTR, "gates_ptr": FP32_PTR, "h_ptr": BF16_PTR,
            "sorted_pairs_ptr": I32_PTR, "block_expert_ptr": I32_PTR, "expert_offsets_ptr": I32_PTR,
            "group_flags_ptr": I8_PTR, "trace_ptr": "*i64", "T": I32, "d": I32, "K": I32, "E": I32, "stride_x": I32},
    "const": {"S": 32, "GATED": True, "HAS_BIAS": False, "ACT": 0, "GATE_IN_H": True, "ONE_DOT": True,
              "BLOCK_M": 256, "BLOCK_K": 64, "DOT_PREC": "tf32", "G": 4, "SWAP_AB": True, "TRACE": False},
}  # fmt: skip
DENSE_GROUP = {
    "sig": {"x_ptr": BF16_PTR, "w_in_ptr": BF16_PTR, "b_in_ptr": BF16_PTR, "gates_ptr": FP32_PTR,
            "slot_map_ptr": I32_PTR, "dense_list_ptr": I32_PTR, "h_ptr": BF16_PTR,
            "T": I32, "d": I32, "K": I32, "E": I32, "num_groups": I32, "stride_x": I32},
    "const": {"S": 32, "G": 4, "GATED": True, "HAS_BIAS": False, "ACT": 0, "GATE_IN_H": True, "BLOCK_M": 128,
              "BLOCK_K": 64, "DOT_PREC": "tf32"},
}  # fmt: skip


def compile_sm90(fn, spec: dict, extra: dict, num_warps: int, num_stages: int):
    """``fn`` compiled for sm_90 with the given constexprs; pointers, d and the row stride 16-divisible."""
    const = {**spec["const"], **extra}
    sig = {**spec["sig"], **{k: "constexpr" for k in const}}
    sig = {name: sig[name] for name in fn.arg_names}  # declaration order
    div = [n for n, t in sig.items() if t.startswith("*")] + ["d", "stride_x"]
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
        attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div},
    )
    return triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )


def summary(name: str, k, dump: str | None) -> str:
    ttgir = k.asm["ttgir"]
    if dump:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, name.replace(" ", "_") + ".ttgir"), "w") as f:
            f.write(ttgir)
    waits = [line.split("pendings = ")[1].split()[0] for line in ttgir.splitlines() if "warp_group_dot_wait" in line]
    return f"| {name} | {ttgir.count('async_copy_global_to_local')} | {k.metadata.shared // 1024} KB | {', '.join(waits)} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", default=None, help="folder for each kernel's TTGIR")
    args = ap.parse_args()
    rows = [
        ("grouped_up_kernel", compile_sm90(kernels.grouped_up_kernel, GROUPED, {"DENSE_GROUPS": False}, 8, 4)),
        ("grouped_up_kernel + skip", compile_sm90(kernels.grouped_up_kernel, GROUPED, {"DENSE_GROUPS": True}, 8, 4)),
        (
            "grouped_up_kernel, tokens as M",
            compile_sm90(kernels.grouped_up_kernel, GROUPED, {"DENSE_GROUPS": True, "SWAP_AB": False}, 8, 4),
        ),
        ("dense_group_up_kernel", compile_sm90(kernels.dense_group_up_kernel, DENSE_GROUP, {}, 8, 4)),
    ]
    print(f"triton {triton.__version__}, sm_90, bf16, Llama-3-8B tiles (launcher defaults)\n")
    print("| kernel | async copies in TTGIR | shared memory | wgmma wait pendings |")
    print("|---|---:|---:|---|")
    for name, k in rows:
        print(summary(name, k, args.dump))
    return 0


if __name__ == "__main__":
    sys.exit(main())
