// CPU glue for topp_route: parallel over tokens, one scratch buffer per chunk.
#include "prunepath/topp_route_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "check.h"
#include "ops.h"
#include "topp_route_args.h"

namespace prunepath {

RouteOutputs topp_route_cpu(const at::Tensor& logits, double tau,
                            const std::optional<at::Tensor>& tau_per_token, int64_t min_experts,
                            std::optional<int64_t> max_experts, c10::string_view gate) {
  PRUNEPATH_CHECK_VALUE(logits.device().is_cpu(), "topp_route_cpu: logits must be on the CPU; got ",
                        logits.device());
  ToppRouteCall call = prepare_topp_route(logits, tau, tau_per_token, min_experts, max_experts, gate);
  const ToppRouteParams& p = call.params;
  // Roughly 16k logits per task keeps scheduling overhead small at any E.
  const int64_t grain = std::max<int64_t>(1, 16384 / p.num_experts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.logits.scalar_type(), "topp_route_cpu", [&] {
    const scalar_t* data = call.logits.data_ptr<scalar_t>();
    at::parallel_for(0, p.num_tokens, grain, [&](int64_t begin, int64_t end) {
      ToppRouteCpuScratch scratch;
      scratch.resize(p.num_experts);
      for (int64_t t = begin; t < end; ++t) topp_route_cpu_token(p, data, t, scratch);
    });
  });
  return {call.expert_ids, call.gates, call.num_active};
}

}  // namespace prunepath
