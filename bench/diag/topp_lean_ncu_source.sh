#!/usr/bin/env bash
# Per-source-line Nsight Compute profile of the default lean topp_route kernel (E = 448, bf16,
# T = 65536) on the GPU machine, run on the A/B binary of bench/diag/topp_lean_ab.sh (built with
# -lineinfo): profiles the first launch of this tree's default 16-item bf16 kernel, and writes
# the source page (CUDA lines and SASS, with executed instructions, stall samples and shared
# wavefronts per line) as CSV under $OUT (default /tmp).
#   bash bench/diag/topp_lean_ncu_source.sh A/B-binary
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-/tmp}
bin=${1:?usage: topp_lean_ncu_source.sh A/B-binary (built by bench/diag/topp_lean_ab.sh)}
ncu --clock-control none --kernel-name-base mangled -k "regex:topp_route_lean_kernelILi16ELb1ELb0E" --launch-count 1 --set full \
  --import-source yes -f -o "$out/topp_lean_source" "$bin" > "$out/topp_lean_ncu_run.log" 2>&1
ncu -i "$out/topp_lean_source.ncu-rep" --page source --csv --print-source cuda > "$out/topp_lean_source_cuda.csv"
ncu -i "$out/topp_lean_source.ncu-rep" --page source --csv --print-source sass > "$out/topp_lean_source_sass.csv"
ncu -i "$out/topp_lean_source.ncu-rep" --page details > "$out/topp_lean_details.txt"
wc -l "$out"/topp_lean_source_*.csv
