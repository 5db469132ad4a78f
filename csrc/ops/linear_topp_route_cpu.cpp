// CPU glue for linear_topp_route: the composition it fuses on the GPU,
// at::linear (output in the dtype of x) then the CPU router.
#include <ATen/ops/add.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/rms_norm.h>

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

// The composition the CUDA kernel fuses, in the numerics of add_rms_norm's reference
// (prunepath_ops.reference.add_rms_norm): h = x + residual in the dtype, the norm in fp32,
// cast back, times the weight in the dtype.
NormRouteOutputs norm_linear_topp_route_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                            const at::Tensor& norm_weight, double eps,
                                            const at::Tensor& weight, double tau,
                                            const std::optional<at::Tensor>& tau_per_token,
                                            int64_t min_experts, std::optional<int64_t> max_experts,
                                            c10::string_view gate, const std::optional<at::Tensor>& tickets,
                                            bool pdl) {
  PRUNEPATH_CHECK_VALUE(x.device().is_cpu(), "norm_linear_topp_route_cpu: x must be on the CPU; got ",
                        x.device());
  check_norm_linear_topp_route_inputs(x, residual, norm_weight, eps, weight, tickets);
  at::Tensor h = residual.has_value() ? at::add(x, *residual) : x.clone();  // [T, d]
  at::Tensor y =
      at::rms_norm(h.to(at::kFloat), {h.size(1)}, std::nullopt, eps).to(h.scalar_type()).mul(norm_weight);
  auto [logits, expert_ids, gates, num_active] =
      linear_topp_route_cpu(y, weight, tau, tau_per_token, min_experts, max_experts, gate, tickets, pdl);
  return {y, h, logits, expert_ids, gates, num_active};
}

}  // namespace prunepath
