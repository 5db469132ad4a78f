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

}  // namespace prunepath
