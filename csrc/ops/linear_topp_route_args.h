// Argument validation shared by the CPU and CUDA linear_topp_route: every check
// runs before any kernel does.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace prunepath {

// x [T, d] with a unit inner stride, weight [E, d] contiguous in the dtype of x,
// tickets (when given) int32 [>= T] contiguous, all on one device.
void check_linear_topp_route_inputs(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& tickets);

// norm_linear_topp_route: the above with op name `op`, plus x (and the residual,
// when given, of x's shape, dtype and device) contiguous, norm_weight [d]
// contiguous in the dtype of x on its device, eps finite and >= 0.
void check_norm_linear_topp_route_inputs(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                         const at::Tensor& norm_weight, double eps, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& tickets);

}  // namespace prunepath
