// Token-to-expert alignment on the GPU, deterministic and without host sync.
// Tokens are cut into chunks of 32 (one bit per token of a chunk):
//   1. align_bitmap_kernel (grid: chunks): bitmap[c][e] has bit i set when token
//      32c + i selected expert e among its active slots.
//   2. align_scan_kernel (one block): per expert, an exclusive scan of popc over
//      the chunks (chunk_base), the totals (counts), a block scan of the padded
//      counts (offsets) and the expert of every block.
//   3. align_scatter_kernel (grid: chunks): a pair's row is
//      offsets[e] + chunk_base[c][e] + popc(bitmap[c][e] & lanes below it): token
//      order within an expert, no atomics on positions, so the output is fixed.
// Precondition (topp_route guarantees it): a token's active slots hold distinct
// experts. Active ids outside [0, E) are dropped (a kernel cannot raise).
// Torch-free: raw pointers and a cudaStream_t.
#pragma once

#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>

#include "prunepath/align_experts.h"

namespace prunepath {

constexpr int kAlignChunk = 32;          // tokens per bitmap word
constexpr int kAlignScanThreads = 1024;  // threads of the single-block scan
constexpr int kAlignScanItems = 8;       // experts per scan thread
constexpr int32_t kAlignCudaMaxExperts = kAlignScanThreads * kAlignScanItems;

namespace detail {

__device__ __forceinline__ int32_t active_of(const AlignParams& p, int64_t t) {
  return clamp_num_active(p.num_active[t], p.k);
}

__global__ void align_bitmap_kernel(const AlignParams p, uint32_t* __restrict__ bitmap) {
  extern __shared__ uint32_t bits[];  // [E]
  const int32_t E = p.num_experts;
  for (int32_t e = threadIdx.x; e < E; e += blockDim.x) bits[e] = 0u;
  __syncthreads();
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kAlignChunk;
  const int64_t n_pairs = static_cast<int64_t>(kAlignChunk) * p.k;
  for (int64_t i = threadIdx.x; i < n_pairs; i += blockDim.x) {
    const int64_t t = t0 + i / p.k;
    const int32_t j = static_cast<int32_t>(i % p.k);
    if (t >= p.num_tokens || j >= active_of(p, t)) continue;
    const int32_t e = p.expert_ids[t * p.k + j];
    if (e >= 0 && e < E) atomicOr(&bits[e], 1u << (t - t0));
  }
  __syncthreads();
  uint32_t* out = bitmap + static_cast<int64_t>(blockIdx.x) * E;
  for (int32_t e = threadIdx.x; e < E; e += blockDim.x) out[e] = bits[e];
}

__global__ void __launch_bounds__(kAlignScanThreads)
    align_scan_kernel(const AlignParams p, const uint32_t* __restrict__ bitmap,
                      int32_t* __restrict__ chunk_base, int64_t num_chunks) {
  using Scan = cub::BlockScan<int32_t, kAlignScanThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int32_t E = p.num_experts;
  int32_t padded[kAlignScanItems];
  // Blocked arrangement: thread i owns experts [i * ITEMS, (i + 1) * ITEMS) for the scan.
#pragma unroll
  for (int it = 0; it < kAlignScanItems; ++it) {
    const int32_t e = threadIdx.x * kAlignScanItems + it;
    int32_t running = 0;
    if (e < E) {
      for (int64_t c = 0; c < num_chunks; ++c) {
        chunk_base[c * E + e] = running;
        running += __popc(bitmap[c * E + e]);
      }
      p.expert_counts[e] = running;
    }
    padded[it] = (running + p.block_m - 1) / p.block_m * p.block_m;
  }
  int32_t total = 0;
  Scan(scan_storage).ExclusiveSum(padded, padded, total);
#pragma unroll
  for (int it = 0; it < kAlignScanItems; ++it) {
    const int32_t e = threadIdx.x * kAlignScanItems + it;
    if (e < E) p.expert_offsets[e] = padded[it];
  }
  if (threadIdx.x == 0) p.expert_offsets[E] = total;
  __syncthreads();  // offsets in global memory are visible to the whole block from here
  for (int64_t b = threadIdx.x; b < p.max_blocks; b += blockDim.x) {
    const int64_t row = b * p.block_m;
    int32_t expert = -1;
    if (row < total) {  // last expert whose offset is <= row (upper bound - 1)
      int32_t lo = 0, hi = E;
      while (hi - lo > 1) {
        const int32_t mid = (lo + hi) / 2;
        if (p.expert_offsets[mid] <= row)
          lo = mid;
        else
          hi = mid;
      }
      expert = lo;
    }
    p.block_expert[b] = expert;
  }
}

__global__ void align_scatter_kernel(const AlignParams p, const uint32_t* __restrict__ bitmap,
                                     const int32_t* __restrict__ chunk_base) {
  const int32_t E = p.num_experts;
  const int64_t c = blockIdx.x;
  const int64_t t0 = c * kAlignChunk;
  const int64_t n_pairs = static_cast<int64_t>(kAlignChunk) * p.k;
  for (int64_t i = threadIdx.x; i < n_pairs; i += blockDim.x) {
    const int64_t t = t0 + i / p.k;
    const int32_t j = static_cast<int32_t>(i % p.k);
    if (t >= p.num_tokens || j >= active_of(p, t)) continue;
    const int32_t e = p.expert_ids[t * p.k + j];
    if (e < 0 || e >= E) continue;
    const uint32_t below = (1u << (t - t0)) - 1u;
    const int32_t rank = chunk_base[c * E + e] + __popc(bitmap[c * E + e] & below);
    p.sorted_pairs[p.expert_offsets[e] + rank] = static_cast<int32_t>(t * p.k + j);
  }
}

}  // namespace detail

inline int64_t align_num_chunks(int64_t num_tokens) { return (num_tokens + kAlignChunk - 1) / kAlignChunk; }

// bitmap and chunk_base: scratch of align_num_chunks(T) * E words each.
inline cudaError_t launch_align_experts(const AlignParams& p, uint32_t* bitmap, int32_t* chunk_base,
                                        cudaStream_t stream) {
  const int64_t chunks = align_num_chunks(p.num_tokens);
  if (p.max_rows > 0) {
    cudaError_t err = cudaMemsetAsync(p.sorted_pairs, 0xff, p.max_rows * sizeof(int32_t), stream);  // -1
    if (err != cudaSuccess) return err;
  }
  const size_t smem = static_cast<size_t>(p.num_experts) * sizeof(uint32_t);
  if (chunks > 0) detail::align_bitmap_kernel<<<chunks, 256, smem, stream>>>(p, bitmap);
  detail::align_scan_kernel<<<1, kAlignScanThreads, 0, stream>>>(p, bitmap, chunk_base, chunks);
  if (chunks > 0) detail::align_scatter_kernel<<<chunks, 256, 0, stream>>>(p, bitmap, chunk_base);
  return cudaGetLastError();
}

}  // namespace prunepath
