#!/usr/bin/env bash
# Builds the CUDA extension in place on the GPU machine (device tool) and prints
# the versions that results files must record. Usage: bash bench/gpu_build.sh
set -euo pipefail
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import torch, triton, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
nvcc --version | tail -1
start=$(date +%s)
PRUNEPATH_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=${MAX_JOBS:-16} \
  python3 -m pip install --no-build-isolation --no-deps --no-index -q -e . 2>&1 | grep -v -i "warning" || true
python3 -c 'import prunepath_ops; print("backends", prunepath_ops.backends())'
echo "build took $(( $(date +%s) - start )) s"
