// Top-p routing for few tokens (decode: one token per layer per step): one
// thread block per token, one thread per expert (E <= kToppRouteWarpMaxExperts),
// so the per-token latency is a handful of block barriers instead of one warp
// walking the whole row. Torch-free.
//
// 1. Softmax as the warp kernel computes it (same normaliser bits: the double
//    sum runs in the warp kernel's order) and p = w / total.
// 2. A threshold theta (tau < 1): 512 bins of fixed-point mass (16 binades
//    below the top probability x 32), each bin also counting its experts
//    (two 32-bit shared-memory atomics per expert: a 64-bit one compiles to a
//    compare-and-swap loop). Integer atomics, so the result does not depend on
//    their order. A block scan over the bins (one thread per bin at N = 512)
//    gives the first bin whose cumulative mass reaches tau and, for every bin,
//    how many experts lie in the bins above it. The candidates {p >= theta} hold just over tau of
//    the mass and are closed under ties: an exact prefix of the order.
// 3. Ranking the candidates. By bucket (the default): every candidate's rank
//    is the count of the bins above its own plus its rank among its bin's few
//    peers (scattered into their bin's range with a shared-memory cursor, then
//    compared on exact keys: probability desc, index asc). Rows whose fullest
//    bin holds more than kRankBucketMax experts (near-ties), and the second
//    pass below, rank by counting instead: every candidate compares its key
//    against every other, split over the P threads the block has for each
//    candidate (a power of two; the partial counts summed with shuffles).
//    Above kRankCountMax candidates (tau >= 1, long tails) a bitonic sort in
//    shared memory is cheaper than counting.
// 4. Inclusive cumulative sum in sorted order in double (warp Kogge-Stone scans
//    and a scan of the warp totals: a fixed shape, so the same bits every run),
//    the first crossing, the clamps, gates, outputs.
// When the candidates do not decide the row (the target mass lies in the
// untracked tail, min_experts reaches past them) the block redoes steps 3-4 on
// every expert.
// Measured (H200, E = 448, bench/results/router_split.md, session 21): the fused
// decode router (linear_topp_route) takes 6.7-7.1 us from 26 to 282 experts kept
// by bucket, against 7.0 / 7.5 / 8.4 / 12.6 us at 26 / 108 / 150 / 282 by counting.
#pragma once

#include "prunepath/topp_route_common.cuh"
#include "prunepath/topp_route_warp.cuh"

namespace prunepath {

// Up to this many candidates are ranked by counting (C / P iterations with P
// threads per candidate); above, a bitonic sort of the next power of two
// (log^2 barriers). Measured at E = 448 (bench/results/router_split.md,
// sessions 15-16): counting ~0.022 us per candidate at one thread each, 9.0 us
// at 282 candidates and 10.3 at 339 against the 512-key sort's 10.7, 12.4 at
// 448 against 10.2; 10.5 against 10.7 at 353, 10.8 against 10.7 at 369: the
// two meet near 365.
constexpr int kRankCountMax = 352;
constexpr int kRankHistBins = 512;
// Bucket ranking is used while no bin holds more experts than this: a
// candidate compares its key with each of its bin's experts, so the slowest
// thread does this many comparisons (counting does C / P).
constexpr int kRankBucketMax = 32;

// Marks the end of each phase of topp_route_rank_row (1 softmax, 2 threshold,
// 3 compaction or scatter, 4 rank, 5 cumulative sum, 6 outputs) for a timing
// probe (bench/diag/router_split.cu); this default compiles to nothing.
struct NoRankProbe {
  __device__ static void mark(int) {}
};

// Routes token t with the whole block: NWARPS * 32 >= E threads, thread e
// routes expert e. kBypassL1 reads the logits through L2 only: the fused router
// (linear_topp_route.cuh) routes logits that other blocks of the same launch wrote.
// kCountMax: most candidates ranked by counting, the rest by the bitonic sort;
// kBuckets: rank by bucket where the bins allow it (both parameters so that
// bench/diag/router_split.cu can time the alternatives; the bits are the same).
template <int NWARPS, bool kBypassL1 = false, typename Probe = NoRankProbe, int kCountMax = kRankCountMax,
          bool kBuckets = true>
__device__ __forceinline__ void topp_route_rank_row(const ToppRouteParams& p, const void* __restrict__ logits,
                                                    LogitDType dtype, int64_t t) {
  constexpr int N = NWARPS * 32;
  // Bins per thread in the block scan of the histogram (threads past the last bin own none).
  constexpr int kBinsPerThread = kRankHistBins > N ? kRankHistBins / N : 1;
  static_assert(kBinsPerThread * N >= kRankHistBins, "every bin has an owner");
  using Key = unsigned long long;   // detail::ProbKey64: (probability desc, index asc), 0 = padding
  __shared__ float logit_smem[N];   // sanitised logits by expert, for the gates
  __shared__ float weight_smem[N];  // softmax weights by expert, for the normaliser
  __shared__ unsigned bin_mass[kRankHistBins];    // fixed-point mass of the experts in bin b
  __shared__ unsigned bin_count[kRankHistBins];   // how many experts lie in bin b
  __shared__ unsigned bin_base[kRankHistBins];    // experts in the bins before b (bins <= the threshold's)
  __shared__ unsigned bin_cursor[kRankHistBins];  // the next free position of b's range (bucket scatter)
  __shared__ Key key_smem[N];  // candidate keys, compacted or by bucket; the bitonic sort sorts them in place
  __shared__ Key ranked_smem[N];  // candidate keys by rank (bucket and counting paths)
  __shared__ double warp_total_smem[NWARPS];
  __shared__ unsigned long long warp_bins_smem[NWARPS];
  __shared__ float warp_max_smem[NWARPS];
  __shared__ int warp_count_smem[NWARPS];
  __shared__ int warp_first_smem[NWARPS];
  __shared__ float total_smem, kept_mass_smem;
  __shared__ unsigned bin_smem, fullest_smem;

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int E = p.num_experts;
  const float tau = p.tau_per_token ? p.tau_per_token[t * p.tau_stride] : p.tau;

  // 1. Softmax.
  const int64_t offset = t * p.logits_stride + tid;
  const float g = tid < E ? sanitize_logit(kBypassL1 ? detail::load_logit_cg(logits, offset, dtype)
                                                     : detail::load_logit(logits, offset, dtype))
                          : -INFINITY;
  logit_smem[tid] = g;
  for (int i = tid; i < kRankHistBins; i += N) {
    bin_mass[i] = 0u;
    bin_count[i] = 0u;
  }
  if (tid == 0) {
    bin_smem = kRankHistBins;  // no bin reaches the target until one is found
    fullest_smem = 0u;
  }
  const float warp_max = detail::warp_max(g);
  if (lane == 0) warp_max_smem[warp] = warp_max;
  __syncthreads();
  const float row_max = detail::warp_max(lane < NWARPS ? warp_max_smem[lane] : -INFINITY);
  const float w = tid < E ? softmax_weight(g, row_max) : 0.0f;
  weight_smem[tid] = w;
  __syncthreads();
  if (warp == 0) {
    // The warp kernel's order: lane l sums experts l, 32 + l, 64 + l, ... in
    // double, then the butterfly. Same bits, so the same probabilities.
    double sum = 0.0;
#pragma unroll
    for (int i = 0; i < NWARPS; ++i) sum += weight_smem[i * 32 + lane];
    sum = detail::warp_sum(sum);
    if (lane == 0) total_smem = static_cast<float>(sum);
  }
  __syncthreads();
  const float total = total_smem;
  Probe::mark(1);
  const float prob = w / total;
  const Key key = tid < E ? detail::ProbKey64::make(g, prob, tid, dtype) : 0ull;

  // 2. Threshold (see topp_route_lean_kernel for the bins and the fixed point).
  bool all = !(tau < 1.0f) || p.min_experts > kRankCountMax;  // block-uniform
  unsigned theta = 0u;
  const unsigned top = (__float_as_uint(1.0f / total) >> 18) | 31u;
  const unsigned bin = top - (__float_as_uint(prob) >> 18);  // bins from kRankHistBins on are not tracked
  bool buckets = false;                                      // rank by bucket (block-uniform)
  if (!all) {
    if (tid < E && bin < kRankHistBins) {
      atomicAdd(&bin_mass[bin], __float2uint_rz(prob * 0x1p31f));
      atomicAdd(&bin_count[bin], 1u);
    }
    __syncthreads();
    // Block scan over the bins: thread i owns bins [i B, i B + B), each as count << 32 | mass
    // (the masses sum to at most 2^31 (1 + eps): the low word cannot carry into the count).
    const unsigned target = __float2uint_ru((tau + 1e-5f) * 0x1p31f);
    const int b0 = tid * kBinsPerThread;
    unsigned long long mine[kBinsPerThread];
    unsigned long long own = 0ull;
#pragma unroll
    for (int i = 0; i < kBinsPerThread; ++i) {
      mine[i] = b0 + i < kRankHistBins
                    ? (static_cast<unsigned long long>(bin_count[b0 + i]) << 32) | bin_mass[b0 + i]
                    : 0ull;
      own += mine[i];
    }
    const unsigned long long inclusive = detail::warp_inclusive_scan(own, lane);
    if (lane == 31) warp_bins_smem[warp] = inclusive;
    __syncthreads();
    unsigned long long before = inclusive - own;
#pragma unroll
    for (int v = 0; v < NWARPS - 1; ++v) before += v < warp ? warp_bins_smem[v] : 0ull;
    unsigned fullest = 0u;
    unsigned first = kRankHistBins;
#pragma unroll
    for (int i = 0; i < kBinsPerThread; ++i) {
      if (b0 + i < kRankHistBins) {
        const unsigned n_bin = static_cast<unsigned>(mine[i] >> 32);
        bin_base[b0 + i] = static_cast<unsigned>(before >> 32);
        bin_cursor[b0 + i] = static_cast<unsigned>(before >> 32);
        before += mine[i];
        fullest = n_bin > fullest ? n_bin : fullest;
        if (first == kRankHistBins && static_cast<unsigned>(before) >= target) first = b0 + i;
      }
    }
    // The first bin to reach the target is the smallest such; the fullest bin decides the ranking.
    const unsigned warp_first_bin = __reduce_min_sync(detail::kFullMask, first);
    const unsigned warp_fullest = __reduce_max_sync(detail::kFullMask, fullest);
    if (lane == 0) {
      if (warp_first_bin < kRankHistBins) atomicMin(&bin_smem, warp_first_bin);
      atomicMax(&fullest_smem, warp_fullest);
    }
    __syncthreads();
    const unsigned chosen = bin_smem;
    all = chosen >= kRankHistBins;  // the target mass lies in the untracked tail: every expert
    theta = all ? 0u : top - chosen;
    buckets = kBuckets && !all && fullest_smem <= kRankBucketMax;
  }
  Probe::mark(2);

  for (;;) {  // at most twice: the candidates, then (if they do not decide) every expert
    const Key* sorted = ranked_smem;
    int count;
    if (buckets) {
      // 3. Each candidate into its bin's range of key_smem (bins in probability order).
      const unsigned chosen = bin_smem;
      count = static_cast<int>(bin_base[chosen] + bin_count[chosen]);
      const bool take = tid < E && bin <= chosen;
      if (take) key_smem[atomicAdd(&bin_cursor[bin], 1u)] = key;
      __syncthreads();
      Probe::mark(3);
      // Rank: the bins before, plus the peers of the same bin with larger keys.
      if (take) {
        const unsigned start = bin_base[bin];
        const unsigned end = start + bin_count[bin];
        unsigned rank = start;
        for (unsigned j = start; j < end; ++j) rank += key_smem[j] > key ? 1u : 0u;
        ranked_smem[rank] = key;
      }
    } else {
      // 3. Compact the candidates in expert order.
      const bool take = tid < E && (all || (__float_as_uint(prob) >> 18) >= theta);
      const unsigned ballot = __ballot_sync(detail::kFullMask, take);
      if (lane == 0) warp_count_smem[warp] = __popc(ballot);
      __syncthreads();  // also: the previous pass is done with key_smem and ranked_smem
      const int warp_count = lane < NWARPS ? warp_count_smem[lane] : 0;
      const int warp_incl = detail::warp_inclusive_scan(warp_count, lane);
      count = __shfl_sync(detail::kFullMask, warp_incl, 31);
      const int offset = __shfl_sync(detail::kFullMask, warp_incl - warp_count, warp);
      if (take) key_smem[offset + __popc(ballot & ((1u << lane) - 1u))] = key;
      if (tid >= count) key_smem[tid] = 0ull;  // padding for the bitonic sort
      __syncthreads();
      Probe::mark(3);

      // Rank: by counting, or a bitonic sort of the next power of two.
      if (count <= kCountMax) {
        // Threads c P .. c P + P - 1 (one aligned group of lanes) rank candidate
        // c: thread c P + i counts the keys i, i + P, ... above it.
        int P = 1;
        while (P < 32 && 2 * P * count <= N) P <<= 1;
        const int c = tid / P;
        const int part = tid % P;
        const Key mine = c < count ? key_smem[c] : 0ull;
        int rank = 0;
        if (c < count) {
#pragma unroll 8
          for (int j = part; j < count; j += P) rank += key_smem[j] > mine ? 1 : 0;
        }
        for (int o = 1; o < P; o <<= 1) rank += __shfl_xor_sync(detail::kFullMask, rank, o);
        if (c < count && part == 0) ranked_smem[rank] = mine;
      } else {
        sorted = key_smem;
        int m = 1;
        while (m < count) m <<= 1;  // <= N
        for (int k = 2; k <= m; k <<= 1) {
          for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = tid; i < m / 2; i += N) {
              const int lo = 2 * i - (i & (j - 1));  // i with a zero inserted at bit log2(j)
              const int hi = lo + j;
              const Key a = key_smem[lo];
              const Key b = key_smem[hi];
              const bool desc = (lo & k) == 0;
              if (desc ? a < b : a > b) {
                key_smem[lo] = b;
                key_smem[hi] = a;
              }
            }
            __syncthreads();
          }
        }
      }
    }
    __syncthreads();
    Probe::mark(4);

    // 4. Inclusive cumulative sum in sorted order (position r = tid), in double.
    const Key mine = tid < count ? sorted[tid] : 0ull;
    const float q = __uint_as_float(static_cast<unsigned>(mine >> 32));
    const double inclusive = detail::warp_inclusive_scan(static_cast<double>(q), lane);
    if (lane == 31) warp_total_smem[warp] = inclusive;
    __syncthreads();
    const double before = detail::warp_exclusive_scan(lane < NWARPS ? warp_total_smem[lane] : 0.0, lane);
    const float cumulative = static_cast<float>(__shfl_sync(detail::kFullMask, before, warp) + inclusive);
    const int crossing = tid < count && !(cumulative < tau) ? tid : E;
    const int warp_first =
        static_cast<int>(__reduce_min_sync(detail::kFullMask, static_cast<unsigned>(crossing)));
    if (lane == 0) warp_first_smem[warp] = warp_first;
    __syncthreads();
    const int first = static_cast<int>(__reduce_min_sync(
        detail::kFullMask, static_cast<unsigned>(lane < NWARPS ? warp_first_smem[lane] : E)));
    const int n = clamp_active(first, tau, E, p.min_experts, p.k);
    Probe::mark(5);
    if (!all && (first >= count || n > count)) {  // the candidates do not decide the row
      all = true;
      buckets = false;
      continue;  // the barrier at the top of the loop orders the reuse of shared memory
    }

    // 5. Outputs: slot j = tid (K <= E <= N).
    if (tid == n - 1) kept_mass_smem = cumulative;
    __syncthreads();
    const float kept_mass = kept_mass_smem;
    int32_t* out_ids = p.expert_ids + t * p.k;
    float* out_gates = p.gates + t * p.k;
    for (int j = tid; j < p.k; j += N) {
      const bool kept = j < n;
      const Key k = kept ? sorted[j] : 0ull;
      const int e = kept ? detail::ProbKey64::expert(k) : 0;
      out_ids[j] = kept ? e : -1;
      out_gates[j] =
          kept ? gate_value(p.gate, logit_smem[e], __uint_as_float(static_cast<unsigned>(k >> 32)), kept_mass)
               : 0.0f;
    }
    if (tid == 0) p.num_active[t] = n;
    Probe::mark(6);
    return;
  }
}

// One block per token. (The explicit 1 block per SM in the launch bounds:
// without it, NWARPS = 32 spilled at 32 registers.)
template <int NWARPS>
__global__ void __launch_bounds__(NWARPS * 32, 1)
    topp_route_rank_kernel(const ToppRouteParams p, const void* __restrict__ logits, LogitDType dtype) {
  topp_route_rank_row<NWARPS>(p, logits, dtype, blockIdx.x);
}

}  // namespace prunepath
