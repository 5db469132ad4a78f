// Argument validation and output allocation shared by the CPU and CUDA align_experts.
#pragma once

#include <ATen/core/Tensor.h>

#include "prunepath/align_experts.h"

namespace prunepath {

struct AlignCall {
  at::Tensor expert_ids, num_active;  // inputs, contiguous
  at::Tensor sorted_pairs, block_expert, expert_offsets, expert_counts;
  AlignParams params;
};

AlignCall prepare_align_experts(const at::Tensor& expert_ids, const at::Tensor& num_active,
                                int64_t num_experts, int64_t block_m);

}  // namespace prunepath
