// The single registration point of the prunepath operator library.
// Fake (meta) kernels and autograd formulas are registered from Python
// (prunepath_ops/_registration.py); do not add C++ Meta kernels here, the two collide.
#include <torch/library.h>

#include "ops/ops.h"

TORCH_LIBRARY(prunepath, m) {
  // Top-p (cumulative-mass) expert routing, SPEC.md section 3.
  //   logits [T, E] fp32/fp16/bf16; tau: scalar threshold, or tau_per_token
  //   (fp32 [T], or one element broadcast) which then replaces it; strict
  //   c < tau, tau >= 1 keeps all; min_experts <= n <= max_experts (None: E).
  //   gate: 'sigmoid' | 'prob' | 'renorm' | 'one'.
  // Returns expert_ids [T, K] int32 (-1 padded, descending probability, ties to
  // the lower index), gates [T, K] fp32 (0 padded), num_active [T] int32, with
  // K = max_experts or E.
  m.def(
      "topp_route(Tensor logits, float tau, Tensor? tau_per_token, int min_experts, int? max_experts, "
      "str gate) -> (Tensor expert_ids, Tensor gates, Tensor num_active)");
}

TORCH_LIBRARY_IMPL(prunepath, CPU, m) { m.impl("topp_route", &prunepath::topp_route_cpu); }

#ifdef PRUNEPATH_WITH_CUDA
TORCH_LIBRARY_IMPL(prunepath, CUDA, m) { m.impl("topp_route", &prunepath::topp_route_cuda); }
#endif
