// Top-p (cumulative-mass) expert routing for one token on the CPU.
// Torch-free: LogitT is float or any type with an explicit conversion to float
// (c10::Half, c10::BFloat16). The caller parallelises over tokens.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "prunepath/routing_common.h"

namespace prunepath {

// Scratch reused across the tokens one thread handles, so the hot loop does
// not allocate.
struct ToppRouteCpuScratch {
  std::vector<float> logit;
  std::vector<float> prob;
  std::vector<int32_t> order;
  void resize(int32_t num_experts) {
    logit.resize(num_experts);
    prob.resize(num_experts);
    order.resize(num_experts);
  }
};

template <typename LogitT>
void topp_route_cpu_token(const ToppRouteParams& p, const LogitT* logits, int64_t t, ToppRouteCpuScratch& s) {
  const int32_t E = p.num_experts;
  const LogitT* row = logits + t * p.logits_stride;
  float row_max = -INFINITY;
  for (int32_t e = 0; e < E; ++e) {
    s.logit[e] = sanitize_logit(static_cast<float>(row[e]));
    row_max = std::max(row_max, s.logit[e]);
  }
  // Sums run in double and are rounded once: a sequential fp32 sum over
  // thousands of experts drifts by more than the 1e-6 the selection can afford.
  double total = 0.0;
  for (int32_t e = 0; e < E; ++e) {
    s.prob[e] = softmax_weight(s.logit[e], row_max);
    total += s.prob[e];
  }
  const float total_f = static_cast<float>(total);
  for (int32_t e = 0; e < E; ++e) s.prob[e] /= total_f;

  // Largest probability first, the lower index first on ties: a strict total
  // order, so a partial sort of the first m experts is exactly the first m of
  // the full order. Usually the kept prefix is short: sort 32, then 4x more
  // while the threshold (or min_experts) reaches past what is sorted.
  const auto before = [&](int32_t a, int32_t b) {
    return s.prob[a] > s.prob[b] || (s.prob[a] == s.prob[b] && a < b);
  };
  const float tau = p.tau_per_token ? p.tau_per_token[t * p.tau_stride] : p.tau;
  std::iota(s.order.begin(), s.order.end(), 0);
  int32_t sorted = tau >= 1.0f ? E : std::min(E, std::max<int32_t>(32, p.min_experts));
  int32_t first_crossing = E;
  for (;;) {
    if (sorted == E) {
      std::sort(s.order.begin(), s.order.end(), before);
    } else {
      std::partial_sort(s.order.begin(), s.order.begin() + sorted, s.order.end(), before);
    }
    double cumulative = 0.0;
    first_crossing = E;
    for (int32_t j = 0; j < sorted; ++j) {
      cumulative += s.prob[s.order[j]];
      if (!(static_cast<float>(cumulative) < tau)) {
        first_crossing = j;
        break;
      }
    }
    if (sorted == E || (first_crossing < sorted && p.min_experts <= sorted)) break;
    sorted = std::min(E, 4 * sorted);
  }
  const int32_t n = clamp_active(first_crossing, tau, E, p.min_experts, p.k);
  double kept = 0.0;  // c[n-1], summed exactly like the scan above
  for (int32_t j = 0; j < n; ++j) kept += s.prob[s.order[j]];
  const float kept_mass = static_cast<float>(kept);

  int32_t* ids = p.expert_ids + t * p.k;
  float* gates = p.gates + t * p.k;
  for (int32_t j = 0; j < n; ++j) {
    const int32_t e = s.order[j];
    ids[j] = e;
    gates[j] = gate_value(p.gate, s.logit[e], s.prob[e], kept_mass);
  }
  std::fill(ids + n, ids + p.k, -1);
  std::fill(gates + n, gates + p.k, 0.0f);
  p.num_active[t] = n;
}

}  // namespace prunepath
