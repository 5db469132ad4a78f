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
#include "ops.h"

namespace prunepath {
namespace {

FfnActivation parse_activation(c10::string_view act) {
  if (act == "silu") return FfnActivation::kSilu;
  if (act == "gelu") return FfnActivation::kGelu;
  if (act == "gelu_tanh") return FfnActivation::kGeluTanh;
  if (act == "relu") return FfnActivation::kRelu;
  PRUNEPATH_CHECK_VALUE(false, "expert_ffn: act must be one of 'silu', 'gelu', 'gelu_tanh', 'relu'; got '",
                        std::string(act), "'");
}

void check_on_cpu(const at::Tensor& t, const char* name) {
  PRUNEPATH_CHECK_VALUE(t.device().is_cpu(), "expert_ffn_cpu: ", name, " must be on the CPU; got ",
                        t.device());
}

}  // namespace

at::Tensor expert_ffn_cpu(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& gates,
                          const at::Tensor& num_active, const at::Tensor& w_in,
                          const std::optional<at::Tensor>& b_in, const at::Tensor& w_down,
                          const std::optional<at::Tensor>& b_out, bool gated, c10::string_view act) {
  PRUNEPATH_CHECK_VALUE(x.dim() == 2, "expert_ffn: x must be [T, d]; got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  PRUNEPATH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                       "expert_ffn: x must be float32, float16 or bfloat16; got ", dtype);
  const int64_t T = x.size(0);
  const int64_t d = x.size(1);
  PRUNEPATH_CHECK_VALUE(w_down.dim() == 3 && w_down.size(2) == d, "expert_ffn: w_down must be [E, S, d = ", d,
                        "]; got ", w_down.sizes());
  const int64_t E = w_down.size(0);
  const int64_t S = w_down.size(1);
  PRUNEPATH_CHECK_VALUE(E >= 1 && E <= std::numeric_limits<int32_t>::max() && S >= 1 &&
                            S <= std::numeric_limits<int32_t>::max(),
                        "expert_ffn: w_down must have E >= 1 experts of S >= 1 neurons; got ",
                        w_down.sizes());
  const int64_t rows = gated ? 2 * S : S;
  PRUNEPATH_CHECK_VALUE(w_in.dim() == 3 && w_in.size(0) == E && w_in.size(1) == rows && w_in.size(2) == d,
                        "expert_ffn: w_in must be [E, ", gated ? "2S" : "S", ", d] = [", E, ", ", rows, ", ",
                        d, "]; got ", w_in.sizes());
  PRUNEPATH_CHECK_TYPE(w_in.scalar_type() == dtype && w_down.scalar_type() == dtype,
                       "expert_ffn: weights must have the dtype of x (", dtype, "); got ", w_in.scalar_type(),
                       ", ", w_down.scalar_type());
  PRUNEPATH_CHECK_VALUE(
      expert_ids.dim() == 2 && expert_ids.size(0) == T && expert_ids.scalar_type() == at::kInt,
      "expert_ffn: expert_ids must be int32 [T = ", T, ", K]; got ", expert_ids.scalar_type(), " ",
      expert_ids.sizes());
  const int64_t K = expert_ids.size(1);
  PRUNEPATH_CHECK_VALUE(
      K <= std::numeric_limits<int32_t>::max() && T * K <= std::numeric_limits<int32_t>::max(),
      "expert_ffn: T * K = ", T * K, " slots do not fit int32 indices");
  PRUNEPATH_CHECK_VALUE(gates.sizes() == expert_ids.sizes() && gates.scalar_type() == at::kFloat,
                        "expert_ffn: gates must be float32 ", expert_ids.sizes(), "; got ",
                        gates.scalar_type(), " ", gates.sizes());
  PRUNEPATH_CHECK_VALUE(
      num_active.dim() == 1 && num_active.size(0) == T && num_active.scalar_type() == at::kInt,
      "expert_ffn: num_active must be int32 [", T, "]; got ", num_active.scalar_type(), " ",
      num_active.sizes());
  if (b_in.has_value()) {
    PRUNEPATH_CHECK_VALUE(!gated && b_in->dim() == 2 && b_in->size(0) == E && b_in->size(1) == S,
                          "expert_ffn: b_in is for a plain FFN and must be [E, S] = [", E, ", ", S, "]");
    PRUNEPATH_CHECK_TYPE(b_in->scalar_type() == dtype, "expert_ffn: biases must have the dtype of x (", dtype,
                         "); got ", b_in->scalar_type());
  }
  if (b_out.has_value()) {
    PRUNEPATH_CHECK_VALUE(b_out->dim() == 1 && b_out->size(0) == d, "expert_ffn: b_out must be [d] = [", d,
                          "]; got ", b_out->sizes());
    PRUNEPATH_CHECK_TYPE(b_out->scalar_type() == dtype, "expert_ffn: biases must have the dtype of x (",
                         dtype, "); got ", b_out->scalar_type());
  }
  const FfnActivation activation = parse_activation(act);
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
  p.act = activation;
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
