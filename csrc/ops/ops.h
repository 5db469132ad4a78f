// Declarations of every op implementation, bound in csrc/torch_bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace prunepath {

using RouteOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

RouteOutputs topp_route_cpu(const at::Tensor& logits, double tau,
                            const std::optional<at::Tensor>& tau_per_token, int64_t min_experts,
                            std::optional<int64_t> max_experts, c10::string_view gate);

#ifdef PRUNEPATH_WITH_CUDA
RouteOutputs topp_route_cuda(const at::Tensor& logits, double tau,
                             const std::optional<at::Tensor>& tau_per_token, int64_t min_experts,
                             std::optional<int64_t> max_experts, c10::string_view gate);
#endif

using LinearRouteOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

LinearRouteOutputs linear_topp_route_cpu(const at::Tensor& x, const at::Tensor& weight, double tau,
                                         const std::optional<at::Tensor>& tau_per_token, int64_t min_experts,
                                         std::optional<int64_t> max_experts, c10::string_view gate,
                                         const std::optional<at::Tensor>& tickets, bool pdl);

#ifdef PRUNEPATH_WITH_CUDA
LinearRouteOutputs linear_topp_route_cuda(const at::Tensor& x, const at::Tensor& weight, double tau,
                                          const std::optional<at::Tensor>& tau_per_token, int64_t min_experts,
                                          std::optional<int64_t> max_experts, c10::string_view gate,
                                          const std::optional<at::Tensor>& tickets, bool pdl);
#endif

// (y, h, logits, expert_ids, gates, num_active)
using NormRouteOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

NormRouteOutputs norm_linear_topp_route_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                            const at::Tensor& norm_weight, double eps,
                                            const at::Tensor& weight, double tau,
                                            const std::optional<at::Tensor>& tau_per_token,
                                            int64_t min_experts, std::optional<int64_t> max_experts,
                                            c10::string_view gate, const std::optional<at::Tensor>& tickets,
                                            bool pdl);

#ifdef PRUNEPATH_WITH_CUDA
NormRouteOutputs norm_linear_topp_route_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                             const at::Tensor& norm_weight, double eps,
                                             const at::Tensor& weight, double tau,
                                             const std::optional<at::Tensor>& tau_per_token,
                                             int64_t min_experts, std::optional<int64_t> max_experts,
                                             c10::string_view gate, const std::optional<at::Tensor>& tickets,
                                             bool pdl);
#endif

at::Tensor decode_gemv_cpu(const at::Tensor& x, const at::Tensor& weight, bool pdl);

#ifdef PRUNEPATH_WITH_CUDA
at::Tensor decode_gemv_cuda(const at::Tensor& x, const at::Tensor& weight, bool pdl);
#endif

using AlignOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

AlignOutputs align_experts_cpu(const at::Tensor& expert_ids, const at::Tensor& num_active,
                               int64_t num_experts, int64_t block_m);

#ifdef PRUNEPATH_WITH_CUDA
AlignOutputs align_experts_cuda(const at::Tensor& expert_ids, const at::Tensor& num_active,
                                int64_t num_experts, int64_t block_m);
#endif

at::Tensor expert_ffn_cpu(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& gates,
                          const at::Tensor& num_active, const at::Tensor& w_in,
                          const std::optional<at::Tensor>& b_in, const at::Tensor& w_down,
                          const std::optional<at::Tensor>& b_out, bool gated, c10::string_view act, bool pdl);

#ifdef PRUNEPATH_WITH_CUDA
at::Tensor expert_ffn_cuda(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& gates,
                           const at::Tensor& num_active, const at::Tensor& w_in,
                           const std::optional<at::Tensor>& b_in, const at::Tensor& w_down,
                           const std::optional<at::Tensor>& b_out, bool gated, c10::string_view act,
                           bool pdl);
#endif

}  // namespace prunepath
