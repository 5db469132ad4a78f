// The projections of a decode step as one GEMV launch: y = x W^T for a few
// rows of x (B tokens), W [N, K]. Torch-free.
//
// At batch 1 a projection is a stream of its weight (Llama-3-8B's fused q/k/v:
// 50 MB) and takes the HBM time plus what the launch adds. cuBLAS picks split-K
// kernels there, with a second launch for the reduction, and reached 2.5-3.2
// TB/s on the H200 (bench/results/decode_linear_cuda.md). Here:
//  * each warp owns kGemvRows whole weight rows and walks K in 16-byte vectors,
//    lane-interleaved (a warp's load of a row is 512 contiguous bytes), with
//    kGemvBatch vectors per row and lane in flight, streamed past L1;
//  * the grid is one wave for the shapes that matter (N / kGemvRows warps, all
//    resident), so no SM waits on a second round of blocks;
//  * x (at most kTokens rows per pass) is read through L1, where every warp of
//    the SM finds it;
//  * sums are fp32 in a fixed order (per lane in K order, then a butterfly),
//    rounded once to the dtype: deterministic, no split-K, no second launch;
//  * with programmatic dependent launch the first batch of weight loads is
//    issued before griddepcontrol.wait (only x depends on the previous kernel),
//    and the next kernel is released once the weights are streamed.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "prunepath/decode_common.cuh"

namespace prunepath {

using GemvDType = DecodeDType;

struct DecodeGemvParams {
  const void* x;         // [B, K], unit inner stride, rows x_stride apart
  int64_t x_stride;      // elements
  const void* weight;    // [N, K] contiguous, dtype of x
  void* y;               // [B, N] contiguous output, dtype of x
  int32_t tokens;        // B
  int32_t out_features;  // N
  int32_t in_features;   // K
};

constexpr int kGemvWarps = 4;  // per block
constexpr int kGemvRows = 2;   // weight rows per warp
constexpr int kGemvBatch = 4;  // 16-byte vectors per row and lane in flight

namespace detail {

// Loads of this lane's share of one batch: vector (or element) base + 32 i + lane
// of each of the warp's rows; zeros past the end of the row or of the matrix.
template <typename T, bool kVec>
struct GemvBatch {
  using Unit = std::conditional_t<kVec, uint4, T>;
  Unit w[kGemvBatch][kGemvRows];

  __device__ __forceinline__ void load(const T* const (&rows)[kGemvRows], const bool (&active)[kGemvRows],
                                       int64_t base, int64_t units, int lane) {
#pragma unroll
    for (int i = 0; i < kGemvBatch; ++i) {
      const int64_t u = base + 32 * i + lane;
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) {
        if constexpr (kVec) {
          w[i][r] = active[r] && u < units ? load_stream_v4(reinterpret_cast<const uint4*>(rows[r]) + u)
                                           : make_uint4(0u, 0u, 0u, 0u);
        } else {
          w[i][r] = active[r] && u < units ? __ldg(rows[r] + u) : VecTraits<T>::round(0.0f);
        }
      }
    }
  }
};

}  // namespace detail

template <typename T, int kTokens, bool kVec>
__global__ void __launch_bounds__(kGemvWarps * 32) decode_gemv_kernel(const DecodeGemvParams p) {
  using Traits = detail::VecTraits<T>;
  const int lane = threadIdx.x % 32;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / 32) * kGemvRows;
  const int64_t N = p.out_features;
  const int64_t K = p.in_features;
  const int64_t units = kVec ? K / Traits::kElems : K;  // per row: vectors (kVec) or elements
  constexpr int64_t kStep = 32 * kGemvBatch;

  const T* rows[kGemvRows];
  bool active[kGemvRows];
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r) {
    active[r] = n0 + r < N;
    rows[r] = static_cast<const T*>(p.weight) + (active[r] ? n0 + r : 0) * K;
  }
  detail::GemvBatch<T, kVec> batch;
  batch.load(rows, active, 0, units, lane);  // weights: no earlier kernel writes them
  detail::grid_dependency_wait();            // x is the previous kernel's output

  const int64_t first = static_cast<int64_t>(blockIdx.y) * kTokens;
  for (int64_t t0 = first; t0 < p.tokens; t0 += static_cast<int64_t>(gridDim.y) * kTokens) {
    if (t0 != first) batch.load(rows, active, 0, units, lane);
    const T* x[kTokens];
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      x[t] = static_cast<const T*>(p.x) + (t0 + t < p.tokens ? t0 + t : t0) * p.x_stride;
    }
    float acc[kGemvRows][kTokens] = {};
    for (int64_t base = 0; base < units; base += kStep) {
#pragma unroll
      for (int i = 0; i < kGemvBatch; ++i) {
        const int64_t u = base + 32 * i + lane;
        if (u >= units) break;  // the weights there are zeros; x must not be read
#pragma unroll
        for (int t = 0; t < kTokens; ++t) {
          if constexpr (kVec) {
            const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x[t]) + u);
#pragma unroll
            for (int r = 0; r < kGemvRows; ++r) acc[r][t] = Traits::dot(batch.w[i][r], xv, acc[r][t]);
          } else {
            const float xs = detail::to_float(__ldg(x[t] + u));
#pragma unroll
            for (int r = 0; r < kGemvRows; ++r)
              acc[r][t] = fmaf(detail::to_float(batch.w[i][r]), xs, acc[r][t]);
          }
        }
      }
      if (base + kStep < units) batch.load(rows, active, base + kStep, units, lane);
    }
    // The next kernel may be scheduled once every warp streamed its rows: its blocks land in the
    // slots this grid frees, during the tail. Triggering at the start instead put them beside this
    // grid's blocks and unbalanced it (output projection 13.7 us with PDL against 11.8 without).
    if (t0 + static_cast<int64_t>(gridDim.y) * kTokens >= p.tokens) detail::grid_launch_dependents();
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) {
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        const float sum = detail::warp_sum_f32(acc[r][t]);
        if (lane == r * kTokens + t && active[r] && t0 + t < p.tokens) {
          static_cast<T*>(p.y)[(t0 + t) * N + n0 + r] = Traits::round(sum);
        }
      }
    }
  }
}

namespace detail {

template <typename T, int kTokens>
cudaError_t launch_decode_gemv_typed(const DecodeGemvParams& p, bool vec, bool pdl, cudaStream_t stream) {
  constexpr int64_t kMaxGridY = 65535;
  const int64_t rows_per_block = static_cast<int64_t>(kGemvWarps) * kGemvRows;
  const int64_t passes = (static_cast<int64_t>(p.tokens) + kTokens - 1) / kTokens;
  const dim3 grid(static_cast<unsigned>((p.out_features + rows_per_block - 1) / rows_per_block),
                  static_cast<unsigned>(passes < kMaxGridY ? passes : kMaxGridY));
  const dim3 block(kGemvWarps * 32);
  return vec ? launch_maybe_pdl(decode_gemv_kernel<T, kTokens, true>, grid, block, stream, pdl, p)
             : launch_maybe_pdl(decode_gemv_kernel<T, kTokens, false>, grid, block, stream, pdl, p);
}

template <typename T>
cudaError_t launch_decode_gemv_tokens(const DecodeGemvParams& p, bool vec, bool pdl, cudaStream_t stream) {
  switch (p.tokens) {
    case 1: return launch_decode_gemv_typed<T, 1>(p, vec, pdl, stream);
    case 2: return launch_decode_gemv_typed<T, 2>(p, vec, pdl, stream);
    default: return launch_decode_gemv_typed<T, 4>(p, vec, pdl, stream);
  }
}

}  // namespace detail

// y = x W^T. `vec`: K is a multiple of 16 bytes of elements and x, its row stride
// and W are 16-byte aligned (else one element per lane and step). B = 0 or
// N = 0 launches nothing; K = 0 is the caller's (y is all zeros).
inline cudaError_t launch_decode_gemv(const DecodeGemvParams& p, GemvDType dtype, bool vec, bool pdl,
                                      cudaStream_t stream) {
  if (p.tokens <= 0 || p.out_features <= 0) return cudaSuccess;
  if (p.in_features <= 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case GemvDType::kFloat16: return detail::launch_decode_gemv_tokens<__half>(p, vec, pdl, stream);
    case GemvDType::kBFloat16: return detail::launch_decode_gemv_tokens<__nv_bfloat16>(p, vec, pdl, stream);
    default: return detail::launch_decode_gemv_tokens<float>(p, vec, pdl, stream);
  }
}

}  // namespace prunepath
