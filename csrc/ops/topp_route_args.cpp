#include "topp_route_args.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "check.h"

namespace prunepath {

GateMode parse_gate_mode(c10::string_view gate) {
  if (gate == "sigmoid") return GateMode::kSigmoid;
  if (gate == "prob") return GateMode::kProb;
  if (gate == "renorm") return GateMode::kRenorm;
  if (gate == "one") return GateMode::kOne;
  PRUNEPATH_CHECK_VALUE(false, "topp_route: gate must be one of 'sigmoid', 'prob', 'renorm', 'one'; got '",
                        std::string(gate), "'");
}

ToppRouteCall prepare_topp_route(const at::Tensor& logits, double tau,
                                 const std::optional<at::Tensor>& tau_per_token, int64_t min_experts,
                                 std::optional<int64_t> max_experts, c10::string_view gate) {
  PRUNEPATH_CHECK_VALUE(logits.dim() == 2, "topp_route: logits must be 2-D [T, E]; got shape ",
                        logits.sizes());
  const auto dtype = logits.scalar_type();
  PRUNEPATH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                       "topp_route: logits must be float32, float16 or bfloat16; got ", dtype);
  const int64_t T = logits.size(0);
  const int64_t E = logits.size(1);
  PRUNEPATH_CHECK_VALUE(
      E >= 1, "topp_route: logits must have at least one expert column (E >= 1); got shape ", logits.sizes());
  PRUNEPATH_CHECK_VALUE(E <= std::numeric_limits<int32_t>::max(), "topp_route: E = ", E, " is too large");
  const int64_t K = max_experts.has_value() ? *max_experts : E;
  PRUNEPATH_CHECK_VALUE(K >= 1 && K <= E, "topp_route: max_experts must lie in [1, E = ", E, "]; got ", K);
  PRUNEPATH_CHECK_VALUE(min_experts >= 0 && min_experts <= K,
                        "topp_route: min_experts must lie in [0, max_experts or E = ", K, "]; got ",
                        min_experts);
  const GateMode mode = parse_gate_mode(gate);

  ToppRouteCall call;
  const float* tau_ptr = nullptr;
  int64_t tau_stride = 0;
  if (tau_per_token.has_value()) {
    const at::Tensor& tt = *tau_per_token;
    PRUNEPATH_CHECK_TYPE(tt.scalar_type() == at::kFloat, "topp_route: a tau tensor must be float32; got ",
                         tt.scalar_type());
    PRUNEPATH_CHECK_VALUE(tt.device() == logits.device(), "topp_route: the tau tensor is on ", tt.device(),
                          " but logits are on ", logits.device());
    const bool broadcast = tt.numel() == 1 && tt.dim() <= 1;
    PRUNEPATH_CHECK_VALUE(broadcast || (tt.dim() == 1 && tt.size(0) == T),
                          "topp_route: a tau tensor must have shape [T] = [", T,
                          "] (or hold a single value); got shape ", tt.sizes());
    call.tau_per_token = tt;
    tau_ptr = tt.data_ptr<float>();
    tau_stride = broadcast ? 0 : tt.stride(0);
  } else {
    PRUNEPATH_CHECK_VALUE(!std::isnan(tau), "topp_route: tau must be a number; got NaN");
  }

  // A unit inner stride is all the kernels need: row-strided views (slices of
  // a wider buffer) are read in place, anything else is copied once.
  call.logits = logits.stride(1) == 1 || E == 1 ? logits : logits.contiguous();
  const auto opts = logits.options();
  call.expert_ids = at::empty({T, K}, opts.dtype(at::kInt));
  call.gates = at::empty({T, K}, opts.dtype(at::kFloat));
  call.num_active = at::empty({T}, opts.dtype(at::kInt));

  ToppRouteParams& p = call.params;
  p.num_tokens = T;
  p.num_experts = static_cast<int32_t>(E);
  p.k = static_cast<int32_t>(K);
  p.logits_stride = T > 1 ? call.logits.stride(0) : E;
  p.tau = static_cast<float>(tau);
  p.tau_per_token = tau_ptr;
  p.tau_stride = tau_stride;
  p.min_experts = static_cast<int32_t>(min_experts);
  p.gate = mode;
  p.expert_ids = call.expert_ids.data_ptr<int32_t>();
  p.gates = call.gates.data_ptr<float>();
  p.num_active = call.num_active.data_ptr<int32_t>();
  return call;
}

}  // namespace prunepath
