#include "expert_ffn_args.h"

#include <limits>
#include <string>

#include "check.h"

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

}  // namespace

ExpertFfnShape check_expert_ffn_inputs(const at::Tensor& x, const at::Tensor& expert_ids,
                                       const at::Tensor& gates, const at::Tensor& num_active,
                                       const at::Tensor& w_in, const std::optional<at::Tensor>& b_in,
                                       const at::Tensor& w_down, const std::optional<at::Tensor>& b_out,
                                       bool gated, c10::string_view act) {
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
  PRUNEPATH_CHECK_VALUE(K * S <= std::numeric_limits<int32_t>::max(), "expert_ffn: K * S = ", K * S,
                        " selected neurons per token do not fit int32 indices");
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
  return {T, d, K, E, S, parse_activation(act)};
}

}  // namespace prunepath
