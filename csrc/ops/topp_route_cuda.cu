// CUDA glue for topp_route: device guard, current stream, dtype tag, kernel
// variant, launch.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>

#include "check.h"
#include "ops.h"
#include "prunepath/topp_route.cuh"
#include "topp_route_args.h"

namespace prunepath {

namespace {

// PRUNEPATH_TOPP_KERNEL (one of kToppKernelNames; unset means auto) picks the
// kernel for A/B measurements. Read once per process: later changes to the
// environment are not seen. A bad value raises on every call (a throwing static
// initialiser is retried).
ToppKernel topp_kernel_from_env() {
  static const ToppKernel variant = [] {
    const char* name = std::getenv("PRUNEPATH_TOPP_KERNEL");
    ToppKernel parsed = ToppKernel::kAuto;
    PRUNEPATH_CHECK_VALUE(parse_topp_kernel(name, &parsed), "PRUNEPATH_TOPP_KERNEL must be one of ",
                          kToppKernelNames, " (or unset); got '", name == nullptr ? "" : name, "'");
    return parsed;
  }();
  return variant;
}

}  // namespace

RouteOutputs topp_route_cuda(const at::Tensor& logits, double tau,
                             const std::optional<at::Tensor>& tau_per_token, int64_t min_experts,
                             std::optional<int64_t> max_experts, c10::string_view gate) {
  PRUNEPATH_CHECK_VALUE(logits.is_cuda(), "topp_route_cuda: logits must be a CUDA tensor; got ",
                        logits.device());
  const c10::cuda::CUDAGuard device_guard(logits.device());
  ToppRouteCall call = prepare_topp_route(logits, tau, tau_per_token, min_experts, max_experts, gate);
  PRUNEPATH_CHECK_VALUE(call.params.num_experts <= kToppRouteCudaMaxExperts,
                        "topp_route: the CUDA kernel handles E <= ", kToppRouteCudaMaxExperts,
                        "; got E = ", call.params.num_experts, " (the CPU kernel has no limit)");
  PRUNEPATH_CHECK_VALUE(call.params.num_tokens <= std::numeric_limits<int32_t>::max(),
                        "topp_route: the CUDA kernel handles T < 2^31 tokens; got ", call.params.num_tokens);
  LogitDType dtype = LogitDType::kFloat32;
  if (call.logits.scalar_type() == at::kHalf) dtype = LogitDType::kFloat16;
  if (call.logits.scalar_type() == at::kBFloat16) dtype = LogitDType::kBFloat16;
  const cudaError_t err = launch_topp_route(call.params, call.logits.data_ptr(), dtype,
                                            at::cuda::getCurrentCUDAStream(), topp_kernel_from_env());
  PRUNEPATH_CHECK(err == cudaSuccess, "topp_route: CUDA launch failed: ", cudaGetErrorString(err));
  return {call.expert_ids, call.gates, call.num_active};
}

}  // namespace prunepath
