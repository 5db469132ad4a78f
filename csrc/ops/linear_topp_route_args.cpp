#include "linear_topp_route_args.h"

#include <cmath>

#include "check.h"

namespace prunepath {

void check_linear_topp_route_inputs(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& tickets) {
  PRUNEPATH_CHECK_VALUE(x.dim() == 2, "linear_topp_route: x must be 2-D [T, d]; got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  PRUNEPATH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                       "linear_topp_route: x must be float32, float16 or bfloat16; got ", dtype);
  PRUNEPATH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1),
                        "linear_topp_route: weight must be [E, d] with d = ", x.size(1), "; got shape ",
                        weight.sizes());
  PRUNEPATH_CHECK_TYPE(weight.scalar_type() == dtype, "linear_topp_route: weight must have the dtype of x (",
                       dtype, "); got ", weight.scalar_type());
  PRUNEPATH_CHECK_VALUE(weight.device() == x.device(), "linear_topp_route: weight is on ", weight.device(),
                        " but x is on ", x.device());
  PRUNEPATH_CHECK_VALUE(x.size(1) == 0 || x.size(0) <= 1 || x.stride(1) == 1,
                        "linear_topp_route: x must have a unit inner stride; got strides ", x.strides());
  PRUNEPATH_CHECK_VALUE(weight.is_contiguous(), "linear_topp_route: weight must be contiguous; got strides ",
                        weight.strides());
  if (tickets.has_value()) {
    const at::Tensor& c = *tickets;
    PRUNEPATH_CHECK_TYPE(c.scalar_type() == at::kInt, "linear_topp_route: tickets must be int32; got ",
                         c.scalar_type());
    PRUNEPATH_CHECK_VALUE(c.device() == x.device(), "linear_topp_route: tickets is on ", c.device(),
                          " but x is on ", x.device());
    PRUNEPATH_CHECK_VALUE(c.dim() == 1 && c.size(0) >= x.size(0) && c.is_contiguous(),
                          "linear_topp_route: tickets must be a contiguous int32 vector of at least T = ",
                          x.size(0), " zeros; got shape ", c.sizes());
  }
}

void check_norm_linear_topp_route_inputs(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                         const at::Tensor& norm_weight, double eps, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& tickets) {
  check_linear_topp_route_inputs(x, weight, tickets);
  PRUNEPATH_CHECK_VALUE(x.is_contiguous(), "norm_linear_topp_route: x must be contiguous; got strides ",
                        x.strides());
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    PRUNEPATH_CHECK_VALUE(r.sizes() == x.sizes(),
                          "norm_linear_topp_route: residual must have the shape of x (", x.sizes(), "); got ",
                          r.sizes());
    PRUNEPATH_CHECK_TYPE(r.scalar_type() == x.scalar_type(),
                         "norm_linear_topp_route: residual must have the dtype of x (", x.scalar_type(),
                         "); got ", r.scalar_type());
    PRUNEPATH_CHECK_VALUE(r.device() == x.device(), "norm_linear_topp_route: residual is on ", r.device(),
                          " but x is on ", x.device());
    PRUNEPATH_CHECK_VALUE(r.is_contiguous(),
                          "norm_linear_topp_route: residual must be contiguous; got strides ", r.strides());
  }
  PRUNEPATH_CHECK_VALUE(norm_weight.dim() == 1 && norm_weight.size(0) == x.size(1),
                        "norm_linear_topp_route: norm_weight must be [d] with d = ", x.size(1),
                        "; got shape ", norm_weight.sizes());
  PRUNEPATH_CHECK_TYPE(norm_weight.scalar_type() == x.scalar_type(),
                       "norm_linear_topp_route: norm_weight must have the dtype of x (", x.scalar_type(),
                       "); got ", norm_weight.scalar_type());
  PRUNEPATH_CHECK_VALUE(norm_weight.device() == x.device(), "norm_linear_topp_route: norm_weight is on ",
                        norm_weight.device(), " but x is on ", x.device());
  PRUNEPATH_CHECK_VALUE(norm_weight.is_contiguous(),
                        "norm_linear_topp_route: norm_weight must be contiguous");
  PRUNEPATH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0,
                        "norm_linear_topp_route: eps must be finite and >= 0; got ", eps);
}

}  // namespace prunepath
