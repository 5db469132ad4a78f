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
//
// With a norm (LinearRouteParams::norm_weight set) the kernel also does the
// decode step's add_rms_norm in front of the router: h = x + residual (rounded
// to the dtype), y = norm_weight * (h * rsqrt(mean(h^2) + eps)) (the product
// rounded to the dtype, then the weight multiply rounded), and routes y. Every
// block sums h^2 over the token's row in the same fixed order (so every block
// holds the same rsqrt bits) and forms y on the fly from x, residual and the
// norm weight while it streams its router rows; the token's first block writes
// h and y for the kernels after it. One launch less per layer than
// add_rms_norm + linear_topp_route; y may differ from add_rms_norm's in the last
// bit (another summation order of the mean square).
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
  // The norm in front (norm_weight != nullptr): x is the residual stream, rows x_stride apart.
  const void* residual;     // [T, d] added to x, rows x_stride apart, or nullptr (h = x)
  const void* norm_weight;  // [d], dtype of x, or nullptr: no norm, x is routed as it is
  float norm_eps;
  void* h_out;  // [T, d] contiguous: h, written by each token's first block (norm only)
  void* y_out;  // [T, d] contiguous: y, the input the router saw (norm only)
};

// Largest E the fused router takes: the rank kernel routes a row with one block.
constexpr int32_t kLinearRouteMaxExperts = kToppRouteWarpMaxExperts;

namespace detail {

// Vectors in flight per lane and batch: 4 x 16 bytes, so a warp has 2 KB of
// weights outstanding (the whole slice at d = 4096, R = 4).
constexpr int kRouteVecBatch = 4;

// The router's input row as it is: vectors and elements of x.
template <typename T>
struct PlainRow {
  const T* x;
  __device__ void after_wait() {}
  __device__ uint4 vec(int64_t u) const { return reinterpret_cast<const uint4*>(x)[u]; }
  __device__ float elem(int64_t k) const { return to_float(x[k]); }
};

// The router's input row through the norm: h = round(x + r), y = round(w * round(h * rstd)).
// after_wait() computes rstd with the whole block (every thread must call it once).
template <typename T, int NWARPS>
struct NormedRow {
  using Traits = VecTraits<T>;
  const T* x;
  const T* r;  // or nullptr
  const T* w;
  int64_t d;
  float eps;
  float* reduce_smem;  // [NWARPS]
  float rstd;

  __device__ float h(int64_t k) const {
    return r == nullptr ? to_float(x[k]) : to_float(Traits::round(to_float(x[k]) + to_float(r[k])));
  }
  __device__ float y(float hk, int64_t k) const {
    return to_float(Traits::round(to_float(w[k]) * to_float(Traits::round(hk * rstd))));
  }
  __device__ void after_wait() {
    // Thread i sums h^2 over elements i, i + threads, ... in order; warps in order after.
    float ss = 0.0f;
    for (int64_t k = threadIdx.x; k < d; k += NWARPS * 32) {
      const float hk = h(k);
      ss = fmaf(hk, hk, ss);
    }
    ss = warp_sum_f32(ss);
    if (threadIdx.x % 32 == 0) reduce_smem[threadIdx.x / 32] = ss;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < NWARPS; ++i) total += reduce_smem[i];
    rstd = rsqrtf(total / static_cast<float>(d) + eps);
  }
  __device__ uint4 vec(int64_t u) const {
    uint4 out;
    T* o = reinterpret_cast<T*>(&out);
#pragma unroll
    for (int i = 0; i < Traits::kElems; ++i) {
      const int64_t k = u * Traits::kElems + i;
      o[i] = Traits::round(y(h(k), k));
    }
    return out;
  }
  __device__ float elem(int64_t k) const { return y(h(k), k); }
};

// This warp's dot product of one weight row with the input row over vectors
// [begin, end). kVec: 16-byte loads (d a multiple of the vector, both rows
// 16-byte aligned); otherwise one element per lane and step. `src` gives the
// input (the previous kernel's output: read after grid_dependency_wait).
template <typename T, bool kVec, typename Src>
__device__ __forceinline__ float row_dot(const T* __restrict__ w_row, Src& src, int64_t begin, int64_t end,
                                         int lane, bool active) {
  using Traits = VecTraits<T>;
  float acc = 0.0f;
  if constexpr (kVec) {
    const uint4* w = reinterpret_cast<const uint4*>(w_row);
    constexpr int64_t kStep = 32 * kRouteVecBatch;
    uint4 wb[kRouteVecBatch];
#pragma unroll
    for (int i = 0; i < kRouteVecBatch; ++i) {
      const int64_t v = begin + lane + 32 * i;
      wb[i] = active && v < end ? __ldg(w + v) : make_uint4(0u, 0u, 0u, 0u);
    }
    grid_dependency_wait();  // x is the previous kernel's output
    src.after_wait();
    for (int64_t v0 = begin + lane; v0 < end; v0 += kStep) {
      uint4 xb[kRouteVecBatch];
      uint4 next[kRouteVecBatch];
#pragma unroll
      for (int i = 0; i < kRouteVecBatch; ++i) {
        const int64_t v = v0 + 32 * i;
        xb[i] = v < end ? src.vec(v) : make_uint4(0u, 0u, 0u, 0u);
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
    src.after_wait();
    if (active) {
      for (int64_t k = begin + lane; k < end; k += 32) {
        acc = fmaf(to_float(w_row[k]), src.elem(k), acc);
      }
    }
  }
  return warp_sum_f32(acc);
}

}  // namespace detail

// kBuckets: topp_route_rank_row's ranking (false only for bench/diag/router_split.cu's A/B).
template <int NWARPS, typename T, bool kVec, bool kNorm, bool kBuckets = true>
__global__ void __launch_bounds__(NWARPS * 32, 1)
    linear_topp_route_kernel(const LinearRouteParams p, LogitDType dtype) {
  using Traits = detail::VecTraits<T>;
  __shared__ float partial_smem[NWARPS];
  __shared__ float norm_smem[kNorm ? NWARPS : 1];
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
  float dot;
  if constexpr (kNorm) {
    detail::NormedRow<T, NWARPS> src{
        x_row,
        p.residual == nullptr ? nullptr : static_cast<const T*>(p.residual) + t * p.x_stride,
        static_cast<const T*>(p.norm_weight),
        p.hidden,
        p.norm_eps,
        norm_smem,
        0.0f};
    dot = detail::row_dot<T, kVec>(w_row, src, begin, end, lane, row < E);
    if (g == 0) {  // the token's first block writes h and y for the kernels after this one
      T* h_out = static_cast<T*>(p.h_out) + t * p.hidden;
      T* y_out = static_cast<T*>(p.y_out) + t * p.hidden;
      for (int64_t k = tid; k < p.hidden; k += NWARPS * 32) {
        const float hk = src.h(k);
        h_out[k] = Traits::round(hk);
        y_out[k] = Traits::round(src.y(hk, k));
      }
    }
  } else {
    detail::PlainRow<T> src{x_row};
    dot = detail::row_dot<T, kVec>(w_row, src, begin, end, lane, row < E);
  }

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
  topp_route_rank_row<NWARPS, /*kBypassL1=*/true, NoRankProbe, kRankCountMax, kBuckets>(p.route, p.logits,
                                                                                        dtype, t);
}

namespace detail {

template <int NWARPS>
struct LinearRouteLaunch {
  template <typename T>
  static cudaError_t launch(const LinearRouteParams& p, LogitDType dtype, bool vec, bool pdl,
                            cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>(p.route.num_tokens * p.blocks_per_token));
    const dim3 block(NWARPS * 32);
    if (p.norm_weight != nullptr) {
      return vec ? launch_maybe_pdl(linear_topp_route_kernel<NWARPS, T, true, true>, grid, block, stream, pdl,
                                    p, dtype)
                 : launch_maybe_pdl(linear_topp_route_kernel<NWARPS, T, false, true>, grid, block, stream,
                                    pdl, p, dtype);
    }
    return vec ? launch_maybe_pdl(linear_topp_route_kernel<NWARPS, T, true, false>, grid, block, stream, pdl,
                                  p, dtype)
               : launch_maybe_pdl(linear_topp_route_kernel<NWARPS, T, false, false>, grid, block, stream, pdl,
                                  p, dtype);
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
// multiple of 16 bytes of elements and x, its row stride and the weight (and
// with a norm: the residual and the norm weight) are 16-byte aligned. Returns cudaErrorInvalidValue for E
// outside [1, kLinearRouteMaxExperts]; T = 0 launches nothing.
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
