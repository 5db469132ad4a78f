#!/usr/bin/env python
"""Registers, spills and shared memory of ``decode_attention_split_kernel``'s variants for sm_90, without a GPU.

Compiles the kernel with Triton's compiler and ptxas for the Llama-3-8B shape the benchmarks time
(bf16, GQA 4, D = 128, 64-key tiles, 4 warps, 3 stages, PDL on), with the integer divisibility
hints a real launch gets (pointers, strides, S_max and chunk multiples of 16; without them the
compiler emits scalar loads and the counts say nothing about the GPU), then reads the cubin's
resource usage with ``cuobjdump``. One row per (static or length plan, append, one split, RoPE in
the kernel: ``rotary_cos``/``rotary_sin``, with an append only, as the decode step calls it).

    python bench/diag/kv_attention_resources.py [--cuobjdump PATH]

``cuobjdump`` comes from NVIDIA's pip package; ``.ci/run`` installs it in its CUDA venv.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

POINTERS = {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "k_new_ptr": "*bf16",
            "v_new_ptr": "*bf16", "seqlens_ptr": "*i32", "out_ptr": "*fp32", "lse_ptr": "*fp32",
            "final_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16"}  # fmt: skip
MULTIPLES_OF_16 = {"S_max", "stride_cos", "stride_sin", "stride_qb", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_vb",
                   "stride_vs", "stride_vh", "stride_nkb", "stride_nkh", "stride_nvb", "stride_nvh", "stride_ob",
                   "stride_oh"}  # fmt: skip


def find_cuobjdump(given: str | None) -> str:
    cached = os.path.expanduser("~/.cache/prunepath/venv-cuda/lib/python3*/site-packages/nvidia/cu*/bin/cuobjdump")
    for path in [given, shutil.which("cuobjdump"), *sorted(glob.glob(cached))]:
        if path and os.path.exists(path):
            return path
    sys.exit("cuobjdump not found: pass --cuobjdump (pip install 'nvidia-cuda-cuobjdump<14' provides it)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuobjdump", default=None)
    args = ap.parse_args(argv)
    cuobjdump = find_cuobjdump(args.cuobjdump)

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from prunepath_ops.attention.kernels import decode_attention_split_kernel as fn

    names = fn.arg_names
    print("| plan | append | one split | rope | registers | stack | local | shared bytes |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    variants = [
        (by_length, has_new, single, rope)
        for by_length in (False, True)
        for has_new in (False, True)
        for single in ((False,) if by_length else (False, True))
        for rope in ((False, True) if has_new else (False,))
    ]
    for by_length, has_new, single, rope in variants:
        cx = {"GROUP": 4, "G_PAD": 16, "D": 128, "BLOCK_N": 64, "HAS_NEW": has_new, "SINGLE": single,
              "BY_LENGTH": by_length, "BLOCK_B": 32 if by_length else 1, "DOT_PREC": "tf32", "HAS_ROPE": rope,
              "PDL": True}  # fmt: skip
        sig = {n: "constexpr" if n in cx else POINTERS.get(n, "fp32" if n == "qk_scale" else "i32") for n in names}
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in POINTERS or n in MULTIPLES_OF_16}
        src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): c for n, c in cx.items()}, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage.stdout)
        regs, stack, local = m.groups() if m else ("?", "?", "?")
        plan = "length" if by_length else "static"
        print(f"| {plan} | {has_new} | {single} | {rope} | {regs} | {stack} | {local} | {kernel.metadata.shared} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
