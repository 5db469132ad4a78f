// Argument validation and output allocation shared by the CPU and CUDA
// topp_route implementations: every check runs before any kernel does.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

#include "prunepath/routing_common.h"

namespace prunepath {

struct ToppRouteCall {
  at::Tensor logits;         // the input, or a copy with a unit inner stride
  at::Tensor tau_per_token;  // undefined when the scalar tau is used
  at::Tensor expert_ids, gates, num_active;
  ToppRouteParams params;
};

GateMode parse_gate_mode(c10::string_view gate);

ToppRouteCall prepare_topp_route(const at::Tensor& logits, double tau,
                                 const std::optional<at::Tensor>& tau_per_token, int64_t min_experts,
                                 std::optional<int64_t> max_experts, c10::string_view gate);

}  // namespace prunepath
