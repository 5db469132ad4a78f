// Argument validation shared by the CPU and CUDA expert_ffn: every check runs
// before any kernel does. Expert ids are data: the CPU kernel checks them, the
// CUDA kernel ignores an out-of-range id (it cannot raise without a host sync).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>

#include "prunepath/ffn_activation.h"

namespace prunepath {

struct ExpertFfnShape {
  int64_t T, d, K, E, S;
  FfnActivation act;
};

// Shapes, dtypes and the activation name of an expert_ffn call (devices are the
// caller's): x [T, d] float32/float16/bfloat16; expert_ids [T, K] int32; gates
// [T, K] float32; num_active [T] int32; w_in [E, 2S or S, d], w_down [E, S, d],
// b_in [E, S] (plain only), b_out [d] in the dtype of x.
ExpertFfnShape check_expert_ffn_inputs(const at::Tensor& x, const at::Tensor& expert_ids,
                                       const at::Tensor& gates, const at::Tensor& num_active,
                                       const at::Tensor& w_in, const std::optional<at::Tensor>& b_in,
                                       const at::Tensor& w_down, const std::optional<at::Tensor>& b_out,
                                       bool gated, c10::string_view act);

}  // namespace prunepath
