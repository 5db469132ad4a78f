#!/usr/bin/env bash
# Builds bench/diag/topp_lean_ab.cu (nvcc, sm_90a, torch-free): the lean topp_route kernel of this
# tree (with and without its L2 prefetch, and at other prefetch distances) against the lean kernel
# of a baseline commit's headers, all in one binary, timed interleaved. Build where git is current
# (the device copy's .git can be stale), carry the binary, run it on the GPU machine.
#   bash bench/diag/topp_lean_ab.sh build BASE_REV OUT_BINARY   # here, ~3 min on 2 cores
#   OUT_BINARY                                                  # on the GPU machine
# TREE_NVCC_FLAGS (optional) go to this tree's compile only, e.g. -DPRUNEPATH_ROUTER_EXPF.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
[[ ${1:-} == build && $# -eq 3 ]] || { echo "usage: $0 build BASE_REV OUT_BINARY"; exit 2; }
base_rev=$2
bin=$3
nvcc=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
[[ -x $nvcc ]] || nvcc=$(command -v nvcc)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/base/prunepath"
for f in $(git -C "$root" ls-tree --name-only "$base_rev" csrc/include/prunepath/); do
  git -C "$root" show "$base_rev:$f" > "$tmp/base/prunepath/$(basename "$f")"
done
flags=(-gencode=arch=compute_90a,code=sm_90a -O3 -lineinfo -std=c++20 --expt-relaxed-constexpr)
"$nvcc" "${flags[@]}" -Dprunepath=prunepath_base -I"$tmp/base" -c "$root/bench/diag/topp_lean_ab_base.cu" \
  -o "$tmp/base.o" &
"$nvcc" "${flags[@]}" ${TREE_NVCC_FLAGS:-} -DPRUNEPATH_AB_BASE="\"$(git -C "$root" rev-parse --short "$base_rev")\"" \
  -I"$root/csrc/include" -c "$root/bench/diag/topp_lean_ab.cu" -o "$tmp/ab.o"
wait
"$nvcc" "${flags[@]}" "$tmp/ab.o" "$tmp/base.o" -o "$bin"
echo "built $bin (tree $(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet || echo +dirty), base $base_rev)"
