#!/usr/bin/env bash
# Builds and runs the CPU SIMT-emulator check of the topp_route kernels (no GPU):
# warp vs lean (+ deferred) vs rank, bit for bit, and against the CPU kernel.
#   bench/diag/topp_route_emu.sh [REPS] [stride|bench]   # REPS x 54 random problems; ~15 s per rep on 2 cores
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cuda=${CUDA_HOME:-/usr/local/cuda}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
g++ -std=c++20 -O1 -ffp-contract=off -Wno-attributes -Wno-unknown-pragmas -I"$cuda/include" \
  -I"$root/csrc/include" -I"$root/bench/diag" "$root/bench/diag/topp_route_emu.cpp" -o "$tmp/topp_route_emu"
"$tmp/topp_route_emu" "$@"
