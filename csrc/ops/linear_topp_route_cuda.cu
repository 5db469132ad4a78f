// CUDA glue for linear_topp_route and norm_linear_topp_route: checks, device
// guard, ticket scratch, current stream, launch.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <limits>

#include "check.h"
#include "linear_topp_route_args.h"
#include "ops.h"
#include "prunepath/linear_topp_route.cuh"
#include "topp_route_args.h"

namespace prunepath {

namespace {

// Both ops after their checks: allocates the routing outputs, fills the rest of `p` and launches.
// `p` arrives zeroed, or with the norm's fields set (norm_linear_topp_route).
LinearRouteOutputs launch_route(const at::Tensor& x, const at::Tensor& weight, double tau,
                                const std::optional<at::Tensor>& tau_per_token, int64_t min_experts,
                                std::optional<int64_t> max_experts, c10::string_view gate,
                                const std::optional<at::Tensor>& tickets, bool pdl, LinearRouteParams p,
                                const char* op) {
  const int64_t T = x.size(0);
  const int64_t E = weight.size(0);
  const int64_t d = x.size(1);
  PRUNEPATH_CHECK_VALUE(E >= 1 && E <= kLinearRouteMaxExperts, op,
                        ": the CUDA kernel handles 1 <= E <= ", kLinearRouteMaxExperts, "; got E = ", E,
                        " (route F.linear's output with topp_route instead)");
  PRUNEPATH_CHECK_VALUE(d <= std::numeric_limits<int32_t>::max() && T * E < (int64_t{1} << 31), op,
                        ": T = ", T, ", d = ", d, " is too large for the CUDA kernel");
  at::Tensor logits = at::empty({T, E}, x.options());
  // Validates tau, min/max_experts and gate, and allocates the routing outputs.
  ToppRouteCall call = prepare_topp_route(logits, tau, tau_per_token, min_experts, max_experts, gate);
  if (T == 0) return {logits, call.expert_ids, call.gates, call.num_active};
  at::Tensor counters = tickets.has_value() ? *tickets : at::zeros({T}, x.options().dtype(at::kInt));

  p.x = x.data_ptr();
  p.x_stride = T > 1 ? x.stride(0) : d;
  p.weight = weight.data_ptr();
  p.hidden = static_cast<int32_t>(d);
  p.logits = logits.data_ptr();
  p.tickets = reinterpret_cast<uint32_t*>(counters.data_ptr<int32_t>());
  p.route = call.params;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; };
  LogitDType dtype = LogitDType::kFloat32;
  if (x.scalar_type() == at::kHalf) dtype = LogitDType::kFloat16;
  if (x.scalar_type() == at::kBFloat16) dtype = LogitDType::kBFloat16;
  const int64_t elems = 16 / static_cast<int64_t>(x.element_size());
  // The norm's residual and weight are read an element at a time: only x and weight count here.
  const bool vec = d % elems == 0 && p.x_stride % elems == 0 && aligned(p.x) && aligned(p.weight);
  const cudaError_t err = launch_linear_topp_route(p, dtype, vec, pdl, at::cuda::getCurrentCUDAStream());
  PRUNEPATH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
  return {logits, call.expert_ids, call.gates, call.num_active};
}

}  // namespace

LinearRouteOutputs linear_topp_route_cuda(const at::Tensor& x, const at::Tensor& weight, double tau,
                                          const std::optional<at::Tensor>& tau_per_token, int64_t min_experts,
                                          std::optional<int64_t> max_experts, c10::string_view gate,
                                          const std::optional<at::Tensor>& tickets, bool pdl) {
  PRUNEPATH_CHECK_VALUE(x.is_cuda(), "linear_topp_route_cuda: x must be a CUDA tensor; got ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  check_linear_topp_route_inputs(x, weight, tickets);
  return launch_route(x, weight, tau, tau_per_token, min_experts, max_experts, gate, tickets, pdl,
                      LinearRouteParams{}, "linear_topp_route");
}

NormRouteOutputs norm_linear_topp_route_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                             const at::Tensor& norm_weight, double eps,
                                             const at::Tensor& weight, double tau,
                                             const std::optional<at::Tensor>& tau_per_token,
                                             int64_t min_experts, std::optional<int64_t> max_experts,
                                             c10::string_view gate, const std::optional<at::Tensor>& tickets,
                                             bool pdl) {
  PRUNEPATH_CHECK_VALUE(x.is_cuda(), "norm_linear_topp_route_cuda: x must be a CUDA tensor; got ",
                        x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  check_norm_linear_topp_route_inputs(x, residual, norm_weight, eps, weight, tickets);
  at::Tensor h = at::empty_like(x);  // [T, d] contiguous, as x
  at::Tensor y = at::empty_like(x);
  LinearRouteParams p{};
  p.residual = residual.has_value() ? residual->data_ptr() : nullptr;
  p.norm_weight = norm_weight.data_ptr();
  p.norm_eps = static_cast<float>(eps);
  p.h_out = h.data_ptr();
  p.y_out = y.data_ptr();
  auto [logits, expert_ids, gates, num_active] =
      launch_route(x, weight, tau, tau_per_token, min_experts, max_experts, gate, tickets, pdl, p,
                   "norm_linear_topp_route");
  return {y, h, logits, expert_ids, gates, num_active};
}

}  // namespace prunepath
