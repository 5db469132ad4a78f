// Routed expert FFN on the CPU, reading only the selected experts' packed weights:
//   y[t] = sum_{j < num_active[t]} gates[t, j] * FFN_{expert_ids[t, j]}(x[t])  (+ b_out once)
// (SPEC.md sections 1 and 3), fp32 accumulation whatever the weight dtype.
//
// Torch-free: raw pointers; WeightT is float or a type with conversions to and
// from float (c10::Half, c10::BFloat16). The caller runs three steps:
//   1. expert_ffn_plan (sequential, cheap): the (token, slot) pairs of the
//      active slots, grouped by expert for the first layer; it validates the
//      expert ids before any arithmetic. Slots j >= num_active[t] are never read.
//   2. expert_ffn_first_layer over plan.first_tasks (parallel): each task is
//      one expert and up to kExpertFfnTokenTile of its pairs, so a weight row is
//      loaded once per tile; it writes h[pair, S] = gate * act(...) (* up), fp32.
//   3. expert_ffn_down over expert_ffn_down_tasks (parallel): each task owns a
//      block of kExpertFfnDownBlock output columns for a tile of tokens and
//      sums that token's slots in slot order, so the result does not depend on
//      the thread count, the batch or the schedule (no atomics, fixed order).
// Inner loops run over contiguous rows of length d (dot products, then axpy)
// with fixed-width independent accumulators, which the compiler vectorises
// without reassociating a sum.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "prunepath/ffn_activation.h"

namespace prunepath {

constexpr int64_t kExpertFfnTokenTile = 8;   // pairs of one expert per first-layer task
constexpr int64_t kExpertFfnDownBlock = 64;  // output columns per down-projection task
constexpr int64_t kExpertFfnDownTokens = 8;  // tokens per down-projection task

struct ExpertFfnParams {
  int64_t num_tokens;         // T
  int64_t hidden;             // d
  int32_t k;                  // K: slots per token
  int32_t num_experts;        // E
  int32_t width;              // S: neurons per expert
  bool gated;                 // w_in rows: 2S (gate, then up) when gated, else S
  FfnActivation act;          //
  const int32_t* expert_ids;  // [T, K]; only slots j < num_active[t] are read
  const float* gates;         // [T, K]
  const int32_t* num_active;  // [T], clamped to [0, K]
};

template <typename WeightT>
struct ExpertFfnData {
  const float* x;         // [T, d] fp32 (the glue converts half inputs once)
  const WeightT* w_in;    // [E, 2S or S, d]
  const WeightT* b_in;    // [E, S] or nullptr (plain FFN only)
  const WeightT* w_down;  // [E, S, d]
  const WeightT* b_out;   // [d] or nullptr
  WeightT* y;             // [T, d] out
};

struct ExpertFfnPlan {
  int64_t num_pairs = 0;             // P: active slots over all tokens
  std::vector<int64_t> token_pairs;  // [T + 1]: token t owns pairs [token_pairs[t], token_pairs[t + 1])
  std::vector<int32_t> pair_token;   // [P] (pairs in token-major, slot order)
  std::vector<int32_t> pair_expert;  // [P]
  std::vector<float> pair_gate;      // [P]
  std::vector<int32_t> by_expert;    // [P] pair indices grouped by expert, token order within
  std::vector<int64_t> first_tasks;  // [tasks + 1] bounds into by_expert, one expert per task
};

inline int32_t expert_ffn_slots(int32_t n, int32_t k) { return n < 0 ? 0 : (n > k ? k : n); }

// Builds the plan. Returns the flat index t * K + j of the first active slot
// whose expert id lies outside [0, E), or -1 when every id is valid.
inline int64_t expert_ffn_plan(const ExpertFfnParams& p, ExpertFfnPlan& plan) {
  const int64_t T = p.num_tokens;
  const int32_t E = p.num_experts;
  plan.token_pairs.assign(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    const int32_t n = expert_ffn_slots(p.num_active[t], p.k);
    for (int32_t j = 0; j < n; ++j) {
      const int32_t e = p.expert_ids[t * p.k + j];
      if (e < 0 || e >= E) return t * p.k + j;
    }
    plan.token_pairs[t + 1] = plan.token_pairs[t] + n;
  }
  const int64_t P = plan.token_pairs[T];
  plan.num_pairs = P;
  plan.pair_token.resize(P);
  plan.pair_expert.resize(P);
  plan.pair_gate.resize(P);
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t q = plan.token_pairs[t]; q < plan.token_pairs[t + 1]; ++q) {
      const int64_t slot = t * p.k + (q - plan.token_pairs[t]);
      plan.pair_token[q] = static_cast<int32_t>(t);
      plan.pair_expert[q] = p.expert_ids[slot];
      plan.pair_gate[q] = p.gates[slot];
      ++count[p.expert_ids[slot] + 1];
    }
  }
  for (int32_t e = 0; e < E; ++e) count[e + 1] += count[e];  // count[e]: first row of expert e
  plan.first_tasks.assign(1, 0);
  for (int32_t e = 0; e < E; ++e) {
    for (int64_t b = count[e] + kExpertFfnTokenTile; b < count[e + 1]; b += kExpertFfnTokenTile) {
      plan.first_tasks.push_back(b);
    }
    if (count[e + 1] > count[e]) plan.first_tasks.push_back(count[e + 1]);
  }
  plan.by_expert.resize(P);
  for (int64_t q = 0; q < P; ++q) plan.by_expert[count[plan.pair_expert[q]]++] = static_cast<int32_t>(q);
  return -1;
}

inline int64_t expert_ffn_num_first_tasks(const ExpertFfnPlan& plan) {
  return static_cast<int64_t>(plan.first_tasks.size()) - 1;
}

// The fp32 row kernels below are compiled for AVX-512, AVX2 and baseline
// x86-64 and picked at load time (GCC function multi-versioning); elsewhere
// they build once for the target. One machine always runs the same clone, so
// results stay bitwise reproducible there.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PRUNEPATH_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PRUNEPATH_CPU_CLONES
#endif
#if defined(__GNUC__)
#define PRUNEPATH_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PRUNEPATH_ALWAYS_INLINE inline
#endif

// Fixed-order dot product of two contiguous fp32 rows: 16 independent lanes
// (vectorisable without reassociating a sum), then a fixed pairwise reduction.
PRUNEPATH_ALWAYS_INLINE float expert_ffn_dot(const float* __restrict a, const float* __restrict b,
                                             int64_t n) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0] + tail;
}

// Four rows (w, w + ld, w + 2 ld, w + 3 ld) against one x: shares the x loads
// and gives the core four independent accumulator sets. Each row's sum has
// exactly expert_ffn_dot's order.
PRUNEPATH_ALWAYS_INLINE void expert_ffn_dot4(const float* __restrict w, int64_t ld, const float* __restrict x,
                                             int64_t n, float* __restrict out) {
  constexpr int kLanes = 16;
  float a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
  const float* w0 = w;
  const float* w1 = w + ld;
  const float* w2 = w + 2 * ld;
  const float* w3 = w + 3 * ld;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float xv = x[i + l];
      a0[l] += w0[i + l] * xv;
      a1[l] += w1[i + l] * xv;
      a2[l] += w2[i + l] * xv;
      a3[l] += w3[i + l] * xv;
    }
  }
  float t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f;
  for (; i < n; ++i) {
    t0 += w0[i] * x[i];
    t1 += w1[i] * x[i];
    t2 += w2[i] * x[i];
    t3 += w3[i] * x[i];
  }
  for (int h = kLanes / 2; h > 0; h /= 2) {
    for (int l = 0; l < h; ++l) {
      a0[l] += a0[l + h];
      a1[l] += a1[l + h];
      a2[l] += a2[l + h];
      a3[l] += a3[l + h];
    }
  }
  out[0] = a0[0] + t0;
  out[1] = a1[0] + t1;
  out[2] = a2[0] + t2;
  out[3] = a3[0] + t3;
}

// z[q * rows + r] = <w[r], xs[q]> for one expert's [rows, d] block and n tokens.
PRUNEPATH_CPU_CLONES
inline void expert_ffn_gemv_tile(const float* w, int64_t rows, int64_t d, const float* const* xs, int64_t n,
                                 float* z) {
  int64_t r = 0;
  float out[4];
  for (; r + 4 <= rows; r += 4) {
    for (int64_t q = 0; q < n; ++q) {
      expert_ffn_dot4(w + r * d, d, xs[q], d, out);
      for (int64_t i = 0; i < 4; ++i) z[q * rows + r + i] = out[i];
    }
  }
  for (; r < rows; ++r) {
    for (int64_t q = 0; q < n; ++q) z[q * rows + r] = expert_ffn_dot(w + r * d, xs[q], d);
  }
}

// acc[c] += sum_s h[s] * w[s * ld + c] for c < nc, s in fixed groups of four.
PRUNEPATH_CPU_CLONES
inline void expert_ffn_axpy_rows(const float* h, const float* w, int64_t S, int64_t ld, int64_t nc,
                                 float* __restrict acc) {
  int64_t s = 0;
  for (; s + 4 <= S; s += 4) {
    const float h0 = h[s], h1 = h[s + 1], h2 = h[s + 2], h3 = h[s + 3];
    const float* __restrict w0 = w + s * ld;
    const float* __restrict w1 = w0 + ld;
    const float* __restrict w2 = w1 + ld;
    const float* __restrict w3 = w2 + ld;
    for (int64_t c = 0; c < nc; ++c) acc[c] += (h0 * w0[c] + h1 * w1[c]) + (h2 * w2[c] + h3 * w3[c]);
  }
  for (; s < S; ++s) {
    const float a = h[s];
    const float* __restrict ws = w + s * ld;
    for (int64_t c = 0; c < nc; ++c) acc[c] += a * ws[c];
  }
}

inline float expert_ffn_activation(float z, FfnActivation act) { return ffn_activation(z, act); }

// Copies a [rows, cols] block with row stride ld into fp32 (row stride cols).
template <typename WeightT>
void expert_ffn_to_float(const WeightT* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = static_cast<float>(src[r * ld + c]);
  }
}

// Step 2: first-layer tasks [task_begin, task_end) write h[P, S].
template <typename WeightT>
void expert_ffn_first_layer(const ExpertFfnParams& p, const ExpertFfnData<WeightT>& data,
                            const ExpertFfnPlan& plan, int64_t task_begin, int64_t task_end, float* h) {
  constexpr bool kFloat = std::is_same_v<WeightT, float>;
  const int64_t d = p.hidden;
  const int64_t S = p.width;
  const int64_t rows = p.gated ? 2 * S : S;
  std::vector<float> z(kExpertFfnTokenTile * rows);  // [tile, rows] pre-activations
  std::vector<float> w_buf(kFloat ? 0 : rows * d);   // one expert's w_in as fp32
  const float* xs[kExpertFfnTokenTile];
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t first = plan.first_tasks[task];
    const int64_t n = plan.first_tasks[task + 1] - first;
    const int32_t* pairs = plan.by_expert.data() + first;
    const int64_t e = plan.pair_expert[pairs[0]];
    const float* w;
    if constexpr (kFloat) {
      w = data.w_in + e * rows * d;
    } else {
      expert_ffn_to_float(data.w_in + e * rows * d, rows, d, d, w_buf.data());
      w = w_buf.data();
    }
    for (int64_t q = 0; q < n; ++q) xs[q] = data.x + static_cast<int64_t>(plan.pair_token[pairs[q]]) * d;
    expert_ffn_gemv_tile(w, rows, d, xs, n, z.data());
    for (int64_t q = 0; q < n; ++q) {
      const float gate = plan.pair_gate[pairs[q]];
      const float* zq = z.data() + q * rows;
      float* hq = h + static_cast<int64_t>(pairs[q]) * S;
      for (int64_t s = 0; s < S; ++s) {
        float pre = zq[s];
        if (data.b_in != nullptr) pre += static_cast<float>(data.b_in[e * S + s]);
        const float a = expert_ffn_activation(pre, p.act);
        hq[s] = gate * (p.gated ? a * zq[S + s] : a);
      }
    }
  }
}

inline int64_t expert_ffn_down_tasks(const ExpertFfnParams& p) {
  const int64_t blocks = (p.hidden + kExpertFfnDownBlock - 1) / kExpertFfnDownBlock;
  const int64_t tiles = (p.num_tokens + kExpertFfnDownTokens - 1) / kExpertFfnDownTokens;
  return blocks * tiles;
}

// Step 3: down-projection tasks [task_begin, task_end). Task i owns column
// block i / tiles and token tile i % tiles, so consecutive tasks of a thread
// reuse the same columns of w_down from cache. A token's slots are summed in
// slot order.
template <typename WeightT>
void expert_ffn_down(const ExpertFfnParams& p, const ExpertFfnData<WeightT>& data, const ExpertFfnPlan& plan,
                     const float* h, int64_t task_begin, int64_t task_end) {
  constexpr bool kFloat = std::is_same_v<WeightT, float>;
  constexpr int64_t B = kExpertFfnDownBlock;
  const int64_t d = p.hidden;
  const int64_t S = p.width;
  const int64_t tiles = (p.num_tokens + kExpertFfnDownTokens - 1) / kExpertFfnDownTokens;
  std::vector<float> w_buf(kFloat ? 0 : S * B);  // one expert's [S, B] column block as fp32
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t c0 = (task / tiles) * B;
    const int64_t nc = d - c0 < B ? d - c0 : B;
    const int64_t t0 = (task % tiles) * kExpertFfnDownTokens;
    const int64_t t1 = t0 + kExpertFfnDownTokens < p.num_tokens ? t0 + kExpertFfnDownTokens : p.num_tokens;
    for (int64_t t = t0; t < t1; ++t) {
      float acc[B] = {};
      for (int64_t q = plan.token_pairs[t]; q < plan.token_pairs[t + 1]; ++q) {
        const WeightT* w = data.w_down + static_cast<int64_t>(plan.pair_expert[q]) * S * d + c0;
        if constexpr (kFloat) {
          expert_ffn_axpy_rows(h + q * S, w, S, d, nc, acc);
        } else {
          expert_ffn_to_float(w, S, nc, d, w_buf.data());
          expert_ffn_axpy_rows(h + q * S, w_buf.data(), S, nc, nc, acc);
        }
      }
      WeightT* yt = data.y + t * d + c0;
      for (int64_t c = 0; c < nc; ++c) {
        const float bias = data.b_out != nullptr ? static_cast<float>(data.b_out[c0 + c]) : 0.f;
        yt[c] = static_cast<WeightT>(acc[c] + bias);
      }
    }
  }
}

}  // namespace prunepath
