// Argument validation shared by the CPU and CUDA decode_gemv: every check runs
// before any kernel does.
#pragma once

#include <ATen/core/Tensor.h>

namespace prunepath {

// x [B, K] float32/float16/bfloat16 with a unit inner stride, weight [N, K]
// contiguous in the dtype of x, on the device of x; N and K below 2^31.
void check_decode_gemv_inputs(const at::Tensor& x, const at::Tensor& weight);

// A checked call: the sizes, x's row stride in elements and the allocated output.
struct DecodeGemvCall {
  int64_t B, K, N;
  int64_t x_stride;  // x.stride(0), or K for a single row (whose stride may be anything)
  at::Tensor y;      // [B, N] in the dtype of x, uninitialised
};

// Checks the inputs (check_decode_gemv_inputs) and allocates y on x's device.
DecodeGemvCall prepare_decode_gemv(const at::Tensor& x, const at::Tensor& weight);

}  // namespace prunepath
