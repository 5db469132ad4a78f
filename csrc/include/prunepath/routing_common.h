// Definitions shared by the CPU and CUDA top-p routers. Torch-free on purpose:
// the kernels work on raw pointers so they can be reused outside PyTorch.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PRUNEPATH_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PRUNEPATH_HOST_DEVICE inline
#endif

namespace prunepath {

// How a selected expert's output is scaled (SPEC.md section 3, step 5).
enum class GateMode : int32_t {
  kSigmoid = 0,  // sigmoid of the raw logit (the paper)
  kProb = 1,     // softmax probability
  kRenorm = 2,   // probability renormalised over the kept set
  kOne = 3,      // constant 1: with tau >= 1 reproduces the dense FFN
};

// Arguments of one routing call, identical for both backends.
struct ToppRouteParams {
  int64_t num_tokens;          // T
  int32_t num_experts;         // E
  int32_t k;                   // K = max_experts or E: width of the padded outputs
  int64_t logits_stride;       // elements between consecutive rows of logits
  float tau;                   // used when tau_per_token is null
  const float* tau_per_token;  // optional; indexed as tau_per_token[t * tau_stride]
  int64_t tau_stride;          // 0 broadcasts a single tau tensor element
  int32_t min_experts;
  GateMode gate;
  int32_t* expert_ids;  // [T, K], -1 padded
  float* gates;         // [T, K], 0 padded
  int32_t* num_active;  // [T]
};

// A NaN logit counts as minus infinity (SPEC.md section 3, ours): fmax returns
// its other operand for a NaN (one instruction on the GPU, not a test and a select).
PRUNEPATH_HOST_DEVICE float sanitize_logit(float g) { return fmaxf(g, -INFINITY); }

// exp(x) for the routers. On the GPU, 2^(x log2 e) through the SFU
// (ex2.approx.f32, relative error about 2^-22, plus the rounding of x log2 e:
// |x| 2^-24 relative, which only grows where the weight e^x is small): 6
// instructions where expf takes 11, and expf was the largest line of the lean
// topp_route kernel (session-24 source profile). Not flushed to zero, so a
// weight below 2^-126 stays nonzero and tau >= 1 still orders it. Every CUDA
// router calls this one function, so the CUDA kernels agree with each other
// bit for bit (a token's route does not depend on the batch or the kernel that
// routes it); against the CPU kernel (expf) probabilities differ by a few ulp,
// which moves a selection only where a cumulative sum lies that close to tau.
// PRUNEPATH_ROUTER_EXPF (a build define) keeps expf and the IEEE sigmoid on
// the GPU too: the A/B runs time the two against each other.
PRUNEPATH_HOST_DEVICE float router_exp(float x) {
#if defined(__CUDA_ARCH__) && !defined(PRUNEPATH_ROUTER_EXPF)
  float y;
  asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
#else
  return expf(x);
#endif
}

// Unnormalised softmax weight of one logit given the row maximum. Two rows
// that torch.softmax leaves undefined get a definition here (documented in
// the Python docstring): an all -inf/NaN row is uniform; a row holding +inf
// splits the mass evenly over its +inf entries.
PRUNEPATH_HOST_DEVICE float softmax_weight(float g, float row_max) {
  if (row_max == -INFINITY) return 1.0f;
  if (row_max == INFINITY) return g == INFINITY ? 1.0f : 0.0f;
  return router_exp(g - row_max);
}

// The sigmoid gate. On the GPU through the SFU's 2^x and reciprocal (4
// instructions instead of ~22 with expf and an IEEE division): within 1e-6 of
// the exact value for every input (the tests hold gates to 2e-6 + 4e-6
// relative; a gate scales an expert output that is itself rounded to bf16).
PRUNEPATH_HOST_DEVICE float sigmoid(float g) {
#if defined(__CUDA_ARCH__) && !defined(PRUNEPATH_ROUTER_EXPF)
  float e, r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(g * -1.4426950408889634f));
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.0f + e));
  return r;
#else
  return 1.0f / (1.0f + expf(-g));
#endif
}

// The gate of one selected expert; `kept_mass` is the cumulative probability
// of the whole kept prefix (used by kRenorm only).
PRUNEPATH_HOST_DEVICE float gate_value(GateMode mode, float logit, float prob, float kept_mass) {
  switch (mode) {
    case GateMode::kSigmoid: return sigmoid(logit);
    case GateMode::kProb: return prob;
    case GateMode::kRenorm: return prob / kept_mass;
    default: return 1.0f;
  }
}

// Number of kept experts from the first position whose cumulative sum reaches
// tau. Taking the first crossing (rather than counting c < tau) keeps the
// selection a prefix even if a parallel scan is not monotone.
PRUNEPATH_HOST_DEVICE int32_t clamp_active(int32_t first_crossing, float tau, int32_t num_experts,
                                           int32_t min_experts, int32_t k) {
  int32_t n = tau >= 1.0f ? num_experts : first_crossing;
  n = n < min_experts ? min_experts : n;
  return n > k ? k : n;
}

}  // namespace prunepath
