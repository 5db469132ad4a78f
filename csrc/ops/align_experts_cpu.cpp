// CPU glue for align_experts: one sequential counting sort (memory-bound and
// small next to the GEMMs it feeds, so not parallelised).
#include "align_experts_args.h"
#include "check.h"
#include "ops.h"

namespace prunepath {

AlignOutputs align_experts_cpu(const at::Tensor& expert_ids, const at::Tensor& num_active,
                               int64_t num_experts, int64_t block_m) {
  PRUNEPATH_CHECK_VALUE(expert_ids.device().is_cpu(),
                        "align_experts_cpu: expert_ids must be on the CPU; got ", expert_ids.device());
  AlignCall call = prepare_align_experts(expert_ids, num_active, num_experts, block_m);
  const int64_t bad = align_experts_cpu(call.params);
  PRUNEPATH_CHECK_VALUE(bad < 0, "align_experts: active slot ", bad, " (t * K + j) holds expert id ",
                        bad < 0 ? 0 : call.params.expert_ids[bad], " outside [0, ", num_experts, ")");
  return {call.sorted_pairs, call.block_expert, call.expert_offsets, call.expert_counts};
}

}  // namespace prunepath
