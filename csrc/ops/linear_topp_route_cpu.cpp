// CPU glue for linear_topp_route: the composition it fuses on the GPU,
// at::linear (output in the dtype of x) then the CPU router.
#include <ATen/ops/linear.h>

#include "check.h"
#include "linear_topp_route_args.h"
#include "ops.h"

namespace prunepath {

LinearRouteOutputs linear_topp_route_cpu(const at::Tensor& x, const at::Tensor& weight, double tau,
                                         const std::optional<at::Tensor>& tau_per_token, int64_t min_experts,
                                         std::optional<int64_t> max_experts, c10::string_view gate,
                                         const std::optional<at::Tensor>& tickets, bool /*pdl*/) {
  PRUNEPATH_CHECK_VALUE(x.device().is_cpu(), "linear_topp_route_cpu: x must be on the CPU; got ", x.device());
  check_linear_topp_route_inputs(x, weight, tickets);
  at::Tensor logits = at::linear(x, weight);  // [T, E]
  auto [expert_ids, gates, num_active] =
      topp_route_cpu(logits, tau, tau_per_token, min_experts, max_experts, gate);
  return {logits, expert_ids, gates, num_active};
}

}  // namespace prunepath
