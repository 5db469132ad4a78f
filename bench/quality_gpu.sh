#!/usr/bin/env bash
# Issue 5's quality report on the GPU machine (device tool): convert SmolLM2-135M-Instruct, train
# routers and backbone with one or more recipes, sweep tau / top-k / static pruning on the whole
# last 20 % of wikitext-2's valid.txt, and bring the tables and plots back.
#
# The model (98 MB) is larger than what one device call carries (64 MiB), so it travels in two
# halves. Prepare them here (.qa, .qb and .whl are git-ignored):
#   m=$(python -c 'from prunepath_ops.models import default_model_path as p; print(p())')
#   mkdir -p .qa .qb && split -n 2 -d "$m" /tmp/gguf_part_ && mv /tmp/gguf_part_00 .qa/ && mv /tmp/gguf_part_01 .qb/
#   sha256sum "$m" | cut -c1-64 > .qb/sha256 && cp ../shared/data/wikitext-2/valid.txt .qb/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl gguf==0.19.0      # gguf is not installed there
# then, on a machine that stays warm between the two calls (the device releases it after 30 s idle):
#   call 1: carry [".qa", ...]        bash bench/gpu_call.sh stashmodel ...   (half 1 -> /tmp/prunepath_model)
#   call 2: carry [".qb", ".whl"]     bash bench/quality_gpu.sh RECIPE...
# Later calls on the same machine find the joined model, the converted checkpoint and the build.
# RECIPE names are below; each trains from the same converted checkpoint. Results: $OUT/results.tgz.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/prunepath-quality}
out=$OUT/results/quality
mkdir -p "$out"
pack() { tar -czf "$OUT/results.tgz" -C "$OUT" results; }
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$out/quality_gpu.log"; }

stash=/tmp/prunepath_model
model=$stash/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ ! -f $model ]]; then
  [[ -f $stash/gguf_part_00 ]] || { log "half 1 missing in $stash (run the stashmodel part first)"; pack; exit 1; }
  cat "$stash/gguf_part_00" .qb/gguf_part_01 > "$model"
fi
[[ "$(sha256sum "$model" | cut -c1-64)" == "$(cat .qb/sha256)" ]] || { log "model sha256 mismatch"; rm -f "$model"; pack; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
# TF32 tensor cores for the fp32 model's matmuls (training and evaluation alike).
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
bash bench/gpu_build.sh > "$out/build.log" 2>&1 || { tail -20 "$out/build.log"; pack; exit 1; }
head -3 "$out/build.log" | tee -a "$out/quality_gpu.log"
echo "sources: $(git rev-parse --short HEAD 2>/dev/null) (device copy; see the results README for the commit)" >> "$out/quality_gpu.log"

text=.qb/valid.txt
work=/tmp/prunepath_quality
mkdir -p "$work"
# `timeout` runs programs, not shell functions: pp is an array, the common options come last.
pp=(python3 -m prunepath_ops)
opts=(--model "$model" --text "$text" --no-progress --device cuda)
timed() { local s=$1 name=$2; shift 2; local t0; t0=$(date +%s); log "start $name: $*"
  timeout "$s" "$@" > "$out/$name.log" 2>&1; local rc=$?; log "end $name rc=$rc in $(( $(date +%s) - t0 )) s"; pack; return $rc; }

EVAL_TAUS=${EVAL_TAUS:-0.98,0.95,0.9,0.85,0.8,0.75,0.7,0.65,0.6,0.5}
EVAL_KS=${EVAL_KS:-34,24,14,10}
EVAL_STATIC=${EVAL_STATIC:-0.3,0.5,0.7,0.8}
STEPS=${STEPS:-400}
SEED=${SEED:-0}  # the training windows' sampler (and uniform tau draws)
common_train=(--gate one --straight-through --train-backbone --steps "$STEPS" --seq-len 512 --batch-size 8 --seed "$SEED")

evaluate() {  # evaluate NAME CHECKPOINT
  timed "${EVAL_TIMEOUT:-200}" "eval_$1" "${pp[@]}" eval --checkpoint "$2" --taus "$EVAL_TAUS" --ks "$EVAL_KS" \
    --static-fractions "$EVAL_STATIC" --batch-size 16 --out-dir "$work/eval_$1" "${opts[@]}"
  for f in sweep.md sweep.csv sweep.png; do cp "$work/eval_$1/$f" "$out/$1_$f" 2>/dev/null; done
  pack
}

if [[ ! -f $work/ckpt/prunepath_config.json ]]; then
  timed 240 convert "${pp[@]}" convert --out "$work/ckpt" "${opts[@]}" || exit 1
fi
if [[ ! -f $out/dense_sweep.md ]]; then
  timed 120 eval_dense "${pp[@]}" eval --static-fractions "" --batch-size 16 --out-dir "$work/eval_dense" "${opts[@]}"
  cp "$work/eval_dense/sweep.md" "$out/dense_sweep.md" 2>/dev/null
fi
for recipe in "$@"; do
  case "$recipe" in
    # distillation from the dense model (half of the task loss), tau drawn in [0.5, 1] per step
    kd05uni) extra=(--distill 0.5 --tau-sampling uniform --tau-min 0.5 --lr-backbone 5e-5) ;;
    # the same without distillation (cross-entropy only)
    ce_uni) extra=(--tau-sampling uniform --tau-min 0.5 --lr-backbone 5e-5) ;;
    # pure distillation
    kd10uni) extra=(--distill 1.0 --tau-sampling uniform --tau-min 0.5 --lr-backbone 5e-5) ;;
    # kd05uni for 1,000 steps with validation on the tail of the training text, the best weights kept
    kd05uni_es) extra=(--distill 0.5 --tau-sampling uniform --tau-min 0.5 --lr-backbone 5e-5 --steps 1000
                       --eval-every 50 --val-fraction 0.1) ;;
    # the same, validated at the tau that gives s_FFN 0.5 on the held-out text (fixed sparsity, not fixed tau)
    kd05uni_es50) extra=(--distill 0.5 --tau-sampling uniform --tau-min 0.5 --lr-backbone 5e-5 --steps 1000
                         --eval-every 50 --val-fraction 0.1 --val-sparsities 0.5) ;;
    # the linear schedule of the paper down to 0.6, with distillation
    kd05lin) extra=(--distill 0.5 --tau-min 0.6 --lr-backbone 5e-5) ;;
    *) log "unknown recipe $recipe"; continue ;;
  esac
  timed "${TRAIN_TIMEOUT:-240}" "train_$recipe" "${pp[@]}" train --checkpoint "$work/ckpt" --out "$work/ckpt_$recipe" \
    "${common_train[@]}" "${extra[@]}" "${opts[@]}" || continue
  tail -3 "$out/train_$recipe.log" | cut -c1-400 | tee -a "$out/quality_gpu.log"
  cp "$work/ckpt_$recipe/train_history.json" "$out/train_history_$recipe.json" 2>/dev/null
  evaluate "$recipe" "$work/ckpt_$recipe"
done
log "done"
pack
