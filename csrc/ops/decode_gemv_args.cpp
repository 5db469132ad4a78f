#include "decode_gemv_args.h"

#include <ATen/ops/empty.h>

#include <cstdint>
#include <limits>

#include "check.h"

namespace prunepath {

void check_decode_gemv_inputs(const at::Tensor& x, const at::Tensor& weight) {
  PRUNEPATH_CHECK_VALUE(x.dim() == 2, "decode_gemv: x must be 2-D [B, K]; got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  PRUNEPATH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                       "decode_gemv: x must be float32, float16 or bfloat16; got ", dtype);
  PRUNEPATH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1),
                        "decode_gemv: weight must be [N, K] with K = ", x.size(1), "; got shape ",
                        weight.sizes());
  PRUNEPATH_CHECK_TYPE(weight.scalar_type() == dtype, "decode_gemv: weight must have the dtype of x (", dtype,
                       "); got ", weight.scalar_type());
  PRUNEPATH_CHECK_VALUE(weight.device() == x.device(), "decode_gemv: weight is on ", weight.device(),
                        " but x is on ", x.device());
  PRUNEPATH_CHECK_VALUE(x.size(1) <= 1 || x.stride(1) == 1,
                        "decode_gemv: x must have a unit inner stride; got strides ", x.strides());
  PRUNEPATH_CHECK_VALUE(weight.is_contiguous(), "decode_gemv: weight must be contiguous; got strides ",
                        weight.strides());
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  PRUNEPATH_CHECK_VALUE(x.size(0) <= kMax && weight.size(0) <= kMax && x.size(1) <= kMax,
                        "decode_gemv: B, N and K must each be below 2^31; got B = ", x.size(0),
                        ", N = ", weight.size(0), ", K = ", x.size(1));
}

DecodeGemvCall prepare_decode_gemv(const at::Tensor& x, const at::Tensor& weight) {
  check_decode_gemv_inputs(x, weight);
  const int64_t B = x.size(0);
  const int64_t K = x.size(1);
  const int64_t N = weight.size(0);
  return {B, K, N, B > 1 ? x.stride(0) : K, at::empty({B, N}, x.options())};
}

}  // namespace prunepath
