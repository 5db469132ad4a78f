// Top-p routing for rows of up to kToppRouteWarpMaxExperts experts: one warp
// per token, the whole row in registers (IPL = items per lane, 32 * IPL >= E).
//
// Sorting is a register bitonic network on keys that embed the expert index,
// so every key is distinct and the order is deterministic. 16-bit logits are
// sorted on 32-bit keys (the logit's 16 bits, then the inverted index): half
// the work of 64-bit keys. Ordering by logit equals ordering by probability
// except where two different logits round to the same fp32 probability; such a
// pair inside the kept prefix is detected after the scan and the row is sorted
// again on exact (probability, index) keys. fp32 logits use those exact keys
// directly. Torch-free.
#pragma once

#include "prunepath/topp_route_common.cuh"

namespace prunepath {

constexpr int kToppRouteWarpsPerBlock = 4;

namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, m));
  return v;
}

// Butterfly sum: lanes l and l^m add the same two values (addition commutes),
// so every lane ends with identical bits, run after run.
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

// Inclusive scan over the warp's lanes (Kogge-Stone: a fixed shape, so the same bits every run).
template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T v, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const T up = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v += up;
  }
  return v;
}

__device__ __forceinline__ double warp_exclusive_scan(double v, int lane) {
  const double inclusive = warp_inclusive_scan(v, lane);
  const double previous = __shfl_up_sync(kFullMask, inclusive, 1);
  return lane == 0 ? 0.0 : previous;
}

// Sorts the warp's 32 * IPL keys into descending order; after the call lane l
// holds sorted positions l * IPL .. l * IPL + IPL - 1.
template <int IPL, typename Key>
__device__ __forceinline__ void warp_bitonic_sort_desc(Key (&a)[IPL], int lane) {
  constexpr int N = 32 * IPL;
#pragma unroll
  for (int k = 2; k <= N; k <<= 1) {
#pragma unroll
    for (int j = k >> 1; j > 0; j >>= 1) {
      // Compare-exchanges as one comparison folded with the direction and
      // selects (2-3 instructions), not min + max + select (3-4): the sort is
      // the largest part of the lean kernel (session-9 source profile).
      // Position lane * IPL + i sorts descending where its bit k is clear. IPL
      // is a power of two, so below k = IPL that bit is i's (known at compile
      // time) and from k = IPL on it is the lane's, the same for all its slots:
      // one test per stage, not one per key (~2 % of the lean kernel's
      // instructions, session-24 source profile).
      const bool lane_desc = ((lane * IPL) & k) == 0;
      if (j >= IPL) {  // partner lives in lane ^ (j / IPL), same slot
        const int lane_mask = j / IPL;
        // Keep the larger key where lower == desc, else the smaller.
        const bool keep_larger = ((lane & lane_mask) == 0) == lane_desc;
#pragma unroll
        for (int i = 0; i < IPL; ++i) {
          const Key other = __shfl_xor_sync(kFullMask, a[i], lane_mask);
          a[i] = (other > a[i]) == keep_larger ? other : a[i];
        }
      } else {  // partner is slot i ^ j of this lane
#pragma unroll
        for (int i = 0; i < IPL; ++i) {
          if ((i & j) == 0) {
            const bool desc = k < IPL ? (i & k) == 0 : lane_desc;
            const Key x = a[i];
            const Key y = a[i | j];
            const bool swap = (x < y) == desc;  // descending wants x >= y
            a[i] = swap ? y : x;
            a[i | j] = swap ? x : y;
          }
        }
      }
    }
  }
}

// 16-bit keys ordered like the logits they encode (sign-magnitude to offset).
__device__ __forceinline__ uint32_t ordered_bits16(float g, LogitDType dtype) {
  if (g == 0.0f) g = 0.0f;  // -0 -> +0: equal logits need equal keys, or a tie loses index order
  const uint32_t bits = dtype == LogitDType::kBFloat16
                            ? (__float_as_uint(g) >> 16)
                            : static_cast<uint32_t>(__half_as_ushort(__float2half_rn(g)));
  return bits ^ ((bits & 0x8000u) ? 0xffffu : 0x8000u);
}

struct LogitKey32 {  // (logit desc, index asc) for 16-bit logits; 0 is padding
  using Key = uint32_t;
  static constexpr int kValueShift = 16;  // key >> kValueShift: the ordered value, without the index
  __device__ static Key make(float g, float, int e, LogitDType dtype) {
    return (ordered_bits16(g, dtype) << 16) | static_cast<uint32_t>(0xffff - e);
  }
  // 0xffff - (k & 0xffff) as one LOP3.
  __device__ static int expert(Key k) { return static_cast<int>(~k & 0xffffu); }
};

struct ProbKey64 {  // (probability desc, index asc), exact; 0 is padding
  using Key = unsigned long long;
  static constexpr int kValueShift = 32;
  __device__ static Key make(float, float prob, int e, LogitDType) {
    return (static_cast<Key>(__float_as_uint(prob)) << 32) |
           static_cast<Key>(0xffffffffu - static_cast<uint32_t>(e));
  }
  __device__ static int expert(Key k) {
    return static_cast<int>(0xffffffffu - static_cast<uint32_t>(k & 0xffffffffull));
  }
};

// Scans and selects one row whose `count` largest experts are sorted in `key`
// (descending, blocked: lane l holds positions l * IPL + i), then writes the
// outputs and returns true. Returns false, writing nothing, when the answer is
// not decided by these keys: `partial` (the keys are only a candidate prefix)
// and the threshold or min_experts reaches past them, or `check_order` finds
// two neighbouring experts out of (probability desc, index asc) order.
template <int IPL, typename KeyPolicy>
__device__ __forceinline__ bool select_sorted_row(const ToppRouteParams& p, int64_t t, int lane,
                                                  const typename KeyPolicy::Key (&key)[IPL], int count,
                                                  const float* row_logit, float row_max, float total,
                                                  float tau, bool partial, bool check_order) {
  const int E = p.num_experts;
  // Probabilities in sorted order, then the inclusive cumulative sum: each lane
  // sums its slots in order in double, offset by an exclusive scan of the
  // lane totals; every c is rounded once to fp32.
  float prob[IPL];
  double lane_total = 0.0;
#pragma unroll
  for (int i = 0; i < IPL; ++i) {
    const int pos = lane * IPL + i;
    prob[i] = pos < count ? softmax_weight(row_logit[KeyPolicy::expert(key[i])], row_max) / total : 0.0f;
    lane_total += prob[i];
  }
  double running = warp_exclusive_scan(lane_total, lane);
  float cumulative[IPL];
  int first = E;
#pragma unroll
  for (int i = 0; i < IPL; ++i) {
    running += prob[i];
    cumulative[i] = static_cast<float>(running);
    const int pos = lane * IPL + i;
    if (pos < count && !(cumulative[i] < tau) && pos < first) first = pos;
  }
  first = static_cast<int>(__reduce_min_sync(kFullMask, static_cast<unsigned>(first)));
  if (partial && first >= count) return false;
  const int n = clamp_active(first, tau, E, p.min_experts, p.k);
  if (partial && n > count) return false;

  if (check_order) {
    // Every slot must precede the next in (probability desc, index asc): a run of
    // equal probabilities from different logits can straddle the kept prefix,
    // so checking the kept slots alone is not enough (a lower index sorted to
    // the end of such a run would be dropped in favour of a higher one).
    const float next_prob = __shfl_down_sync(kFullMask, prob[0], 1);
    const int next_expert = __shfl_down_sync(kFullMask, KeyPolicy::expert(key[0]), 1);
    bool bad = false;
#pragma unroll
    for (int i = 0; i < IPL; ++i) {
      const int pos = lane * IPL + i;
      const float q = i + 1 < IPL ? prob[i + 1 < IPL ? i + 1 : i] : next_prob;
      const int f = i + 1 < IPL ? KeyPolicy::expert(key[i + 1 < IPL ? i + 1 : i]) : next_expert;
      if (pos + 1 < count) bad |= prob[i] < q || (prob[i] == q && KeyPolicy::expert(key[i]) > f);
    }
    if (__any_sync(kFullMask, bad)) return false;
  }

  float kept_mass = 0.0f;
#pragma unroll
  for (int i = 0; i < IPL; ++i) {
    if (lane * IPL + i == n - 1) kept_mass = cumulative[i];
  }
  kept_mass = __shfl_sync(kFullMask, kept_mass, n > 0 ? (n - 1) / IPL : 0);

  int32_t ids[IPL];
  float gates[IPL];
#pragma unroll
  for (int i = 0; i < IPL; ++i) {
    const bool kept = lane * IPL + i < n;
    const int e = kept ? KeyPolicy::expert(key[i]) : 0;
    ids[i] = kept ? e : -1;
    gates[i] = kept ? gate_value(p.gate, row_logit[e], prob[i], kept_mass) : 0.0f;
  }
  int32_t* out_ids = p.expert_ids + t * p.k;
  float* out_gates = p.gates + t * p.k;
  const int base = lane * IPL;
  const bool vector_rows = (p.k & 3) == 0;  // rows start 16-byte aligned
  if (IPL % 4 == 0 && vector_rows) {
#pragma unroll
    for (int i = 0; i < IPL; i += 4) {
      if (base + i < p.k) {
        *reinterpret_cast<int4*>(out_ids + base + i) =
            make_int4(ids[i], ids[(i + 1) % IPL], ids[(i + 2) % IPL], ids[(i + 3) % IPL]);
        *reinterpret_cast<float4*>(out_gates + base + i) =
            make_float4(gates[i], gates[(i + 1) % IPL], gates[(i + 2) % IPL], gates[(i + 3) % IPL]);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < IPL; ++i) {
      if (base + i < p.k) {
        out_ids[base + i] = ids[i];
        out_gates[base + i] = gates[i];
      }
    }
  }
  // Slots past the sorted keys (candidate path only) are all padding.
  int pos = 32 * IPL + (vector_rows ? 4 * lane : lane);
  if (vector_rows) {
    for (; pos < p.k; pos += 128) {
      *reinterpret_cast<int4*>(out_ids + pos) = make_int4(-1, -1, -1, -1);
      *reinterpret_cast<float4*>(out_gates + pos) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  } else {
    for (; pos < p.k; pos += 32) {
      out_ids[pos] = -1;
      out_gates[pos] = 0.0f;
    }
  }
  if (lane == 0) p.num_active[t] = n;
  return true;
}

// Full sort of the row (every expert), then selection.
template <int IPL, typename KeyPolicy>
__device__ __forceinline__ bool route_row_full(const ToppRouteParams& p, int64_t t, int lane,
                                               const float* row_logit, float row_max, float total, float tau,
                                               LogitDType dtype, bool check_order) {
  typename KeyPolicy::Key key[IPL];
#pragma unroll
  for (int i = 0; i < IPL; ++i) {
    const int e = i * 32 + lane;
    const float g = e < p.num_experts ? row_logit[e] : 0.0f;
    key[i] = e < p.num_experts ? KeyPolicy::make(g, softmax_weight(g, row_max) / total, e, dtype) : 0;
  }
  warp_bitonic_sort_desc<IPL>(key, lane);
  return select_sorted_row<IPL, KeyPolicy>(p, t, lane, key, p.num_experts, row_logit, row_max, total, tau,
                                           false, check_order);
}

// Candidate path: the experts with p >= theta, already compacted into
// `cand` (count of them, count <= 32 * IPL; 32-bit keys stored widened),
// sorted alone.
template <int IPL, typename KeyPolicy>
__device__ __forceinline__ bool route_row_candidates(const ToppRouteParams& p, int64_t t, int lane,
                                                     const unsigned long long* cand, int count,
                                                     const float* row_logit, float row_max, float total,
                                                     float tau, bool check_order) {
  typename KeyPolicy::Key key[IPL];
#pragma unroll
  for (int i = 0; i < IPL; ++i) {
    const int j = i * 32 + lane;
    key[i] = j < count ? static_cast<typename KeyPolicy::Key>(cand[j]) : 0;
  }
  warp_bitonic_sort_desc<IPL>(key, lane);
  return select_sorted_row<IPL, KeyPolicy>(p, t, lane, key, count, row_logit, row_max, total, tau, true,
                                           check_order);
}

}  // namespace detail

// Largest candidate set the partial-sort path sorts (a multiple of 32).
constexpr int kToppRouteMaxCandidates = 256;

namespace detail {

// The 16- or 32-bit word at p when `valid`, else `absent`, as one predicated
// load whose predicate dies when the load issues. Written in C++ (a select
// after the load), the predicate lives until the data arrives, and with 7
// predicate registers ptxas issued a row's loads in batches of five: three
// round trips per row (session-9 source profile of the lean kernel). Plain
// (not volatile) asm without a memory clobber: for the logits only, which no
// kernel writes while it routes them.
__device__ __forceinline__ unsigned short load_u16_or(const void* p, bool valid, unsigned short absent) {
#if defined(__CUDA_ARCH__)
  unsigned short v;
  asm("{\n .reg .pred q;\n setp.ne.u32 q, %2, 0;\n mov.b16 %0, %3;\n @q ld.global.b16 %0, [%1];\n}"
      : "=h"(v)
      : "l"(p), "r"(static_cast<unsigned>(valid)), "h"(absent));
  return v;
#else
  return valid ? *static_cast<const unsigned short*>(p) : absent;
#endif
}
__device__ __forceinline__ unsigned load_u32_or(const void* p, bool valid, unsigned absent) {
#if defined(__CUDA_ARCH__)
  unsigned v;
  asm("{\n .reg .pred q;\n setp.ne.u32 q, %2, 0;\n mov.b32 %0, %3;\n @q ld.global.b32 %0, [%1];\n}"
      : "=r"(v)
      : "l"(p), "r"(static_cast<unsigned>(valid)), "r"(absent));
  return v;
#else
  return valid ? *static_cast<const unsigned*>(p) : absent;
#endif
}

// Striped, coalesced load of one row (expert i * 32 + lane), NaN -> -inf;
// slots past the row read as -inf. One switch per row, not per element. The
// lane's pointer is formed once and the slots are constant offsets from it:
// indexing the row inside the predicated loads made ptxas recompute the 64-bit
// row offset for every slot (~20 instructions a slot in the same profile).
template <int IPL>
__device__ __forceinline__ void load_row(const void* logits, int64_t offset, int E, int lane,
                                         LogitDType dtype, float (&g)[IPL]) {
  const int slots = E - lane;  // slot i is an expert when i * 32 < E - lane
  if (dtype == LogitDType::kBFloat16) {
    const __nv_bfloat16* slot = static_cast<const __nv_bfloat16*>(logits) + (offset + lane);
#pragma unroll
    for (int i = 0; i < IPL; ++i) {
      const unsigned short bits = load_u16_or(slot + i * 32, i * 32 < slots, 0xff80u);  // bf16 -inf
      g[i] = sanitize_logit(__bfloat162float(__ushort_as_bfloat16(bits)));
    }
  } else if (dtype == LogitDType::kFloat16) {
    const __half* slot = static_cast<const __half*>(logits) + (offset + lane);
#pragma unroll
    for (int i = 0; i < IPL; ++i) {
      const unsigned short bits = load_u16_or(slot + i * 32, i * 32 < slots, 0xfc00u);  // fp16 -inf
      g[i] = sanitize_logit(__half2float(__ushort_as_half(bits)));
    }
  } else {
    const float* slot = static_cast<const float*>(logits) + (offset + lane);
#pragma unroll
    for (int i = 0; i < IPL; ++i) {
      g[i] = sanitize_logit(__uint_as_float(load_u32_or(slot + i * 32, i * 32 < slots, 0xff800000u)));
    }
  }
}

// One level of the threshold search: every value in `prob` whose bucket (0..31,
// 0 holds the largest probabilities) is known, per-bucket masses summed in a
// fixed order through shared memory (hist is [32 buckets][32 lanes], so each
// lane writes its own bank), then the first bucket at which the running mass,
// starting from `mass_before`, reaches `target`. Returns 32 if none does; the
// mass of the buckets before the chosen one goes to `mass_above`.
template <int IPL>
__device__ __forceinline__ int threshold_bucket(const float (&prob)[IPL], const int (&bucket)[IPL],
                                                float* hist, int lane, float mass_before, float target,
                                                float& mass_above) {
#pragma unroll
  for (int b = 0; b < 32; ++b) hist[b * 32 + lane] = 0.0f;
#pragma unroll
  for (int i = 0; i < IPL; ++i) {
    if (bucket[i] < 32) hist[bucket[i] * 32 + lane] += prob[i];
  }
  __syncwarp();
  float mass = 0.0f;  // lane b sums bucket b over the 32 lanes, in lane order
#pragma unroll 8
  for (int l = 0; l < 32; ++l) mass += hist[lane * 32 + ((l + lane) & 31)];
  __syncwarp();
  const float inclusive = warp_inclusive_scan(mass, lane);
  const unsigned reached = __ballot_sync(kFullMask, mass_before + inclusive >= target);
  const int chosen = reached ? __ffs(reached) - 1 : 32;
  mass_above = mass_before + __shfl_sync(kFullMask, inclusive - mass, chosen & 31);
  return chosen;
}

}  // namespace detail

// One warp per token. For tau < 1 the kept prefix is usually a small part of
// the row, so the kernel first looks for a threshold theta such that the set
// {p >= theta} holds at least tau of the mass but few experts: a histogram of
// the probabilities by binary exponent, then by the top 5 mantissa bits inside
// the chosen exponent, puts theta within about 3% of the smallest such value.
// Only that set is sorted. It is closed under ties, so it is exactly a prefix
// of the full order and its cumulative sums are the full row's; the exact scan
// then confirms that the threshold is crossed inside it. When the set is too
// large, tau >= 1, or min_experts reaches past it, the whole row is sorted.
// Resident blocks per SM to ask of the register allocator: the full-sort
// fallback holds the whole row in registers, but the common candidate path
// needs far fewer, and occupancy is what hides the shuffle latency.
constexpr int warp_kernel_min_blocks(int ipl) { return ipl <= 8 ? 8 : (ipl == 16 ? 5 : 2); }

template <int IPL>
__global__ void __launch_bounds__(kToppRouteWarpsPerBlock * 32, warp_kernel_min_blocks(IPL))
    topp_route_warp_kernel(const ToppRouteParams p, const void* __restrict__ logits, LogitDType dtype) {
  __shared__ float logit_smem[kToppRouteWarpsPerBlock][32 * IPL];  // sanitised row, for gates and re-sorts
  // Per warp: the 32 x 32 float histogram, then up to kToppRouteMaxCandidates keys.
  __shared__ unsigned long long cand_smem[kToppRouteWarpsPerBlock][512];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kToppRouteWarpsPerBlock + warp;
  if (t >= p.num_tokens) return;  // whole warps only: no shuffle below loses a lane
  float* row_logit = logit_smem[warp];
  const int E = p.num_experts;
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
  float prob[IPL];  // softmax weights, then probabilities
  double local_sum = 0.0;
#pragma unroll
  for (int i = 0; i < IPL; ++i) {
    prob[i] = i * 32 + lane < E ? softmax_weight(g[i], row_max) : 0.0f;
    local_sum += prob[i];
  }
  // Normaliser in double, rounded once: its error would shift every cumulative sum.
  const float total = static_cast<float>(detail::warp_sum(local_sum));
#pragma unroll
  for (int i = 0; i < IPL; ++i)
    prob[i] = prob[i] / total;  // the same expression as every later recomputation
  __syncwarp();
  const bool narrow = dtype != LogitDType::kFloat32;

  if (tau < 1.0f && E > 64 && p.min_experts <= kToppRouteMaxCandidates) {
    // fp32 masses suffice for choosing theta: the exact scan decides.
    const float target = tau + 1e-5f;
    float* hist = reinterpret_cast<float*>(cand_smem[warp]);  // 32 x 32 floats, reused for keys below
    int bucket[IPL];
#pragma unroll
    for (int i = 0; i < IPL; ++i) {  // exponent buckets: [1/2^b, 2/2^b) for b < 31, the rest in 31
      const int b = 127 - static_cast<int>(__float_as_uint(prob[i]) >> 23);
      bucket[i] = b < 0 ? 0 : (b > 31 ? 31 : b);
    }
    float mass_above;
    const int b_star = detail::threshold_bucket<IPL>(prob, bucket, hist, lane, 0.0f, target, mass_above);
    unsigned theta_bits = 0;
    if (b_star < 31) {
#pragma unroll
      for (int i = 0; i < IPL; ++i) {  // inside it, by the top 5 mantissa bits, largest first
        bucket[i] = bucket[i] == b_star ? 31 - static_cast<int>((__float_as_uint(prob[i]) >> 18) & 31u) : 32;
      }
      float unused;
      const int s_star = detail::threshold_bucket<IPL>(prob, bucket, hist, lane, mass_above, target, unused);
      const int s = s_star > 31 ? 31 : s_star;  // not reached by rounding: the whole exponent bucket
      theta_bits = (static_cast<unsigned>(127 - b_star) << 23) | (static_cast<unsigned>(31 - s) << 18);
    }
    const float theta = __uint_as_float(theta_bits);
    int count = 0;
#pragma unroll
    for (int i = 0; i < IPL; ++i) count += __popc(__ballot_sync(detail::kFullMask, prob[i] >= theta));
    if (theta_bits > 0 && count <= kToppRouteMaxCandidates) {
      // Compact the candidates' keys in expert order (deterministic positions).
      unsigned long long* cand = cand_smem[warp];
      int offset = 0;
#pragma unroll
      for (int i = 0; i < IPL; ++i) {
        const bool take = prob[i] >= theta;
        const unsigned ballot = __ballot_sync(detail::kFullMask, take);
        if (take) {
          const int at = offset + __popc(ballot & ((1u << lane) - 1u));
          const int e = i * 32 + lane;
          cand[at] = narrow ? detail::LogitKey32::make(g[i], prob[i], e, dtype)
                            : detail::ProbKey64::make(g[i], prob[i], e, dtype);
        }
        offset += __popc(ballot);
      }
      __syncwarp();
      bool done;
#define PRUNEPATH_CANDIDATES(N, POLICY, CHECK)                                                             \
  detail::route_row_candidates<N, detail::POLICY>(p, t, lane, cand, count, row_logit, row_max, total, tau, \
                                                  CHECK)
      if (narrow) {
        done = count <= 32    ? PRUNEPATH_CANDIDATES(1, LogitKey32, true)
               : count <= 64  ? PRUNEPATH_CANDIDATES(2, LogitKey32, true)
               : count <= 128 ? PRUNEPATH_CANDIDATES(4, LogitKey32, true)
                              : PRUNEPATH_CANDIDATES(8, LogitKey32, true);
      } else {
        done = count <= 32    ? PRUNEPATH_CANDIDATES(1, ProbKey64, false)
               : count <= 64  ? PRUNEPATH_CANDIDATES(2, ProbKey64, false)
               : count <= 128 ? PRUNEPATH_CANDIDATES(4, ProbKey64, false)
                              : PRUNEPATH_CANDIDATES(8, ProbKey64, false);
      }
#undef PRUNEPATH_CANDIDATES
      if (done) return;
      __syncwarp();
    }
  }

  if (narrow && detail::route_row_full<IPL, detail::LogitKey32>(p, t, lane, row_logit, row_max, total, tau,
                                                                dtype, true)) {
    return;
  }
  detail::route_row_full<IPL, detail::ProbKey64>(p, t, lane, row_logit, row_max, total, tau, dtype, false);
}

}  // namespace prunepath
