#!/usr/bin/env bash
# One device-tool call for the routed FFN: build, GPU tests of topp_route, tile sweep.
# Usage on the GPU machine: bash bench/gpu_call_ffn.sh   (results under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/prunepath-gpu}
mkdir -p "$out"
bash bench/gpu_build.sh > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
tail -4 "$out/build.log"
timeout 150 python3 -m pytest python_tests/test_topp_route.py -q -p no:cacheprovider -x > "$out/gpu_tests_topp.log" 2>&1
echo "tests rc=$?"; tail -2 "$out/gpu_tests_topp.log"; grep -E "^(FAILED|ERROR)" "$out/gpu_tests_topp.log" | head
timeout 300 python3 bench/sparse_ffn_sweep.py --out "$out" > "$out/sweep.log" 2>&1
echo "sweep rc=$?"; grep -E "^\| (decode|prefill)" "$out/sweep.log" | sort -t'|' -k3,3n -k6,6n | head -80
grep -i error "$out/sweep.log" | head -5
