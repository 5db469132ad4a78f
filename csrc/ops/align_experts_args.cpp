#include "align_experts_args.h"

#include <ATen/ATen.h>

#include <limits>

#include "check.h"

namespace prunepath {

AlignCall prepare_align_experts(const at::Tensor& expert_ids, const at::Tensor& num_active,
                                int64_t num_experts, int64_t block_m) {
  PRUNEPATH_CHECK_VALUE(expert_ids.dim() == 2, "align_experts: expert_ids must be 2-D [T, K]; got shape ",
                        expert_ids.sizes());
  PRUNEPATH_CHECK_TYPE(expert_ids.scalar_type() == at::kInt && num_active.scalar_type() == at::kInt,
                       "align_experts: expert_ids and num_active must be int32; got ",
                       expert_ids.scalar_type(), " and ", num_active.scalar_type());
  const int64_t T = expert_ids.size(0);
  const int64_t K = expert_ids.size(1);
  PRUNEPATH_CHECK_VALUE(num_active.dim() == 1 && num_active.size(0) == T,
                        "align_experts: num_active must have shape [T] = [", T, "]; got ",
                        num_active.sizes());
  PRUNEPATH_CHECK_VALUE(num_active.device() == expert_ids.device(), "align_experts: num_active is on ",
                        num_active.device(), " but expert_ids are on ", expert_ids.device());
  PRUNEPATH_CHECK_VALUE(num_experts >= 1 && num_experts <= std::numeric_limits<int32_t>::max() / 2,
                        "align_experts: num_experts must be >= 1; got ", num_experts);
  PRUNEPATH_CHECK_VALUE(block_m >= 1 && block_m <= 4096, "align_experts: block_m must lie in [1, 4096]; got ",
                        block_m);
  const int64_t max_blocks = align_max_blocks(T * K, num_experts, block_m);
  PRUNEPATH_CHECK_VALUE(max_blocks * block_m < std::numeric_limits<int32_t>::max(),
                        "align_experts: T * K = ", T * K, " pairs do not fit int32 row indices");

  AlignCall call;
  call.expert_ids = expert_ids.contiguous();
  call.num_active = num_active.contiguous();
  const auto opts = expert_ids.options().dtype(at::kInt);
  call.sorted_pairs = at::empty({max_blocks * block_m}, opts);
  call.block_expert = at::empty({max_blocks}, opts);
  call.expert_offsets = at::empty({num_experts + 1}, opts);
  call.expert_counts = at::empty({num_experts}, opts);

  AlignParams& p = call.params;
  p.num_tokens = T;
  p.k = static_cast<int32_t>(K);
  p.num_experts = static_cast<int32_t>(num_experts);
  p.block_m = static_cast<int32_t>(block_m);
  p.max_rows = max_blocks * block_m;
  p.max_blocks = max_blocks;
  p.expert_ids = call.expert_ids.data_ptr<int32_t>();
  p.num_active = call.num_active.data_ptr<int32_t>();
  p.sorted_pairs = call.sorted_pairs.data_ptr<int32_t>();
  p.block_expert = call.block_expert.data_ptr<int32_t>();
  p.expert_offsets = call.expert_offsets.data_ptr<int32_t>();
  p.expert_counts = call.expert_counts.data_ptr<int32_t>();
  return call;
}

}  // namespace prunepath
