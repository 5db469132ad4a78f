// Top-p routing for wide rows (E > kToppRouteWarpMaxExperts): one thread block
// per token, the row sorted and scanned on chip with CUB (block radix sort,
// block scan), logits read once, padded outputs written once. Torch-free.
#pragma once

#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/block/block_store.cuh>

#include "prunepath/topp_route_common.cuh"

namespace prunepath {

// Probabilities lie in [0, 1], so their fp32 bit patterns are ordered like the
// values and never use bits 30 and 31.
constexpr int kProbKeyBits = 30;

template <int BLOCK, int IPT, int RADIX_BITS = 5>
__global__ void __launch_bounds__(BLOCK)
    topp_route_block_kernel(const ToppRouteParams p, const void* __restrict__ logits, LogitDType dtype) {
  using Sort = cub::BlockRadixSort<uint32_t, BLOCK, IPT, int32_t, RADIX_BITS>;
  using Scan = cub::BlockScan<float, BLOCK>;
  using Reduce = cub::BlockReduce<float, BLOCK>;
  using ReduceD = cub::BlockReduce<double, BLOCK>;
  using ReduceInt = cub::BlockReduce<int32_t, BLOCK>;
  using StoreId = cub::BlockStore<int32_t, BLOCK, IPT, cub::BLOCK_STORE_WARP_TRANSPOSE>;
  using StoreGate = cub::BlockStore<float, BLOCK, IPT, cub::BLOCK_STORE_WARP_TRANSPOSE>;
  __shared__ union {
    typename Sort::TempStorage sort;
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
    typename ReduceD::TempStorage reduce_d;
    typename ReduceInt::TempStorage reduce_int;
    typename StoreId::TempStorage store_id;
    typename StoreGate::TempStorage store_gate;
  } tmp;
  __shared__ float logit_smem[BLOCK * IPT];  // raw logits, for sigmoid gates after the sort
  __shared__ float broadcast_f;
  __shared__ int32_t broadcast_n;

  const int64_t t = blockIdx.x;
  const int tid = threadIdx.x;
  const int32_t E = p.num_experts;
  const float tau = p.tau_per_token ? p.tau_per_token[t * p.tau_stride] : p.tau;

  // 1. Load the row (blocked arrangement: item i of thread tid is expert tid*IPT+i).
  float g[IPT];
#pragma unroll
  for (int i = 0; i < IPT; ++i) {
    const int idx = tid * IPT + i;
    g[i] = idx < E ? sanitize_logit(detail::load_logit(logits, t * p.logits_stride + idx, dtype)) : -INFINITY;
    if (idx < E) logit_smem[idx] = g[i];
  }

  // 2. Softmax in fp32, with fixed-shape (deterministic) block reductions.
  float row_max = Reduce(tmp.reduce).Reduce(g, detail::MaxOp());
  if (tid == 0) broadcast_f = row_max;
  __syncthreads();
  row_max = broadcast_f;
  float w[IPT];
  double w_sum = 0.0;  // the normaliser in double: its error would shift every cumulative sum
#pragma unroll
  for (int i = 0; i < IPT; ++i) {
    w[i] = tid * IPT + i < E ? softmax_weight(g[i], row_max) : 0.0f;
    w_sum += w[i];
  }
  __syncthreads();  // broadcast_f and tmp are reused below
  const double total_d = ReduceD(tmp.reduce_d).Reduce(w_sum, detail::SumOp());
  if (tid == 0) broadcast_f = static_cast<float>(total_d);
  __syncthreads();
  const float total = broadcast_f;

  // 3. Sort by probability, largest first. The radix sort is stable, so equal
  // probabilities keep the lower expert index first; padding (key 0, index >= E)
  // sorts after every real expert.
  uint32_t key[IPT];
  int32_t expert[IPT];
#pragma unroll
  for (int i = 0; i < IPT; ++i) {
    expert[i] = tid * IPT + i;
    key[i] = __float_as_uint(w[i] / total);
  }
  __syncthreads();
  Sort(tmp.sort).SortDescending(key, expert, 0, kProbKeyBits);
  __syncthreads();

  // 4. Inclusive cumulative sum in sorted order, then the first rank whose sum
  // is not below tau (the first crossing keeps the selection a prefix).
  float prob[IPT], cumulative[IPT];
#pragma unroll
  for (int i = 0; i < IPT; ++i) prob[i] = __uint_as_float(key[i]);
  Scan(tmp.scan).InclusiveSum(prob, cumulative);
  int32_t first = E;
#pragma unroll
  for (int i = 0; i < IPT; ++i) {
    const int rank = tid * IPT + i;
    if (rank < E && !(cumulative[i] < tau) && rank < first) first = rank;
  }
  __syncthreads();
  first = ReduceInt(tmp.reduce_int).Reduce(first, detail::MinOp());
  if (tid == 0) broadcast_n = clamp_active(first, tau, E, p.min_experts, p.k);
  __syncthreads();
  const int32_t n = broadcast_n;
#pragma unroll
  for (int i = 0; i < IPT; ++i) {
    if (tid * IPT + i == n - 1) broadcast_f = cumulative[i];  // mass of the kept prefix
  }
  __syncthreads();
  const float kept_mass = broadcast_f;

  // 5. Gates, then the padded rows.
  float gate[IPT];
#pragma unroll
  for (int i = 0; i < IPT; ++i) {
    const bool kept = tid * IPT + i < n;
    gate[i] = kept ? gate_value(p.gate, logit_smem[expert[i]], prob[i], kept_mass) : 0.0f;
    expert[i] = kept ? expert[i] : -1;
  }
  StoreId(tmp.store_id).Store(p.expert_ids + t * p.k, expert, p.k);
  __syncthreads();
  StoreGate(tmp.store_gate).Store(p.gates + t * p.k, gate, p.k);
  if (tid == 0) p.num_active[t] = n;
}

}  // namespace prunepath
