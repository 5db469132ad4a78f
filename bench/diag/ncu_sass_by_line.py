#!/usr/bin/env python
"""Executed instructions (and stall samples) per source line, from an Nsight Compute SASS export.

``ncu --page source --print-source sass --csv`` (``bash bench/gpu_call.sh ncueffsrc`` writes it
gzipped) lists every SASS instruction of a kernel with its executed count, but not the CUDA line it
came from. This script disassembles the same kernel from a cubin built here with ``-lineinfo``
(``nvdisasm -g``), checks that the two instruction streams have the same opcodes one by one (same
nvcc, same flags, same sources, so they should), and sums the counts per file and line. No GPU
needed: the device run only has to bring back the CSV.

    nvcc -std=c++17 -O3 --expt-relaxed-constexpr -lineinfo -gencode=arch=compute_90a,code=sm_90a \\
        -I csrc/include -cubin -o /tmp/k.cubin kernel_instantiation.cu
    python bench/diag/ncu_sass_by_line.py --cubin /tmp/k.cubin --csv eff_source_sass.csv.gz \\
        --kernel _ZN9prunepath24expert_ffn_stream_kernelI13__nv_bfloat16Lb1EEEvNS_19ExpertFfnCudaParamsE
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
import os
import re
import shutil
import subprocess
import sys


def disassemble(cubin: str, kernel: str, nvdisasm: str) -> list[tuple[str, tuple[str, int] | None]]:
    """``(instruction, (file, line))`` of ``kernel`` in address order."""
    text = subprocess.run([nvdisasm, "-g", "-c", cubin], check=True, capture_output=True, text=True).stdout
    start = text.index(f".text.{kernel}:")
    end = text.find("//---------------------", start)
    where, out = None, []
    for line in text[start : end if end > 0 else len(text)].splitlines():
        m = re.match(r'\s*//## File "(.*)", line (\d+)', line)
        if m:
            where = (m.group(1), int(m.group(2)))
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            out.append((m.group(1).strip(), where))
    return out


def opcode(instruction: str) -> str:
    words = instruction.split()
    if not words:
        return ""
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cubin", required=True)
    ap.add_argument("--csv", required=True, help="ncu --page source --print-source sass --csv output (.gz or plain)")
    ap.add_argument("--kernel", required=True, help="mangled kernel name")
    ap.add_argument("--nvdisasm", default=shutil.which("nvdisasm") or "nvdisasm")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args(argv)
    opener = gzip.open if args.csv.endswith(".gz") else open
    with opener(args.csv, "rb") as f:
        rows = list(csv.reader(io.TextIOWrapper(f, "utf-8")))
    header = next(r for r in rows if "Source" in r and "Instructions Executed" in r)
    data = rows[rows.index(header) + 1 :]
    src, ex = header.index("Source"), header.index("Instructions Executed")
    stall = header.index("Warp Stall Sampling (All Samples)")
    local = disassemble(args.cubin, args.kernel, args.nvdisasm)
    if len(local) != len(data) or any(opcode(a) != opcode(b[src]) for (a, _), b in zip(local, data, strict=True)):
        sys.exit("the cubin's instructions differ from the profiled kernel's: rebuild with the device's nvcc and flags")

    def number(s: str) -> float:
        try:
            return float(s)
        except ValueError:
            return 0.0

    executed, stalls = collections.Counter(), collections.Counter()
    for (_, where), row in zip(local, data, strict=True):
        executed[where] += number(row[ex])
        stalls[where] += number(row[stall])
    total, total_stalls = sum(executed.values()), sum(stalls.values()) or 1.0
    lines: dict[str, list[str]] = {}
    print(f"{total / 1e6:.2f}M warp instructions executed; per source line (top {args.top}):")
    for where, n in executed.most_common(args.top):
        path, number_ = where if where else ("?", 0)
        if path not in lines:
            lines[path] = open(path).read().splitlines() if os.path.exists(path) else []
        text = lines[path][number_ - 1].strip() if 0 < number_ <= len(lines[path]) else "?"
        print(
            f"{n / 1e6:6.2f}M {n / total:6.1%} stalls {stalls[where] / total_stalls:6.1%}  "
            f"{os.path.basename(path)}:{number_}  {text[:90]}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
