#!/usr/bin/env bash
# Builds bench/diag/router_split.cu (nvcc, sm_90a, torch-free) into a binary to carry to the GPU
# machine: where the batch-1 fused router's time goes, variant by variant.
#   bash bench/diag/router_split.sh OUT_BINARY   # here (~1 min)
#   OUT_BINARY                                   # on the GPU machine (bench/gpu_call.sh routersplit)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
[[ $# -eq 1 ]] || { echo "usage: $0 OUT_BINARY"; exit 2; }
nvcc=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
[[ -x $nvcc ]] || nvcc=$(command -v nvcc)
"$nvcc" -gencode=arch=compute_90a,code=sm_90a -O3 -lineinfo -std=c++17 --expt-relaxed-constexpr \
  -I"$root/csrc/include" "$root/bench/diag/router_split.cu" -o "$1"
echo "built $1 (tree $(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet || echo +dirty))"
