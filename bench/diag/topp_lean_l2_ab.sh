#!/usr/bin/env bash
# Builds (nvcc, sm_90a, torch-free, ~30 s) and runs bench/diag/topp_lean_l2_ab.cu on the GPU machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
nvcc=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
[[ -x $nvcc ]] || nvcc=$(command -v nvcc)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$nvcc" -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++20 --expt-relaxed-constexpr -I"$root/csrc/include" \
  "$root/bench/diag/topp_lean_l2_ab.cu" -o "$tmp/ab"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
"$tmp/ab"
