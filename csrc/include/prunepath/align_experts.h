// Token-to-expert alignment for the grouped expert GEMM (the variable-k analogue
// of vLLM's moe_align_block_size): the (token, slot) pairs of a routing, grouped
// by expert in increasing expert order, token order within an expert (so the
// result is deterministic), each expert's group padded to block_m rows.
// Torch-free: raw pointers; the CPU kernel is here, the CUDA one in align_experts.cuh.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "prunepath/routing_common.h"  // PRUNEPATH_HOST_DEVICE

namespace prunepath {

struct AlignParams {
  int64_t num_tokens;         // T
  int32_t k;                  // K: slots per token (row length of expert_ids)
  int32_t num_experts;        // E
  int32_t block_m;            // rows per block
  int64_t max_rows;           // P_max = max_blocks * block_m
  int64_t max_blocks;         // B_max
  const int32_t* expert_ids;  // [T, K] contiguous; only slots j < num_active[t] are read
  const int32_t* num_active;  // [T], clamped to [0, K]
  int32_t* sorted_pairs;      // [P_max] out: t * K + j, -1 padded
  int32_t* block_expert;      // [B_max] out: expert of each block, -1 past the end
  int32_t* expert_offsets;    // [E + 1] out: padded first row per expert
  int32_t* expert_counts;     // [E] out
};

// Static output sizes: each non-empty expert wastes at most block_m - 1 rows and
// at most min(E, T*K) experts are non-empty.
inline int64_t align_max_blocks(int64_t num_pairs, int64_t num_experts, int64_t block_m) {
  return (num_pairs + std::min(num_experts, num_pairs) * (block_m - 1)) / block_m;
}

PRUNEPATH_HOST_DEVICE int32_t clamp_num_active(int32_t n, int32_t k) { return n < 0 ? 0 : (n > k ? k : n); }

// Sequential counting sort. Returns the flat index of the first active slot whose
// expert id lies outside [0, E), or -1 when every id is valid (outputs then complete).
inline int64_t align_experts_cpu(const AlignParams& p) {
  const int32_t E = p.num_experts;
  std::fill(p.expert_counts, p.expert_counts + E, 0);
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int32_t n = clamp_num_active(p.num_active[t], p.k);
    for (int32_t j = 0; j < n; ++j) {
      const int32_t e = p.expert_ids[t * p.k + j];
      if (e < 0 || e >= E) return t * p.k + j;
      ++p.expert_counts[e];
    }
  }
  std::vector<int32_t> cursor(E);
  int32_t row = 0;
  for (int32_t e = 0; e < E; ++e) {
    p.expert_offsets[e] = row;
    cursor[e] = row;
    row += (p.expert_counts[e] + p.block_m - 1) / p.block_m * p.block_m;
  }
  p.expert_offsets[E] = row;
  std::fill(p.sorted_pairs, p.sorted_pairs + p.max_rows, -1);
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int32_t n = clamp_num_active(p.num_active[t], p.k);
    for (int32_t j = 0; j < n; ++j) {
      const int32_t e = p.expert_ids[t * p.k + j];
      p.sorted_pairs[cursor[e]++] = static_cast<int32_t>(t * p.k + j);
    }
  }
  int64_t b = 0;
  for (int32_t e = 0; e < E; ++e) {
    for (int32_t r = p.expert_offsets[e]; r < p.expert_offsets[e + 1]; r += p.block_m)
      p.block_expert[b++] = e;
  }
  std::fill(p.block_expert + b, p.block_expert + p.max_blocks, -1);
  return -1;
}

}  // namespace prunepath
