// Top-p routing for long batches (E in 65..kToppRouteWarpMaxExperts): the
// "lean" warp-per-token kernel plus a deferred full-sort pass. Torch-free.
//
// Why a second warp kernel: the original one (topp_route_warp.cuh) keeps its
// full-sort fallback (the whole row of keys in registers) in the same kernel
// as the common path, so every warp pays the fallback's register allocation
// (96 registers and spills at E = 448, 242 at E = 1024) and the GPU runs few
// warps; the common path also does two histogram passes, an IEEE division per
// expert and a second softmax after the sort. Here:
//   1. The common path (threshold, sort of the candidates, scan, outputs) is the
//      only thing in topp_route_lean_kernel. A token it cannot decide (tau >= 1
//      or NaN, too many candidates, min_experts past them, a probability tie
//      between different 16-bit logits) gets num_active = kToppRouteDeferred and
//      nothing else; topp_route_deferred_kernel, launched right after on the
//      same stream (no host synchronisation, a grid sized for the device, so it
//      is CUDA-graph safe), re-routes exactly those tokens with the original
//      full sort. The flag lives in the output itself: no workspace, no memset.
//   2. One histogram pass instead of two: 512 bins (15 binades below the
//      largest weight x the top 5 mantissa bits) of fixed-point weight, filled
//      with shared-memory integer atomics (integer sums do not depend on the
//      order, so the threshold is deterministic).
//   3. Only the candidates get a probability, p = w / total through a hoisted
//      reciprocal and two FMA corrections, bit-identical to the IEEE division
//      (see div_by_total_fma).
//   4. (logit, weight) stay in shared memory, indexed by expert, so nothing is
//      recomputed after the sort but the candidates' divisions.
//   5. Outputs are written with 16-byte stores, coalesced across the warp (the
//      -1 / 0 padding is most of the bytes this op moves).
// The selection is the original kernel's: same probabilities (same expression,
// same double-precision normaliser in the same order), same keys, same order
// check. Only the grouping of the double-precision cumulative sum can differ
// (it depends on how many candidates are sorted, as it already did), which can
// move a cumulative sum by one fp32 ulp only when its exact value lies within
// ~1e-16 of a rounding boundary.
#pragma once

#include <type_traits>

#include "prunepath/topp_route_common.cuh"
#include "prunepath/topp_route_warp.cuh"

namespace prunepath {

// num_active of a token the lean kernel left to the deferred full-sort pass.
constexpr int32_t kToppRouteDeferred = -1;
// Threshold histogram: 15 binades below the top weight (1), 32 bins each.
constexpr int kLeanHistBins = 512;
static_assert(kLeanHistBins >= kToppRouteMaxCandidates,
              "the histogram and the candidate list share one buffer");

namespace detail {

// fl(w / total) for w in [0, 1] and total in [1, 4096], exactly as the IEEE
// division rounds it, but with the reciprocal hoisted out of the per-expert
// loop: q0 = w * y with y = fl(1 / total), then two Newton corrections
// q' = q + (w - total * q) * y, the residual exact through the FMA. By
// Markstein's theorem one correction of a quotient already within one ulp is
// correctly rounded when y is fl(1 / total); the first correction brings q0
// there. (An exhaustive check over every w mantissa for 20000 random divisors
// found the single correction already exact.) The residual must not underflow:
// exact for w = 0 and for w >= 2^-80 (a logit ~55 below the row maximum); the
// lean kernel divides only candidates, whose weights are >= 2^-15.
__device__ __forceinline__ float div_by_total_fma(float w, float total, float inv_total) {
  float q = __fmul_rn(w, inv_total);
  q = __fmaf_rn(__fmaf_rn(-total, q, w), inv_total, q);
  return __fmaf_rn(__fmaf_rn(-total, q, w), inv_total, q);
}

// Whether slot i (experts 32i .. 32i + 31) holds any expert. The lean kernel
// runs with 16 IPL < E <= 32 IPL (dispatch_row_width; launch_lean checks), so
// slots 0 .. IPL/2 always do: their loop iterations need no uniform branch on E
// (the branches were ~9 % of the kernel's instructions at E = 448, IPL = 16).
template <int IPL>
__device__ __forceinline__ bool lean_slot_present(int i, int E) {
  return i <= IPL / 2 || i * 32 < E;
}

// What the selection needs of one row: (logit, weight) of expert e in gp[e],
// the normaliser and its reciprocal, tau, the logits' dtype.
struct LeanRow {
  const float2* gp;
  float total, inv_total, tau;
  LogitDType dtype;
  // fl(w / total) of a candidate: its weight is >= 2^-15, so the FMA sequence
  // is exact (div_by_total_fma); 0 stays 0.
  __device__ float probability(float w) const { return div_by_total_fma(w, total, inv_total); }
};

// Scans and selects one row whose `count` candidates (a prefix of the full
// order, closed under probability ties) are sorted in `key` (descending,
// blocked: lane l holds positions l * C + i). Writes the outputs and returns
// true, or returns false, writing nothing, when the candidates do not decide
// the row (the threshold or min_experts reaches past them, or, with
// `check_order`, two neighbours are out of (probability desc, index asc)
// order). Same arithmetic as detail::select_sorted_row.
template <int C, typename KeyPolicy>
__device__ __forceinline__ bool lean_select(const ToppRouteParams& p, int64_t t, int lane,
                                            const typename KeyPolicy::Key (&key)[C], int count,
                                            const LeanRow& row, bool check_order) {
  const int E = p.num_experts;
  const float2* gp = row.gp;
  const float tau = row.tau;
  // Registers matter here (C = 8 with 64-bit keys is the kernel's peak): the
  // expert is decoded from the key when needed and the logit re-read from gp.
  float prob[C];
  double lane_total = 0.0;
#pragma unroll
  for (int i = 0; i < C; ++i) {
    prob[i] = lane * C + i < count ? row.probability(gp[KeyPolicy::expert(key[i])].y) : 0.0f;
    lane_total += prob[i];
  }
  double running = warp_exclusive_scan(lane_total, lane);
  float cumulative[C];
  int first = E;
#pragma unroll
  for (int i = 0; i < C; ++i) {
    running += prob[i];
    cumulative[i] = static_cast<float>(running);
    const int pos = lane * C + i;
    if (pos < count && !(cumulative[i] < tau) && pos < first) first = pos;
  }
  first = static_cast<int>(__reduce_min_sync(kFullMask, static_cast<unsigned>(first)));
  if (first >= count) return false;  // the crossing lies past the candidates
  const int n = clamp_active(first, tau, E, p.min_experts, p.k);
  if (n > count) return false;  // min_experts reaches past them

  if (check_order) {  // see select_sorted_row: every neighbour pair, not only the kept ones
    // The keys order by logit. Neighbours with equal logits have equal
    // probabilities and are in index order by construction; neighbours with
    // different logits need strictly decreasing probabilities. (A probability
    // tie between different 16-bit logits is deferred even when the indices
    // happen to be in order: rare, and one test less per key than the exact
    // rule.) Past `count`: key 0 and probability 0, so never flagged, while a
    // candidate's probability is > 0.
    using Key = typename KeyPolicy::Key;
    float next_prob = __shfl_down_sync(kFullMask, prob[0], 1);
    Key next_key = __shfl_down_sync(kFullMask, key[0], 1);
    if (lane == 31) next_prob = 0.0f, next_key = 0;
    bool bad = false;
#pragma unroll
    for (int i = 0; i < C; ++i) {
      const float q = i + 1 < C ? prob[i + 1 < C ? i + 1 : i] : next_prob;
      const Key k = i + 1 < C ? key[i + 1 < C ? i + 1 : i] : next_key;
      bad |= !(prob[i] > q) && ((key[i] ^ k) >> KeyPolicy::kValueShift) != 0;
    }
    if (__any_sync(kFullMask, bad)) return false;
  }

  float kept_mass = 0.0f;
#pragma unroll
  for (int i = 0; i < C; ++i) {
    if (lane * C + i == n - 1) kept_mass = cumulative[i];
  }
  kept_mass = __shfl_sync(kFullMask, kept_mass, n > 0 ? (n - 1) / C : 0);

  int32_t ids[C];
#pragma unroll
  for (int i = 0; i < C; ++i) ids[i] = lane * C + i < n ? KeyPolicy::expert(key[i]) : -1;
  // gate_value per slot, with its switch on the (uniform) mode taken once.
  float gates[C];
  auto fill_gates = [&](auto gate_of) {
#pragma unroll
    for (int i = 0; i < C; ++i) gates[i] = ids[i] >= 0 ? gate_of(i) : 0.0f;
  };
  switch (p.gate) {
    case GateMode::kSigmoid: fill_gates([&](int i) { return sigmoid(gp[ids[i]].x); }); break;
    case GateMode::kProb: fill_gates([&](int i) { return prob[i]; }); break;
    case GateMode::kRenorm: fill_gates([&](int i) { return prob[i] / kept_mass; }); break;
    default: fill_gates([](int) { return 1.0f; }); break;
  }

  // Sorted slots 0 .. 32C-1 (lane l: l*C .. l*C+C-1, so one warp store covers
  // 128*C contiguous bytes); the caller pads from 32C on (lean_pad_row).
  int32_t* out_ids = p.expert_ids + t * p.k;
  float* out_gates = p.gates + t * p.k;
  const int base = lane * C;
  const bool vec4 = (p.k & 3) == 0;  // rows start 16-byte aligned
  if constexpr (C % 4 == 0) {
    if (vec4) {
#pragma unroll
      for (int i = 0; i < C; i += 4) {
        if (base + i < p.k) {
          *reinterpret_cast<int4*>(out_ids + base + i) =
              make_int4(ids[i], ids[i + 1], ids[i + 2], ids[i + 3]);
          *reinterpret_cast<float4*>(out_gates + base + i) =
              make_float4(gates[i], gates[i + 1], gates[i + 2], gates[i + 3]);
        }
      }
    }
  } else if constexpr (C == 2) {
    if ((p.k & 1) == 0 && base < p.k) {
      *reinterpret_cast<int2*>(out_ids + base) = make_int2(ids[0], ids[1]);
      *reinterpret_cast<float2*>(out_gates + base) = make_float2(gates[0], gates[1]);
    }
  }
  const bool stored = C % 4 == 0 ? vec4 : (C == 2 ? (p.k & 1) == 0 : false);
  if (!stored) {
#pragma unroll
    for (int i = 0; i < C; ++i) {
      if (base + i < p.k) {
        out_ids[base + i] = ids[i];
        out_gates[base + i] = gates[i];
      }
    }
  }
  if (lane == 0) p.num_active[t] = n;
  return true;
}

// The -1 / 0 padding of row t from slot `from` (a multiple of 32) to k <= 32 IPL:
// 16 bytes per lane and store where rows are 16-byte aligned, as IPL / 4
// predicated stores of each output.
template <int IPL>
__device__ __forceinline__ void lean_pad_row(const ToppRouteParams& p, int64_t t, int lane, int from) {
  int32_t* out_ids = p.expert_ids + t * p.k;
  float* out_gates = p.gates + t * p.k;
  if ((p.k & 3) == 0) {
    int4* ids4 = reinterpret_cast<int4*>(out_ids + from) + lane;
    float4* gates4 = reinterpret_cast<float4*>(out_gates + from) + lane;
    const int left = (p.k - from) / 4 - lane;  // this lane's words: 0, 32, ... below `left`
#pragma unroll
    for (int w = 0; w < IPL / 4; ++w) {
      if (32 * w < left) {
        ids4[32 * w] = make_int4(-1, -1, -1, -1);
        gates4[32 * w] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
    }
  } else {
    for (int pos = from + lane; pos < p.k; pos += 32) {
      out_ids[pos] = -1;
      out_gates[pos] = 0.0f;
    }
  }
}

// Makes the keys of the `count` candidate experts listed in `cand`, sorts them
// with C keys per lane, then lean_select.
template <int C, typename KeyPolicy>
__device__ __forceinline__ bool lean_sort_select(const ToppRouteParams& p, int64_t t, int lane,
                                                 const unsigned* cand, int count, const LeanRow& row,
                                                 bool check_order) {
  typename KeyPolicy::Key key[C];
#pragma unroll
  for (int i = 0; i < C; ++i) {
    const int j = i * 32 + lane;
    key[i] = 0;
    if (j < count) {
      const int e = static_cast<int>(cand[j]);
      const float2 v = row.gp[e];
      // 16-bit logits key on the logit (the probability is not needed);
      // exact keys on the probability.
      const float prob = std::is_same_v<KeyPolicy, ProbKey64> ? row.probability(v.y) : 0.0f;
      key[i] = KeyPolicy::make(v.x, prob, e, row.dtype);
    }
  }
  warp_bitonic_sort_desc<C>(key, lane);
  return lean_select<C, KeyPolicy>(p, t, lane, key, count, row, check_order);
}

// The smallest sort (C keys per lane, C in 1, 2, 4, 8 and 32C <= 32 MAX_C) that
// holds `count` <= 32 MAX_C candidates. Returns the slots it wrote (32C: the
// row's padding starts there), or 0 when the candidates did not decide the row.
template <int MAX_C, typename KeyPolicy>
__device__ __forceinline__ int lean_dispatch(const ToppRouteParams& p, int64_t t, int lane,
                                             const unsigned* cand, int count, const LeanRow& row,
                                             bool check_order) {
  if (count <= 32) return lean_sort_select<1, KeyPolicy>(p, t, lane, cand, count, row, check_order) ? 32 : 0;
  if constexpr (MAX_C >= 2) {
    if (count <= 64)
      return lean_sort_select<2, KeyPolicy>(p, t, lane, cand, count, row, check_order) ? 64 : 0;
  }
  if constexpr (MAX_C >= 4) {
    if (count <= 128)
      return lean_sort_select<4, KeyPolicy>(p, t, lane, cand, count, row, check_order) ? 128 : 0;
  }
  if constexpr (MAX_C >= 8) {
    return lean_sort_select<8, KeyPolicy>(p, t, lane, cand, count, row, check_order) ? 256 : 0;
  }
  return 0;
}

}  // namespace detail

// Brings the 128-byte lines of a logit row into L2 (lanes take one line each).
// With L2_AHEAD the lean kernel's warp for token t issues it for token t + ahead,
// a token that a warp of a later resident wave routes, so that warp's row loads
// hit L2 instead of DRAM. `ahead` is kLeanPrefetchWaves of the warps resident on
// the whole GPU: at T = 65536, bf16, 0.25 .. 0.5 waves measured best (-7 % at
// E = 448, -17 % at E = 1024), one wave less good, two waves worse than none
// (the rows are evicted before they are read). Once load_row issued all of a
// row's loads at once, the prefetch cost more than it saved (+2.7 % at E = 448,
// +0.4 % at E = 1024): opt-in since (PRUNEPATH_TOPP_KERNEL=lean_prefetch);
// bench/results/topp_route_lean_tuning_h200.md.
constexpr double kLeanPrefetchWaves = 0.375;

__device__ __forceinline__ void prefetch_row_l2(const void* row, int64_t bytes, int lane) {
#if defined(__CUDA_ARCH__)
  const uintptr_t begin = reinterpret_cast<uintptr_t>(row);
  for (uintptr_t line = (begin & ~uintptr_t{127}) + 128u * lane; line < begin + bytes; line += 32u * 128u) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
  }
#else
  (void)row, (void)bytes, (void)lane;
#endif
}

// Blocks per SM asked of the register allocator: IPL <= 16 fits 64 registers
// (8 blocks of 4 warps: half the SM's warp slots); IPL = 32 holds 64 row values.
constexpr int lean_kernel_min_blocks(int ipl) { return ipl <= 16 ? 8 : 4; }

// One warp per token, E in 65 .. 32 * IPL (IPL >= 4; smaller rows use the
// original kernel, whose full sort of <= 64 keys is already cheap). NARROW:
// 16-bit logits (32-bit sort keys, order checked); else fp32 logits (exact
// 64-bit keys). A template parameter, so that the 16-bit kernels do not carry
// the register needs of the 64-bit sort. L2_AHEAD: prefetch the row of token
// t + `ahead` (see prefetch_row_l2).
template <int IPL, bool NARROW, bool L2_AHEAD>
__global__ void __launch_bounds__(kToppRouteWarpsPerBlock * 32, lean_kernel_min_blocks(IPL))
    topp_route_lean_kernel(const ToppRouteParams p, const void* __restrict__ logits, LogitDType dtype,
                           int64_t ahead) {
  static_assert(IPL >= 4 && IPL <= 32, "E <= 64 goes to topp_route_warp_kernel");
  constexpr int kMaxC = IPL < 8 ? IPL : 8;  // candidate sort: at most 32 * kMaxC <= kToppRouteMaxCandidates
  // The candidate scan reads the weights from registers or from shared memory:
  // registers won at IPL = 32 (-5 %), lost at IPL = 16 (+5 %: the 64-register
  // budget of 8 blocks per SM; topp_route_lean_tuning_h200.md, session 24).
  constexpr bool kWeightsInRegisters = IPL > 16;
  // Per warp: the histogram and one spill bin per lane, then the candidate
  // list (one buffer); and (logit, weight) of every expert.
  __shared__ __align__(16) unsigned scratch_smem[kToppRouteWarpsPerBlock][kLeanHistBins + 32];
  __shared__ float2 gp_smem[kToppRouteWarpsPerBlock][32 * IPL];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kToppRouteWarpsPerBlock + warp;
  if (t >= p.num_tokens) return;  // whole warps only
  const int E = p.num_experts;
  if constexpr (L2_AHEAD) {
    if (t + ahead < p.num_tokens) {
      const int64_t size = NARROW ? 2 : 4;
      prefetch_row_l2(static_cast<const char*>(logits) + (t + ahead) * p.logits_stride * size, E * size,
                      lane);
    }
  }
  const float tau = p.tau_per_token ? p.tau_per_token[t * p.tau_stride] : p.tau;
  if (!(tau < 1.0f) || p.min_experts > kToppRouteMaxCandidates) {  // only the full sort decides these
    if (lane == 0) p.num_active[t] = kToppRouteDeferred;
    return;
  }
  unsigned* hist = scratch_smem[warp];
#pragma unroll
  for (int k = 0; k < kLeanHistBins / 128; ++k) {
    reinterpret_cast<uint4*>(hist)[k * 32 + lane] = make_uint4(0u, 0u, 0u, 0u);
  }

  // Softmax exactly as topp_route_warp_kernel: striped row (expert i * 32 + lane),
  // per-lane sums in slot order, then the butterfly; the normaliser rounded once.
  // The logits go to shared memory at once (gp[e].x), so that only the weights
  // stay in registers once they are computed.
  float2* gp = gp_smem[warp];
  float g[IPL];
  detail::load_row<IPL>(logits, t * p.logits_stride, E, lane, dtype, g);
  float local_max = -INFINITY;
#pragma unroll
  for (int i = 0; i < IPL; ++i) {
    gp[i * 32 + lane].x = g[i];  // past E: -inf into a spare entry, never read
    local_max = fmaxf(local_max, g[i]);
  }
  const float row_max = detail::warp_max(local_max);
  float w[IPL];
  double local_sum = 0.0;
  if (row_max != -INFINITY && row_max != INFINITY) {
    // softmax_weight's common case, with its per-element branches hoisted; the
    // padding (g = -inf) gets router_exp(-inf) = 0 as it should. Slots wholly past E
    // are skipped (uniform branches; here and below): adding their zeros would
    // not change the sum.
#pragma unroll
    for (int i = 0; i < IPL; ++i) {
      w[i] = 0.0f;
      if (!detail::lean_slot_present<IPL>(i, E)) continue;
      w[i] = router_exp(g[i] - row_max);
      local_sum += w[i];
    }
  } else {
#pragma unroll
    for (int i = 0; i < IPL; ++i) {
      w[i] = i * 32 + lane < E ? softmax_weight(g[i], row_max) : 0.0f;
      local_sum += w[i];
    }
  }
  const float total = static_cast<float>(detail::warp_sum(local_sum));
  const float inv_total = 1.0f / total;

  // Weights, straight into shared memory next to their logits, and into the
  // threshold histogram. The row maximum has weight exactly 1 (2^0, or 1 by
  // definition for the +-inf rows) and w <= 1, so bin(w) = kTopBin -
  // (bits(w) >> 18) orders the weights largest first in 32 bins per binade
  // (bits >> 18 is the exponent and the top 5 mantissa bits), bins 31 .. 511
  // holding the 15 binades below 1; smaller weights (and w = 0) are not tracked.
  // Binning weights, not probabilities p = w / total, leaves the division to the
  // ~C candidates per lane (lean_select): -5 % of the kernel's instructions
  // (session 24). Masses are w * 2^s truncated, 2^s the power of two that puts
  // total * 2^s in [2^30, 2^31): the sum of all stays below 2^31, truncation
  // only lowers it (by < E 2^-30 of the total), and integer sums do not depend
  // on the order of the atomics. A slot past E has w = 0: it lands in gp's
  // spare entries and in no bin.
  constexpr unsigned kTopBin = (0x3f800000u >> 18) | 31u;  // bits(1.0f) >> 18, end of its 32 bins
  // 2^(30 - exponent of total); total is in [1, E]: the row maximum's weight 1, E ones at most.
  const float mass_scale = __uint_as_float((127u + 157u - (__float_as_uint(total) >> 23)) << 23);
  __syncwarp();  // the histogram is zeroed
#pragma unroll
  for (int i = 0; i < IPL; ++i) {
    if (!detail::lean_slot_present<IPL>(i, E)) break;
    gp[i * 32 + lane].y = w[i];
    // Untracked weights go to this lane's spill bin past the 512 (never read):
    // no branch around the atomic, and no two lanes on one address.
    const unsigned bin =
        umin(kTopBin - (__float_as_uint(w[i]) >> 18), static_cast<unsigned>(kLeanHistBins + lane));
    atomicAdd(&hist[bin], __float2uint_rz(w[i] * mass_scale));
  }
  __syncwarp();

  // Lane l owns bins 16l .. 16l+15: lane sums, an inclusive scan over lanes, the
  // first lane whose running mass reaches the target, then the first bin inside
  // it. The target is (tau + 1e-5) total (as in the original kernel, in weights):
  // the candidates then hold clearly more than tau, so the exact scan crosses
  // tau inside them.
  // A lane reads its four 16-byte words starting at word (lane / 2) % 4: read in
  // order, 16 lanes would hit the same four banks (16 wavefronts a load instead
  // of 4; the kernel's main shared-memory conflict in the session-8 Nsight
  // Compute profile). Integer sums do not depend on the order.
  const uint4* hist4 = reinterpret_cast<const uint4*>(hist);
  unsigned lane_mass = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint4 v = hist4[lane * 4 + ((k + (lane >> 1)) & 3)];
    lane_mass += v.x + v.y + v.z + v.w;
  }
  unsigned inclusive = lane_mass;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const unsigned up = __shfl_up_sync(detail::kFullMask, inclusive, d);
    if (lane >= d) inclusive += up;
  }
  // tau <= 0 gives 0: the top bin.
  const unsigned target = __float2uint_ru((tau + 1e-5f) * total * mass_scale);
  const unsigned reached = __ballot_sync(detail::kFullMask, inclusive >= target);
  bool done = false;
  if (reached != 0u) {  // else the target lies in the untracked tail: full sort
    const int owner = __ffs(reached) - 1;
    const unsigned before = __shfl_sync(detail::kFullMask, inclusive - lane_mass, owner);
    unsigned bin_incl = lane < 16 ? hist[16 * owner + lane] : 0u;
#pragma unroll
    for (int d = 1; d < 16; d <<= 1) {
      const unsigned up = __shfl_up_sync(detail::kFullMask, bin_incl, d);
      if (lane >= d) bin_incl += up;
    }
    // Lane 15 holds the owner's whole mass, so some lane < 16 reaches the target.
    const unsigned reached_bin = __ballot_sync(detail::kFullMask, lane < 16 && before + bin_incl >= target);
    const unsigned theta = kTopBin - static_cast<unsigned>(16 * owner + __ffs(reached_bin) - 1);
    __syncwarp();  // the histogram is read: its buffer takes the candidate list

    // Candidates {w >= edge}, edge the chosen bin's lower edge (>= 2^-15), first
    // lowered past any float whose probability equals the edge's (at most two:
    // w -> fl(w / total) is monotone and at most 3-to-1). Then every candidate's
    // probability is strictly above every other expert's, so the candidates are
    // exactly a prefix of the full (probability desc, index asc) order.
    // Each lane marks its own, an exclusive scan of the counts gives its first
    // slot, and it writes the expert indices there in slot order: the sort does
    // not care about the order of distinct keys, and a key is made only for the
    // ~C per lane that the sort loads (lean_sort_select), not for every expert.
    // (The ballot compaction in expert order it replaces, keys made for all,
    // was ~21 % of the kernel's instructions: session-24 source profile.)
    float edge = __uint_as_float(theta << 18);
    for (;;) {  // uniform: every lane holds the same values
      const float below = __uint_as_float(__float_as_uint(edge) - 1u);
      const bool same = detail::div_by_total_fma(below, total, inv_total) ==
                        detail::div_by_total_fma(edge, total, inv_total);
      if (!same) break;
      edge = below;
    }
    auto weight = [&](int i) { return kWeightsInRegisters ? w[i] : gp[i * 32 + lane].y; };
    unsigned taken = 0;  // bit i: slot i's expert is a candidate
#pragma unroll
    for (int i = 0; i < IPL; ++i) {
      if (!detail::lean_slot_present<IPL>(i, E)) break;
      if (weight(i) >= edge) taken |= 1u << i;  // past E: weight 0, never taken
    }
    const int mine = __popc(taken);
    const int through_me = detail::warp_inclusive_scan(mine, lane);
    const int count = __shfl_sync(detail::kFullMask, through_me, 31);
    if (count <= 32 * kMaxC) {
      unsigned* slot = scratch_smem[warp] + (through_me - mine);
#pragma unroll
      for (int i = 0; i < IPL; ++i) {
        if (taken & (1u << i)) *slot++ = static_cast<unsigned>(i * 32 + lane);
      }
      __syncwarp();
      using Policy = std::conditional_t<NARROW, detail::LogitKey32, detail::ProbKey64>;
      const detail::LeanRow row{gp, total, inv_total, tau, dtype};
      const int sorted =
          detail::lean_dispatch<kMaxC, Policy>(p, t, lane, scratch_smem[warp], count, row, NARROW);
      if (sorted > 0 && sorted < p.k) detail::lean_pad_row<IPL>(p, t, lane, sorted);
      done = sorted > 0;
    }
  }
  if (!done && lane == 0) p.num_active[t] = kToppRouteDeferred;
}

// The second pass: every token flagged kToppRouteDeferred, routed with the
// original kernel's full sort (16-bit logit keys checked against the
// probabilities, else exact probability keys). A grid-stride loop over chunks
// of 32 tokens per warp: one coalesced read of num_active per chunk, so a pass
// with nothing to do costs one read of [T] int32 and a launch.
template <int IPL>
__global__ void __launch_bounds__(kToppRouteWarpsPerBlock * 32, warp_kernel_min_blocks(IPL))
    topp_route_deferred_kernel(const ToppRouteParams p, const void* __restrict__ logits, LogitDType dtype) {
  __shared__ float logit_smem[kToppRouteWarpsPerBlock][32 * IPL];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  float* row_logit = logit_smem[warp];
  const int E = p.num_experts;
  const bool narrow = dtype != LogitDType::kFloat32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kToppRouteWarpsPerBlock * 32;
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * kToppRouteWarpsPerBlock + warp) * 32;
       base < p.num_tokens; base += stride) {
    const bool flagged = base + lane < p.num_tokens && p.num_active[base + lane] == kToppRouteDeferred;
    unsigned pending = __ballot_sync(detail::kFullMask, flagged);
    while (pending != 0u) {
      const int64_t t = base + __ffs(pending) - 1;
      pending &= pending - 1u;
      __syncwarp();  // the previous token's row_logit reads are done
      const float tau = p.tau_per_token ? p.tau_per_token[t * p.tau_stride] : p.tau;
      float g[IPL];
      detail::load_row<IPL>(logits, t * p.logits_stride, E, lane, dtype, g);
      float local_max = -INFINITY;
#pragma unroll
      for (int i = 0; i < IPL; ++i) {
        if (i * 32 + lane < E) row_logit[i * 32 + lane] = g[i];
        local_max = fmaxf(local_max, g[i]);
      }
      const float row_max = detail::warp_max(local_max);
      double local_sum = 0.0;
#pragma unroll
      for (int i = 0; i < IPL; ++i) local_sum += i * 32 + lane < E ? softmax_weight(g[i], row_max) : 0.0f;
      const float total = static_cast<float>(detail::warp_sum(local_sum));
      __syncwarp();
      if (!(narrow && detail::route_row_full<IPL, detail::LogitKey32>(p, t, lane, row_logit, row_max, total,
                                                                      tau, dtype, true))) {
        detail::route_row_full<IPL, detail::ProbKey64>(p, t, lane, row_logit, row_max, total, tau, dtype,
                                                       false);
      }
    }
  }
}

}  // namespace prunepath
