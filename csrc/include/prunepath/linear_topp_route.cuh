// Router projection and top-p routing in one launch, for the decode regime
// (a few tokens): logits = x W^T, then SPEC.md section 3 on each row. Torch-free.
//
// At batch 1 the router is two short launches whose cost is latency, not bytes:
// a cuBLAS GEMV of 448 x 4096 (3.7 MB, under a microsecond of HBM time) and the
// rank kernel. Here one grid does both:
//  * block (t, g) computes the logits of rows [g R, g R + R) for token t: R rows
//    per block, NWARPS / R warps per row, each warp a contiguous slice of d in
//    16-byte vectors, a fixed summation order (lane order, butterfly, slices in
//    order), rounded once to the dtype of x as F.linear rounds its output;
//  * the block that completes token t's row (an arrival counter per token,
//    incremented with atomicInc so it wraps back to zero for the next launch)
//    routes it with topp_route_rank_row, the rank kernel's code: given the same
//    logits the selection and gates are bit-identical to topp_route.
// With programmatic dependent launch the weight loads of the first slice are
// issued before griddepcontrol.wait: they do not depend on the previous kernel,
// which is still finishing the x this kernel reads.
#pragma once

#include "prunepath/decode_common.cuh"
#include "prunepath/topp_route.cuh"

namespace prunepath {

struct LinearRouteParams {
  const void* x;             // [T, d], unit inner stride, rows x_stride apart
  int64_t x_stride;          // elements
  const void* weight;        // [E, d] contiguous, dtype of x
  int32_t hidden;            // d
  void* logits;              // [T, E] contiguous output, dtype of x
  uint32_t* tickets;         // [T] arrival counters: zero before the first launch, left zero
  int32_t rows_per_block;    // R, a power of two dividing the block's warp count
  int32_t blocks_per_token;  // G = ceil(E / R)
  ToppRouteParams route;     // num_tokens = T, logits_stride = E
};

// Largest E the fused router takes: the rank kernel routes a row with one block.
constexpr int32_t kLinearRouteMaxExperts = kToppRouteWarpMaxExperts;

namespace detail {

// Vectors in flight per lane and batch: 4 x 16 bytes, so a warp has 2 KB of
// weights outstanding (the whole slice at d = 4096, R = 4).
constexpr int kRouteVecBatch = 4;

// This warp's dot product of one weight row with x over vectors [begin, end).
// kVec: 16-byte loads (d a multiple of the vector, both rows 16-byte aligned);
// otherwise one element per lane and step.
template <typename T, bool kVec>
__device__ __forceinline__ float row_dot(const T* __restrict__ w_row, const T* __restrict__ x_row,
                                         int64_t begin, int64_t end, int lane, bool active) {
  using Traits = VecTraits<T>;
  float acc = 0.0f;
  if constexpr (kVec) {
    const uint4* w = reinterpret_cast<const uint4*>(w_row);
    const uint4* xv = reinterpret_cast<const uint4*>(x_row);
    constexpr int64_t kStep = 32 * kRouteVecBatch;
    uint4 wb[kRouteVecBatch];
#pragma unroll
    for (int i = 0; i < kRouteVecBatch; ++i) {
      const int64_t v = begin + lane + 32 * i;
      wb[i] = active && v < end ? __ldg(w + v) : make_uint4(0u, 0u, 0u, 0u);
    }
    grid_dependency_wait();  // x is the previous kernel's output
    for (int64_t v0 = begin + lane; v0 < end; v0 += kStep) {
      uint4 xb[kRouteVecBatch];
      uint4 next[kRouteVecBatch];
#pragma unroll
      for (int i = 0; i < kRouteVecBatch; ++i) {
        const int64_t v = v0 + 32 * i;
        xb[i] = v < end ? xv[v] : make_uint4(0u, 0u, 0u, 0u);
        next[i] = active && v + kStep < end ? __ldg(w + v + kStep) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int i = 0; i < kRouteVecBatch; ++i) {
        acc = Traits::dot(wb[i], xb[i], acc);
        wb[i] = next[i];
      }
    }
  } else {
    grid_dependency_wait();
    if (active) {
      for (int64_t k = begin + lane; k < end; k += 32) {
        acc = fmaf(to_float(w_row[k]), to_float(x_row[k]), acc);
      }
    }
  }
  return warp_sum_f32(acc);
}

}  // namespace detail

template <int NWARPS, typename T, bool kVec>
__global__ void __launch_bounds__(NWARPS * 32, 1)
    linear_topp_route_kernel(const LinearRouteParams p, LogitDType dtype) {
  using Traits = detail::VecTraits<T>;
  __shared__ float partial_smem[NWARPS];
  __shared__ bool last_smem;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int G = p.blocks_per_token;
  const int64_t t = blockIdx.x / G;
  const int g = static_cast<int>(blockIdx.x % G);
  const int R = p.rows_per_block;
  const int W = NWARPS / R;  // warps per row
  const int E = p.route.num_experts;
  const int row = g * R + warp / W;
  const int slice = warp % W;

  // This warp's slice of the row, in vectors (kVec) or elements.
  const int64_t units = kVec ? p.hidden / Traits::kElems : p.hidden;
  const int64_t per_slice = (units + W - 1) / W;
  const int64_t begin = slice * per_slice;
  const int64_t end = begin + per_slice < units ? begin + per_slice : units;
  const T* w_row = static_cast<const T*>(p.weight) + static_cast<int64_t>(row < E ? row : 0) * p.hidden;
  const T* x_row = static_cast<const T*>(p.x) + t * p.x_stride;
  const float dot = detail::row_dot<T, kVec>(w_row, x_row, begin, end, lane, row < E);

  if (lane == 0) partial_smem[warp] = dot;
  __syncthreads();
  if (tid < R && g * R + tid < E) {
    float logit = 0.0f;
    for (int s = 0; s < W; ++s) logit += partial_smem[tid * W + s];
    static_cast<T*>(p.logits)[t * E + g * R + tid] = Traits::round(logit);
  }
  // Release this block's logits, then count it in; the G-th arrival resets the
  // counter (atomicInc wraps at G - 1) and routes the row.
  __threadfence();
  __syncthreads();
  if (tid == 0)
    last_smem = atomicInc(p.tickets + t, static_cast<unsigned>(G - 1)) == static_cast<unsigned>(G - 1);
  __syncthreads();
  detail::grid_launch_dependents();
  if (!last_smem) return;
  __threadfence();
  topp_route_rank_row<NWARPS, /*kBypassL1=*/true>(p.route, p.logits, dtype, t);
}

namespace detail {

template <int NWARPS>
struct LinearRouteLaunch {
  template <typename T>
  static cudaError_t launch(const LinearRouteParams& p, LogitDType dtype, bool vec, bool pdl,
                            cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>(p.route.num_tokens * p.blocks_per_token));
    const dim3 block(NWARPS * 32);
    return vec ? launch_maybe_pdl(linear_topp_route_kernel<NWARPS, T, true>, grid, block, stream, pdl, p,
                                  dtype)
               : launch_maybe_pdl(linear_topp_route_kernel<NWARPS, T, false>, grid, block, stream, pdl, p,
                                  dtype);
  }
  static cudaError_t run(const LinearRouteParams& p, LogitDType dtype, bool vec, bool pdl,
                         cudaStream_t stream) {
    switch (dtype) {
      case LogitDType::kFloat16: return launch<__half>(p, dtype, vec, pdl, stream);
      case LogitDType::kBFloat16: return launch<__nv_bfloat16>(p, dtype, vec, pdl, stream);
      default: return launch<float>(p, dtype, vec, pdl, stream);
    }
  }
};

}  // namespace detail

// Warps per block for E experts: one thread per expert in the routing phase.
inline int linear_route_warps(int32_t E) {
  int n = 1;
  while (n * 32 < E) n <<= 1;
  return n;
}

// Rows per block: the smallest power of two that keeps the grid of one token
// within one wave of `sm_count` blocks, at most one row per warp.
inline int linear_route_rows_per_block(int32_t E, int sm_count) {
  const int warps = linear_route_warps(E);
  int r = 1;
  while (r < warps && static_cast<int64_t>(r) * sm_count < E) r <<= 1;
  return r;
}

// Fills p.rows_per_block and p.blocks_per_token and launches. `vec`: d is a
// multiple of 16 bytes of elements and x, its row stride and the weight are
// 16-byte aligned. Returns cudaErrorInvalidValue for E outside
// [1, kLinearRouteMaxExperts]; T = 0 launches nothing.
inline cudaError_t launch_linear_topp_route(LinearRouteParams p, LogitDType dtype, bool vec, bool pdl,
                                            cudaStream_t stream) {
  const int32_t E = p.route.num_experts;
  if (E < 1 || E > kLinearRouteMaxExperts) return cudaErrorInvalidValue;
  if (p.route.num_tokens == 0) return cudaSuccess;
  p.rows_per_block = linear_route_rows_per_block(E, detail::current_device_sm_count());
  p.blocks_per_token = (E + p.rows_per_block - 1) / p.rows_per_block;
  switch (linear_route_warps(E)) {
    case 1: return detail::LinearRouteLaunch<1>::run(p, dtype, vec, pdl, stream);
    case 2: return detail::LinearRouteLaunch<2>::run(p, dtype, vec, pdl, stream);
    case 4: return detail::LinearRouteLaunch<4>::run(p, dtype, vec, pdl, stream);
    case 8: return detail::LinearRouteLaunch<8>::run(p, dtype, vec, pdl, stream);
    case 16: return detail::LinearRouteLaunch<16>::run(p, dtype, vec, pdl, stream);
    default: return detail::LinearRouteLaunch<32>::run(p, dtype, vec, pdl, stream);
  }
}

}  // namespace prunepath
