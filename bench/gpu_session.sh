#!/usr/bin/env bash
# One device-tool call: build, GPU test suite, benchmarks; everything lands in $OUT
# (copy it into bench/results/ afterwards). Usage on the GPU machine:
#   bash bench/gpu_session.sh [tests|topp|ffn|all] ...
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/prunepath-gpu}
mkdir -p "$out"
bash bench/gpu_build.sh > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
tail -4 "$out/build.log"
for what in "${@:-all}"; do
  case "$what" in
    tests|all)
      python3 -X faulthandler -m pytest python_tests -q -p no:cacheprovider > "$out/gpu_tests.log" 2>&1
      echo "tests rc=$?"; tail -3 "$out/gpu_tests.log"; grep -E "^(FAILED|ERROR)" "$out/gpu_tests.log" | head -20 ;;&
    topp|all)
      python3 bench/topp_route_gpu.py --out "$out" > "$out/topp_route_gpu.log" 2>&1
      echo "topp rc=$?"; tail -25 "$out/topp_route_gpu.log" ;;&
    ffn|all)
      python3 bench/sparse_ffn_gpu.py --out "$out" ${FFN_ARGS:-} > "$out/sparse_ffn_gpu.log" 2>&1
      echo "ffn rc=$?"; tail -40 "$out/sparse_ffn_gpu.log" ;;
  esac
done
