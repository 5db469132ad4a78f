// Pieces shared by the CUDA top-p router kernels. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "prunepath/routing_common.h"

namespace prunepath {

enum class LogitDType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest expert count the CUDA router handles (the CPU router has no limit).
constexpr int32_t kToppRouteCudaMaxExperts = 4096;
// Up to this many experts one warp routes a token with the whole row in registers.
constexpr int32_t kToppRouteWarpMaxExperts = 1024;

namespace detail {

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct MinOp {
  __device__ __forceinline__ int32_t operator()(int32_t a, int32_t b) const { return a < b ? a : b; }
};

// The dtype switch is uniform across a launch; keeping it at run time costs
// nothing measurable and avoids three copies of every sort instantiation.
__device__ __forceinline__ float load_logit(const void* logits, int64_t offset, LogitDType dtype) {
  switch (dtype) {
    case LogitDType::kFloat16: return __half2float(static_cast<const __half*>(logits)[offset]);
    case LogitDType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(logits)[offset]);
    default: return static_cast<const float*>(logits)[offset];
  }
}

// The same through L2 only (ld.global.cg): for logits written by other blocks
// of the running kernel, which this SM's L1 must not serve.
__device__ __forceinline__ float load_logit_cg(const void* logits, int64_t offset, LogitDType dtype) {
  switch (dtype) {
    case LogitDType::kFloat16: return __half2float(__ldcg(static_cast<const __half*>(logits) + offset));
    case LogitDType::kBFloat16:
      return __bfloat162float(__ldcg(static_cast<const __nv_bfloat16*>(logits) + offset));
    default: return __ldcg(static_cast<const float*>(logits) + offset);
  }
}

}  // namespace detail

}  // namespace prunepath
