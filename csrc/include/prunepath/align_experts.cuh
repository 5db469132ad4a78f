// Token-to-expert alignment on the GPU, deterministic and without host sync.
// Tokens are cut into chunks of 32 (one bit per token of a chunk):
//   1. align_bitmap_kernel (grid: chunks): bitmap[c][e] has bit i set when token
//      32c + i selected expert e among its active slots.
//   2. align_colscan_kernel (grid: E / 32 blocks of 32 warps): per expert (a
//      lane), an exclusive scan of popc over the chunks (chunk_base), each warp
//      summing a contiguous range of chunks, the ranges combined in shared
//      memory; the totals are the counts.
//   3. align_scatter_kernel (grid: chunks): each block scans the padded counts
//      (offsets) into shared memory; a pair's row is
//      offsets[e] + chunk_base[c][e] + popc(bitmap[c][e] & lanes below it): token
//      order within an expert, no atomics on positions, so the output is fixed.
//      The same grid writes the -1 padding rows and the expert of every block
//      of rows.
// Every kernel walks a token's active slots directly (a warp per token), so no
// slot past num_active is read and no 64-bit division runs per pair. The first
// version (one block scanning every chunk of every expert serially, a division
// per slot) took 94 us at T = 4096, E = 448 on the H200, 6 % of the prefill FFN.
// The bitmap and scatter kernels give each of a chunk's 32 tokens its own warp
// and load a warp's ids kAlignIdsInFlight at a time: with 8 warps walking 4
// tokens each, one id load after another, both kernels were chains of dependent
// L2 round trips (then 4 kernels and a memset of sorted_pairs: 34 us at
// T = 4096, E = 448, 30 % active; now 26 us: bench/results/README.md, session 23).
// Precondition (topp_route guarantees it): a token's active slots hold distinct
// experts. Active ids outside [0, E) are dropped (a kernel cannot raise).
// Torch-free: raw pointers and a cudaStream_t.
#pragma once

#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>

#include "prunepath/align_experts.h"

namespace prunepath {

constexpr int kAlignChunk = 32;                  // tokens per bitmap word
constexpr int kAlignThreads = 32 * kAlignChunk;  // bitmap and scatter blocks: a warp per token
constexpr int kAlignIdsInFlight = 4;             // a lane's id loads issued before their use
constexpr int kAlignScanThreads = 1024;          // threads of the offsets block (and of a colscan block)
constexpr int kAlignScanItems = 8;               // experts per offsets thread
constexpr int kAlignColscanWarps = kAlignScanThreads / 32;
constexpr int32_t kAlignCudaMaxExperts = kAlignScanThreads * kAlignScanItems;

namespace detail {

__device__ __forceinline__ int32_t active_of(const AlignParams& p, int64_t t) {
  return clamp_num_active(p.num_active[t], p.k);
}

// A lane's ids of slots j0 + 32u + lane (u < kAlignIdsInFlight), -1 past the n
// active slots: all loads issued before any is used.
__device__ __forceinline__ void load_active_ids(const int32_t* ids, int32_t j0, int32_t n, int lane,
                                                int32_t (&e)[kAlignIdsInFlight]) {
#pragma unroll
  for (int u = 0; u < kAlignIdsInFlight; ++u) {
    const int32_t j = j0 + u * 32 + lane;
    e[u] = j < n ? ids[j] : -1;
  }
}

__global__ void __launch_bounds__(kAlignThreads)
    align_bitmap_kernel(const AlignParams p, uint32_t* __restrict__ bitmap) {
  extern __shared__ uint32_t bits[];  // [E]
  const int32_t E = p.num_experts;
  for (int32_t e = threadIdx.x; e < E; e += blockDim.x) bits[e] = 0u;
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int i = threadIdx.x / 32;  // the warp's token within the chunk
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kAlignChunk + i;
  if (t < p.num_tokens) {
    const int32_t n = active_of(p, t);
    const int32_t* ids = p.expert_ids + t * p.k;
    for (int32_t j0 = 0; j0 < n; j0 += 32 * kAlignIdsInFlight) {
      int32_t e[kAlignIdsInFlight];
      load_active_ids(ids, j0, n, lane, e);
#pragma unroll
      for (int u = 0; u < kAlignIdsInFlight; ++u) {
        if (e[u] >= 0 && e[u] < E) atomicOr(&bits[e[u]], 1u << i);
      }
    }
  }
  __syncthreads();
  uint32_t* out = bitmap + static_cast<int64_t>(blockIdx.x) * E;
  for (int32_t e = threadIdx.x; e < E; e += blockDim.x) out[e] = bits[e];
}

// Block b: experts 32b + lane; warp w: chunks [w * per, (w + 1) * per).
__global__ void __launch_bounds__(kAlignScanThreads)
    align_colscan_kernel(const AlignParams p, const uint32_t* __restrict__ bitmap,
                         int32_t* __restrict__ chunk_base, int64_t num_chunks) {
  __shared__ int32_t sums[kAlignColscanWarps][32];
  const int32_t E = p.num_experts;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int32_t e = blockIdx.x * 32 + lane;
  const int64_t per = (num_chunks + kAlignColscanWarps - 1) / kAlignColscanWarps;
  const int64_t c0 = warp * per, c1 = min(num_chunks, c0 + per);
  int32_t s = 0;
  if (e < E) {
#pragma unroll 8
    for (int64_t c = c0; c < c1; ++c) s += __popc(bitmap[c * E + e]);
  }
  sums[warp][lane] = s;
  __syncthreads();
  int32_t running = 0, total = 0;
  for (int w = 0; w < kAlignColscanWarps; ++w) {
    const int32_t v = sums[w][lane];
    running += w < warp ? v : 0;
    total += v;
  }
  if (e >= E) return;
  for (int64_t c = c0; c < c1; ++c) {
    chunk_base[c * E + e] = running;
    running += __popc(bitmap[c * E + e]);
  }
  if (warp == 0) p.expert_counts[e] = total;
}

// offsets[e] (e <= E, shared memory): the padded first row of expert e, from
// p.expert_counts; a cub block scan, thread i owning experts [i * ITEMS, (i + 1) * ITEMS).
// Every scatter block computes it (E counts, a few microseconds of latency) rather than
// one block writing it for the others: that was a kernel and a launch of its own.
__device__ __forceinline__ void padded_offsets(const AlignParams& p, int32_t* offsets) {
  static_assert(kAlignThreads == kAlignScanThreads, "the scatter block scans the offsets");
  using Scan = cub::BlockScan<int32_t, kAlignScanThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int32_t E = p.num_experts;
  int32_t padded[kAlignScanItems];
#pragma unroll
  for (int it = 0; it < kAlignScanItems; ++it) {
    const int32_t e = threadIdx.x * kAlignScanItems + it;
    const int32_t n = e < E ? p.expert_counts[e] : 0;
    padded[it] = (n + p.block_m - 1) / p.block_m * p.block_m;
  }
  int32_t total = 0;
  Scan(scan_storage).ExclusiveSum(padded, padded, total);
#pragma unroll
  for (int it = 0; it < kAlignScanItems; ++it) {
    const int32_t e = threadIdx.x * kAlignScanItems + it;
    if (e < E) offsets[e] = padded[it];
  }
  if (threadIdx.x == 0) offsets[E] = total;
  __syncthreads();
}

// Also writes expert_offsets (block 0), the -1 padding of sorted_pairs (each
// expert's last block past its count, and every row past the last block: no
// separate memset) and block_expert.
__global__ void __launch_bounds__(kAlignThreads)
    align_scatter_kernel(const AlignParams p, const uint32_t* __restrict__ bitmap,
                         const int32_t* __restrict__ chunk_base) {
  extern __shared__ int32_t offsets[];  // [E + 1]
  const int32_t E = p.num_experts;
  padded_offsets(p, offsets);
  if (blockIdx.x == 0) {
    for (int32_t e = threadIdx.x; e <= E; e += blockDim.x) p.expert_offsets[e] = offsets[e];
  }
  const int64_t c = blockIdx.x;
  const int64_t t0 = c * kAlignChunk;
  const int lane = threadIdx.x % 32;
  const int i = threadIdx.x / 32;  // the warp's token within the chunk
  const int64_t t = t0 + i;
  if (t < p.num_tokens) {
    const int32_t n = active_of(p, t);
    const int32_t* ids = p.expert_ids + t * p.k;
    const uint32_t below = (1u << i) - 1u;
    for (int32_t j0 = 0; j0 < n; j0 += 32 * kAlignIdsInFlight) {
      int32_t e[kAlignIdsInFlight];
      load_active_ids(ids, j0, n, lane, e);
      // Every row computed before any store: a store to sorted_pairs may alias the
      // int32 inputs for all the compiler knows, which would serialise the loads.
      int32_t row[kAlignIdsInFlight];
#pragma unroll
      for (int u = 0; u < kAlignIdsInFlight; ++u) {
        const bool ok = e[u] >= 0 && e[u] < E;
        const int64_t cell = c * E + (ok ? e[u] : 0);
        row[u] = ok ? offsets[e[u]] + chunk_base[cell] + __popc(bitmap[cell] & below) : -1;
      }
#pragma unroll
      for (int u = 0; u < kAlignIdsInFlight; ++u) {
        if (row[u] >= 0) p.sorted_pairs[row[u]] = static_cast<int32_t>(t * p.k + j0 + u * 32 + lane);
      }
    }
  }
  // Padding rows (disjoint from the pairs' rows): a warp per expert, then the tail.
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + i; e < E; e += warps) {
    for (int32_t r = offsets[e] + p.expert_counts[e] + lane; r < offsets[e + 1]; r += 32)
      p.sorted_pairs[r] = -1;
  }
  const int32_t total = offsets[E];
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = total + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < p.max_rows;
       r += threads) {
    p.sorted_pairs[r] = -1;
  }
  // The expert of every block of rows: the last expert whose offset is <= the block's first row.
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < p.max_blocks;
       b += threads) {
    const int64_t row = b * p.block_m;
    int32_t expert = -1;
    if (row < total) {
      int32_t lo = 0, hi = E;
      while (hi - lo > 1) {
        const int32_t mid = (lo + hi) / 2;
        if (offsets[mid] <= row)
          lo = mid;
        else
          hi = mid;
      }
      expert = lo;
    }
    p.block_expert[b] = expert;
  }
}

}  // namespace detail

inline int64_t align_num_chunks(int64_t num_tokens) { return (num_tokens + kAlignChunk - 1) / kAlignChunk; }

// bitmap and chunk_base: scratch of align_num_chunks(T) * E words each.
inline cudaError_t launch_align_experts(const AlignParams& p, uint32_t* bitmap, int32_t* chunk_base,
                                        cudaStream_t stream) {
  const int64_t chunks = align_num_chunks(p.num_tokens);
  const size_t smem = static_cast<size_t>(p.num_experts) * sizeof(uint32_t);
  const unsigned expert_tiles = static_cast<unsigned>((p.num_experts + 31) / 32);
  if (chunks > 0) detail::align_bitmap_kernel<<<chunks, kAlignThreads, smem, stream>>>(p, bitmap);
  detail::align_colscan_kernel<<<expert_tiles, kAlignScanThreads, 0, stream>>>(p, bitmap, chunk_base, chunks);
  // At least one block: the offsets, the padding and block_expert are written even without tokens.
  const int64_t scatter_blocks = chunks > 0 ? chunks : 1;
  detail::align_scatter_kernel<<<scatter_blocks, kAlignThreads, smem + sizeof(int32_t), stream>>>(p, bitmap,
                                                                                                  chunk_base);
  return cudaGetLastError();
}

}  // namespace prunepath
