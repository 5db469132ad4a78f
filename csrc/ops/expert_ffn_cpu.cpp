// CPU glue for expert_ffn: argument checks, the plan, then two parallel steps
// (first layer over (expert, token tile) tasks, down projection over (column
// block, token tile) tasks), so even one token keeps every core busy.
#include "prunepath/expert_ffn_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <limits>
#include <string>

#include "check.h"
#include "expert_ffn_args.h"
#include "ops.h"

namespace prunepath {
namespace {

void check_on_cpu(const at::Tensor& t, const char* name) {
  PRUNEPATH_CHECK_VALUE(t.device().is_cpu(), "expert_ffn_cpu: ", name, " must be on the CPU; got ",
                        t.device());
}

}  // namespace

at::Tensor expert_ffn_cpu(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& gates,
                          const at::Tensor& num_active, const at::Tensor& w_in,
                          const std::optional<at::Tensor>& b_in, const at::Tensor& w_down,
                          const std::optional<at::Tensor>& b_out, bool gated, c10::string_view act,
                          bool /*pdl*/) {
  const ExpertFfnShape shape =
      check_expert_ffn_inputs(x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out, gated, act);
  const int64_t T = shape.T, d = shape.d, K = shape.K, E = shape.E, S = shape.S;
  const int64_t rows = gated ? 2 * S : S;
  const auto dtype = x.scalar_type();
  check_on_cpu(x, "x");
  check_on_cpu(expert_ids, "expert_ids");
  check_on_cpu(gates, "gates");
  check_on_cpu(num_active, "num_active");
  check_on_cpu(w_in, "w_in");
  check_on_cpu(w_down, "w_down");
  if (b_in.has_value()) check_on_cpu(*b_in, "b_in");
  if (b_out.has_value()) check_on_cpu(*b_out, "b_out");

  const at::Tensor ids_c = expert_ids.contiguous();
  const at::Tensor gates_c = gates.contiguous();
  const at::Tensor num_c = num_active.contiguous();
  ExpertFfnParams p;
  p.num_tokens = T;
  p.hidden = d;
  p.k = static_cast<int32_t>(K);
  p.num_experts = static_cast<int32_t>(E);
  p.width = static_cast<int32_t>(S);
  p.gated = gated;
  p.act = shape.act;
  p.expert_ids = ids_c.data_ptr<int32_t>();
  p.gates = gates_c.data_ptr<float>();
  p.num_active = num_c.data_ptr<int32_t>();

  ExpertFfnPlan plan;
  const int64_t bad = expert_ffn_plan(p, plan);
  PRUNEPATH_CHECK_VALUE(bad < 0, "expert_ffn: active slot ", bad, " (t * K + j) holds expert id ",
                        bad < 0 ? 0 : p.expert_ids[bad], " outside [0, ", E, ")");

  at::Tensor y = at::empty({T, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (T == 0 || d == 0) return y;
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor w_in_c = w_in.contiguous();
  const at::Tensor w_down_c = w_down.contiguous();
  const at::Tensor b_in_c = b_in.has_value() ? b_in->contiguous() : at::Tensor();
  const at::Tensor b_out_c = b_out.has_value() ? b_out->contiguous() : at::Tensor();
  std::vector<float> h(plan.num_pairs * S);  // [P, S] gated hidden activations
  const int64_t first_tasks = expert_ffn_num_first_tasks(plan);
  const int64_t down_tasks = expert_ffn_down_tasks(p);
  // Grains: about 32k multiply-adds per task before a second thread is worth waking.
  const int64_t first_grain = std::max<int64_t>(1, 32768 / (rows * d * kExpertFfnTokenTile));
  const int64_t pairs_per_token = std::max<int64_t>(1, plan.num_pairs / T);
  const int64_t down_grain =
      std::max<int64_t>(1, 32768 / (pairs_per_token * S * kExpertFfnDownBlock * kExpertFfnDownTokens));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "expert_ffn_cpu", [&] {
    ExpertFfnData<scalar_t> data;
    data.x = xf.data_ptr<float>();
    data.w_in = w_in_c.data_ptr<scalar_t>();
    data.b_in = b_in_c.defined() ? b_in_c.data_ptr<scalar_t>() : nullptr;
    data.w_down = w_down_c.data_ptr<scalar_t>();
    data.b_out = b_out_c.defined() ? b_out_c.data_ptr<scalar_t>() : nullptr;
    data.y = y.data_ptr<scalar_t>();
    at::parallel_for(0, first_tasks, first_grain, [&](int64_t begin, int64_t end) {
      expert_ffn_first_layer(p, data, plan, begin, end, h.data());
    });
    at::parallel_for(0, down_tasks, down_grain, [&](int64_t begin, int64_t end) {
      expert_ffn_down(p, data, plan, h.data(), begin, end);
    });
  });
  return y;
}

}  // namespace prunepath
