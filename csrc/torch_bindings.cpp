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
  // Router projection fused with top-p routing, for the decode regime (few
  // tokens): logits = x weight^T, then topp_route on them, in one launch on CUDA.
  //   x [T, d] fp32/fp16/bf16 (unit inner stride); weight [E, d] contiguous, the
  //   dtype of x; E <= 1024 on CUDA. tau, tau_per_token, min_experts, max_experts,
  //   gate as for topp_route. tickets: int32 [>= T] arrival counters, zero, left
  //   zero by the kernel (a caller's scratch; None allocates zeros per call);
  //   pdl: programmatic dependent launch (CUDA, sm_90+).
  // Returns logits [T, E] in the dtype of x (rounded once, as F.linear's output),
  // then topp_route's three outputs, bit-identical to topp_route(logits, ...).
  m.def(
      "linear_topp_route(Tensor x, Tensor weight, float tau, Tensor? tau_per_token, int min_experts, "
      "int? max_experts, str gate, Tensor(a!)? tickets, bool pdl) -> (Tensor logits, Tensor expert_ids, "
      "Tensor gates, Tensor num_active)");
  // linear_topp_route with the decode step's add_rms_norm in front, in one launch
  // on CUDA: h = x + residual (h = x without one), y = norm_weight *
  // rms_norm(h, eps) (in fp32, cast to the dtype before the weight multiply, as
  // add_rms_norm), then linear_topp_route(y, weight, ...).
  //   x, residual [T, d] contiguous, norm_weight [d] contiguous, all in one dtype;
  //   eps finite >= 0; the rest as for linear_topp_route.
  // Returns y and h [T, d] (new tensors in the dtype of x), then linear_topp_route's
  // four outputs for y. On CUDA y may differ from add_rms_norm's in the last bit
  // (the mean square is summed in another order); routing and logits are those of y.
  m.def(
      "norm_linear_topp_route(Tensor x, Tensor? residual, Tensor norm_weight, float eps, Tensor weight, "
      "float tau, Tensor? tau_per_token, int min_experts, int? max_experts, str gate, Tensor(a!)? tickets, "
      "bool pdl) -> (Tensor y, Tensor h, Tensor logits, Tensor expert_ids, Tensor gates, Tensor num_active)");
  // The few-token projection of a decode step (attention q/k/v and output):
  // y = x weight^T with no bias, one launch on CUDA, no split-K.
  //   x [B, K] fp32/fp16/bf16 (unit inner stride); weight [N, K] contiguous, the
  //   dtype of x; pdl: programmatic dependent launch (CUDA, sm_90+).
  // Returns y [B, N] in the dtype of x: fp32 sums in a fixed order, rounded once
  // (deterministic; may differ from cuBLAS in the last bit). NaN/inf propagate as
  // in a matmul: a NaN in row b of x makes row b of y NaN.
  m.def("decode_gemv(Tensor x, Tensor weight, bool pdl) -> Tensor");
  // Token-to-expert alignment for the grouped expert GEMM (variable k per token).
  //   expert_ids [T, K] int32, num_active [T] int32 (only slots j < num_active[t]
  //   are read). Returns sorted_pairs [P_max] int32 (t * K + j grouped by expert,
  //   token order within an expert, each group padded to block_m rows with -1),
  //   block_expert [B_max] int32 (-1 past the end), expert_offsets [E + 1] int32
  //   (padded first row per expert), expert_counts [E] int32, with
  //   B_max = (T*K + min(E, T*K) * (block_m - 1)) / block_m and P_max = B_max * block_m.
  m.def(
      "align_experts(Tensor expert_ids, Tensor num_active, int num_experts, int block_m) -> (Tensor "
      "sorted_pairs, "
      "Tensor block_expert, Tensor expert_offsets, Tensor expert_counts)");
  // Routed expert FFN kernel on packed weights (SPEC.md sections 1 and 3): the
  // CPU backend of prunepath::sparse_ffn (defined in Python,
  // prunepath_ops/ffn/ops.py) and, on CUDA, its opt-in backend "cuda".
  //   x [T, d] fp32/fp16/bf16; expert_ids [T, K] int32, gates [T, K] fp32,
  //   num_active [T] int32 (only slots j < num_active[t] are read, ids in [0, E));
  //   w_in [E, 2S, d] (gated: S gate rows, then S up rows) or [E, S, d] (plain);
  //   b_in [E, S] (plain only); w_down [E, S, d]; b_out [d]; weights and biases in
  //   the dtype of x. act: 'silu' | 'gelu' | 'gelu_tanh' | 'relu'. pdl:
  //   programmatic dependent launch (CUDA, sm_90+; ignored on the CPU).
  // Returns y [T, d] in the dtype of x: gate * FFN_e(x) summed over a token's
  // active slots (+ b_out once), fp32 accumulation in a fixed order:
  // deterministic. CPU: slot order; an id outside [0, E) raises. CUDA: each
  // token's selected neurons split evenly over the SMs (made for one decode
  // token: every token reads its own experts' weights, where sparse_ffn's Triton
  // decode kernels share them across a batch), no host synchronisation (CUDA
  // graphs), so an id outside [0, E) cannot raise and contributes nothing.
  m.def(
      "expert_ffn(Tensor x, Tensor expert_ids, Tensor gates, Tensor num_active, Tensor w_in, Tensor? b_in, "
      "Tensor w_down, Tensor? b_out, bool gated, str act, bool pdl=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(prunepath, CPU, m) {
  m.impl("topp_route", &prunepath::topp_route_cpu);
  m.impl("linear_topp_route", &prunepath::linear_topp_route_cpu);
  m.impl("norm_linear_topp_route", &prunepath::norm_linear_topp_route_cpu);
  m.impl("decode_gemv", &prunepath::decode_gemv_cpu);
  m.impl("align_experts", &prunepath::align_experts_cpu);
  m.impl("expert_ffn", &prunepath::expert_ffn_cpu);
}

#ifdef PRUNEPATH_WITH_CUDA
TORCH_LIBRARY_IMPL(prunepath, CUDA, m) {
  m.impl("topp_route", &prunepath::topp_route_cuda);
  m.impl("linear_topp_route", &prunepath::linear_topp_route_cuda);
  m.impl("norm_linear_topp_route", &prunepath::norm_linear_topp_route_cuda);
  m.impl("decode_gemv", &prunepath::decode_gemv_cuda);
  m.impl("align_experts", &prunepath::align_experts_cuda);
  m.impl("expert_ffn", &prunepath::expert_ffn_cuda);
}
#endif
