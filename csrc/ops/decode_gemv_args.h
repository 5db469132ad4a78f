// Argument validation shared by the CPU and CUDA decode_gemv: every check runs
// before any kernel does.
#pragma once

#include <ATen/core/Tensor.h>

namespace prunepath {

// x [B, K] float32/float16/bfloat16 with a unit inner stride, weight [N, K]
// contiguous in the dtype of x, on the device of x; N and K below 2^31.
void check_decode_gemv_inputs(const at::Tensor& x, const at::Tensor& weight);

}  // namespace prunepath
