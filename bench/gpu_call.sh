#!/usr/bin/env bash
# Device-tool calls: build once (cheap again on a warm machine), then the named parts, each under a
# timeout so what finished still comes back. Results land in $OUT/results, packed into $OUT/results.tgz
# after every part; copy them into bench/results/.
# Usage on the GPU machine: bash bench/gpu_call.sh tests e2e kvbench kvtests ffnsweep ffnbench ffntests topp ...
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
# Everything a part writes goes to $out (a folder under $OUT), packed after every part into
# $OUT/results.tgz: the device tool brings back at most 8 files, and a killed call keeps the parts
# that finished. $OUT/prebuilt_* (bench/gpu_build.sh) come back beside it.
OUT=${OUT:-/tmp/prunepath-gpu}
export OUT
out=$OUT/results
mkdir -p "$out"
pack() { tar -czf "$OUT/results.tgz" -C "$OUT" results; }
bash bench/gpu_build.sh > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; pack; exit 1; }
tail -3 "$out/build.log"
t() { local s=$1; shift; timeout "$s" "$@"; }
# pytest-xdist when its wheels were carried in .whl/ (not installed on the GPU machine; fetch them here with
# `pip download --no-deps --only-binary=:all: -d .whl pytest-xdist execnet`, carry [".whl"]): the test parts then
# run in XDIST processes (default 8) on the one GPU, which mostly spreads Triton's compilations over the CPU
# cores. Each process has its own CUDA context and caches, so no test sees another's state.
pytest_n=()
if compgen -G ".whl/pytest_xdist-*.whl" > /dev/null && compgen -G ".whl/execnet-*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_xdist \
    .whl/pytest_xdist-*.whl .whl/execnet-*.whl > /dev/null 2>&1 && export PYTHONPATH=$PYTHONPATH:/tmp/site_xdist
  python3 -c "import xdist" 2> /dev/null && pytest_n=(-n "${XDIST:-8}")
fi
# gguf too when carried (.whl/gguf-*.whl; the same --target), so the GGUF loader tests run instead of skipping.
if compgen -G ".whl/gguf-*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_xdist .whl/gguf-*.whl > /dev/null 2>&1
  [[ ":$PYTHONPATH:" == *":/tmp/site_xdist:"* ]] || export PYTHONPATH=$PYTHONPATH:/tmp/site_xdist
fi
echo "pytest: ${pytest_n[*]:-one process}" | tee -a "$out/build.log"
for part in "$@"; do
  start=$(date +%s)
  case "$part" in
    e2e) t ${E2E_TIMEOUT:-230} python3 bench/decode_e2e_gpu.py --opbyop --routerop --cublasproj --out "$out" > "$out/decode_e2e.log" 2>&1 ;;
    e2enorm) t ${E2E_TIMEOUT:-230} python3 bench/decode_e2e_gpu.py --routernorm --name decode_e2e_cuda_routernorm --out "$out" \
               > "$out/decode_e2e_routernorm.log" 2>&1 ;;
    e2echunks) for c in ${CHUNKS:-256 128 64}; do  # kv_decode_attention's MIN_CHUNK in the whole decode step
                 t ${E2E_TIMEOUT:-150} python3 bench/decode_e2e_gpu.py --fractions 0.3 --attn-min-chunk "$c" \
                   --name "decode_e2e_cuda_chunk$c" --out "$out" > "$out/decode_e2e_chunk$c.log" 2>&1; done ;;
    normfile) t 120 python3 -m pytest python_tests/test_norm_linear_topp_route.py -q -p no:cacheprovider \
                > "$out/gpu_tests_norm_file.log" 2>&1 ;;
    convert) t ${CONVERT_TIMEOUT:-300} python3 bench/convert_gpu.py --out "$out" > "$out/convert_gpu.log" 2>&1 ;;  # issue 5: k-means at 7B/70B shapes
    stashmodel) mkdir -p /tmp/prunepath_model && cp .qa/gguf_part_00 /tmp/prunepath_model/ ;;  # half 1: bench/quality_gpu.sh
    routersplit) t 90 .prebuilt/router_split > "$out/router_split.md" 2>&1 ;;  # built here first: bench/diag/router_split.sh
    readceiling) t 200 python3 bench/diag/read_ceiling.py --out "$out" > "$out/read_ceiling.log" 2>&1 ;;
    kvcases) t 150 python3 bench/kv_attention_gpu.py --out "$out" > "$out/kv_attention.log" 2>&1 ;;
    # The same table with every split plan from the lengths, or every one from S_max (triton_attention.SPLIT_BY_LENGTH)
    kvbylength) t 150 python3 bench/kv_attention_gpu.py --split-plan length --name kv_attention_cuda_by_length --out "$out" \
                  > "$out/kv_attention_by_length.log" 2>&1 ;;
    kvstatic) t 150 python3 bench/kv_attention_gpu.py --split-plan static --name kv_attention_cuda_static --out "$out" \
                > "$out/kv_attention_static.log" 2>&1 ;;
    e2ebylength) t ${E2E_TIMEOUT:-230} python3 bench/decode_e2e_gpu.py --attn-split-by-length --name decode_e2e_cuda_split_by_length \
                   --out "$out" > "$out/decode_e2e_by_length.log" 2>&1 ;;
    # The split plans part by part (bench/diag/kv_split_plan_parts.py: fill, PDL, the combine kernel)
    kvparts) t 200 python3 bench/diag/kv_split_plan_parts.py --out "$out" > "$out/kv_split_plan_parts.log" 2>&1 ;;
    # The same table and sweep on head-major caches ([B, Hkv, S_max, D] storage passed as a transposed view)
    kvhead) t 150 python3 bench/kv_attention_gpu.py --cache-layout head --sweep --name kv_attention_cuda_head_major --out "$out" \
              > "$out/kv_attention_head.log" 2>&1 ;;
    normtests) t ${NORMTESTS_TIMEOUT:-150} python3 -m pytest "${pytest_n[@]}" python_tests/test_norm_linear_topp_route.py python_tests/test_linear_topp_route.py \
                 python_tests/test_decode.py -q -p no:cacheprovider > "$out/gpu_tests_norm_route.log" 2>&1 ;;
    steptests) t ${STEPTESTS_TIMEOUT:-200} python3 -m pytest "${pytest_n[@]}" python_tests/test_decode_step.py python_tests/test_decode.py \
                 python_tests/test_linear_topp_route.py -q \
                 -p no:cacheprovider -k "not test_gpu_cuda_graph_generate_equals_eager" > "$out/gpu_tests_decode_step.log" 2>&1 ;;
    e2ecompiled) t 400 python3 bench/decode_e2e_gpu.py --compile --name decode_e2e_cuda_compiled --out "$out" \
                   > "$out/decode_e2e_compiled.log" 2>&1 ;;
    e2eboth) t ${E2E_TIMEOUT:-560} python3 bench/decode_e2e_gpu.py --compile-both --name decode_e2e_cuda --out "$out" \
               > "$out/decode_e2e.log" 2>&1 ;;
    kvbench) t 120 python3 bench/kv_attention_gpu.py --out "$out" --sweep > "$out/kv_attention.log" 2>&1 ;;
    kvtests) t ${KVTESTS_TIMEOUT:-240} python3 -m pytest "${pytest_n[@]}" python_tests/test_kv_decode_attention.py python_tests/test_decode.py \
               -q -p no:cacheprovider > "$out/gpu_tests_kv_decode.log" 2>&1 ;;
    ffnsweep) t 150 python3 bench/sparse_ffn_sweep.py --what decode --out "$out" > "$out/sweep.log" 2>&1 ;;
    ffntail) t 120 python3 bench/sparse_ffn_sweep.py --what decode --batches 1 --defaults-only --fractions 0.25 0.29 0.3 0.35 \
               --out "$out/tail" > "$out/sweep_tail.log" 2>&1 ;;
    ffnsweepall) t 300 python3 bench/sparse_ffn_sweep.py --what both --out "$out" > "$out/sweep.log" 2>&1 ;;
    ncudecode) for spec in "triton decode_expert_kernel|decode_reduce 2 2" "bulk decode_expert_bulk 2 1" "dense nvjet|gemv|gemm 3 3"; do
                 read -r which re skip count <<< "$spec"
                 t 120 ncu --clock-control none -k "regex:$re" --launch-skip "$skip" --launch-count "$count" --section SpeedOfLight \
                   --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats \
                   --section SchedulerStats python3 bench/diag/decode_expert_ncu.py --which "$which" > "$out/ncu_decode_$which.log" 2>&1
               done ;;
    ncueff) t 150 ncu --clock-control none -k "regex:expert_ffn|decode_expert_kernel|decode_reduce" --launch-skip 4 --launch-count 4 \
              --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
              --section LaunchStats python3 bench/diag/decode_expert_ncu.py --which "${NCU_WHICH:-cuda}" > "$out/ncu_expert_ffn.log" 2>&1 ;;
    ncutopp) t 200 ncu --clock-control none -k "regex:topp_route_lean" --launch-skip 1 --launch-count 1 --set full \
               python3 bench/diag/ncu_topp.py > "$out/ncu_topp_lean.log" 2>&1 ;;
    trace) t 150 python3 bench/diag/decode_expert_trace.py --out "$out" > "$out/decode_expert_trace.log" 2>&1 ;;
    prefilldiag) t ${PREFILLDIAG_TIMEOUT:-300} python3 bench/diag/prefill_up_diag.py --out "$out" > "$out/prefill_up_diag.log" 2>&1 ;;
    prefillhost) t 120 python3 bench/diag/prefill_host_overhead.py --out "$out" > "$out/prefill_host_overhead.log" 2>&1 ;;
    prefillclock) t 150 python3 bench/diag/prefill_clock_diag.py --out "$out" > "$out/prefill_clock_diag.log" 2>&1 ;;
    ncuup) t 200 ncu --clock-control none -k "regex:grouped_up_kernel" --launch-skip 2 --launch-count 1 --set full \
             python3 bench/diag/prefill_up_diag.py --ncu > "$out/ncu_prefill_up.log" 2>&1 ;;
    profile) t 180 python3 bench/diag/kernel_profile.py --out "$out" > "$out/kernel_profile.log" 2>&1 ;;
    ffnbench) t 240 python3 bench/sparse_ffn_gpu.py --out "$out" > "$out/sparse_ffn_gpu.log" 2>&1 ;;
    ffn8b) t 150 python3 bench/sparse_ffn_gpu.py --shapes llama3-8b --batches 1 4 16 --prefill 4096 \
             --name sparse_ffn_cuda_llama3_8b --out "$out" > "$out/sparse_ffn_gpu.log" 2>&1 ;;
    tests) t ${TESTS_TIMEOUT:-580} python3 -X faulthandler -m pytest "${pytest_n[@]}" python_tests -q -p no:cacheprovider --durations=25 \
             > "$out/gpu_tests.log" 2>&1 ;;
    # The GPU suite in three parts that each fit a call (session 17: without test_topp_route.py it took ~560 s):
    # testsrest, testsffn (test_sparse_ffn.py and test_train.py), topptests.
    testsrest) t ${TESTS_TIMEOUT:-480} python3 -X faulthandler -m pytest "${pytest_n[@]}" python_tests -q -p no:cacheprovider --durations=25 \
                 --ignore=python_tests/test_topp_route.py --ignore=python_tests/test_sparse_ffn.py \
                 --ignore=python_tests/test_train.py > "$out/gpu_tests_rest.log" 2>&1 ;;
    testsffn) t ${TESTS_TIMEOUT:-480} python3 -X faulthandler -m pytest "${pytest_n[@]}" python_tests/test_sparse_ffn.py python_tests/test_train.py \
                -q -p no:cacheprovider --durations=25 > "$out/gpu_tests_ffn_train.log" 2>&1 ;;
    routertests) t ${ROUTERTESTS_TIMEOUT:-150} python3 -m pytest "${pytest_n[@]}" python_tests/test_linear_topp_route.py python_tests/test_topp_route.py \
                   -q -p no:cacheprovider > "$out/gpu_tests_router.log" 2>&1 ;;
    routerbench) t 120 python3 bench/router_decode_gpu.py --out "$out" > "$out/router_decode.log" 2>&1 ;;
    gemvbench) t 120 python3 bench/decode_linear_gpu.py --out "$out" > "$out/decode_linear.log" 2>&1 ;;
    topptests) t ${TOPPTESTS_TIMEOUT:-300} python3 -m pytest "${pytest_n[@]}" python_tests/test_topp_route.py -x -q -p no:cacheprovider \
                 > "$out/gpu_tests_topp.log" 2>&1 ;;
    decodetests) t 90 python3 -m pytest python_tests/test_decode.py -q -p no:cacheprovider \
                   > "$out/gpu_tests_decode.log" 2>&1 ;;
    ffntestsgpu) t ${FFNTESTSGPU_TIMEOUT:-280} python3 -m pytest python_tests/test_sparse_ffn.py -q -p no:cacheprovider \
                  -k "test_gpu or edge_routings or tau_one or decode_chunked or both_oracles" > "$out/gpu_tests_ffn.log" 2>&1 ;;
    efftests) t ${EFFTESTS_TIMEOUT:-200} python3 -m pytest python_tests/test_sparse_ffn.py -q -p no:cacheprovider \
                -k "expert_ffn or test_gpu" > "$out/gpu_tests_expert_ffn_cuda.log" 2>&1 ;;
    ncueffsrc) t 200 ncu --clock-control none -k "regex:expert_ffn_(partial|stream)" --launch-skip 2 --launch-count 1 --set full \
                 --import-source yes -f -o "$out/eff_source" python3 bench/diag/decode_expert_ncu.py --which cuda \
                 > "$out/ncu_eff_run.log" 2>&1
               ncu -i "$out/eff_source.ncu-rep" --page source --csv --print-source sass | gzip > "$out/eff_source_sass.csv.gz"
               ncu -i "$out/eff_source.ncu-rep" --page details > "$out/ncu_eff_details.txt"; rm -f "$out/eff_source.ncu-rep" ;;
    steptimeline) t ${STEPTIMELINE_TIMEOUT:-240} python3 bench/diag/decode_step_timeline.py --out "$out" > "$out/decode_step_timeline.log" 2>&1 ;;
    densegroups) t ${DENSEGROUPS_TIMEOUT:-240} python3 bench/diag/dense_groups_prefill.py --out "$out" > "$out/dense_groups_prefill.log" 2>&1 ;;
    efftrace) t 240 python3 bench/diag/expert_ffn_trace.py --out "$out" > "$out/expert_ffn_trace.log" 2>&1 ;;
    effsweep) t 200 python3 bench/diag/expert_ffn_cuda_sweep.py --out "$out" > "$out/expert_ffn_cuda_sweep.log" 2>&1 ;;
    densetests) t ${DENSETESTS_TIMEOUT:-150} python3 -m pytest python_tests/test_sparse_ffn.py -k dense_group -q -p no:cacheprovider \
                  > "$out/gpu_tests_dense_groups.log" 2>&1 ;;
    ffntests) t ${FFNTESTS_TIMEOUT:-240} python3 -m pytest "${pytest_n[@]}" python_tests/test_sparse_ffn.py -q -p no:cacheprovider > "$out/gpu_tests_ffn.log" 2>&1 ;;
    toppvariants) t 300 python3 bench/topp_route_gpu.py --variants auto,warp,lean,rank,block --out "$out" \
                    > "$out/topp_route_gpu.log" 2>&1 ;;
    toppcheck) t 120 python3 bench/diag/topp_variants_check.py > "$out/topp_variants_check.log" 2>&1 ;;
    toppleanab) t 240 python3 bench/topp_route_gpu.py --variants lean,lean_prefetch --T 4096 65536 --E 448 1024 --no-extras \
                  --name topp_route_cuda_lean_ab --out "$out" > "$out/topp_route_lean_ab.log" 2>&1 ;;
    toppab) t 120 .prebuilt/topp_lean_ab > "$out/topp_lean_ab.txt" 2>&1 ;;  # built here first: bench/diag/topp_lean_ab.sh
    topp) t 200 python3 bench/topp_route_gpu.py --out "$out" > "$out/topp_route_gpu.log" 2>&1 ;;
    *) echo "unknown part $part"; continue ;;
  esac
  echo "== $part rc=$? in $(( $(date +%s) - start )) s"
  pack
done
