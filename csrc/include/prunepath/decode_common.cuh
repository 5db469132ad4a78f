// Pieces shared by the decode-step GEMV kernels (decode_gemv.cuh,
// linear_topp_route.cuh): dot products over 16-byte vectors, warp sums,
// streaming loads, and programmatic dependent launch (PDL) on both sides of the
// launch. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

namespace prunepath {

// Element types of the decode kernels (one switch in each launcher).
enum class DecodeDType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace prunepath

namespace prunepath::detail {

__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Sixteen-bit floats: 8 per vector, multiplied in fp32 in element order, so
// fp16 and bf16 share one dot product through their pair type T2.
template <typename T, typename T2>
struct HalfVecTraits {
  static constexpr int kElems = 8;
  __device__ static float dot(const uint4& a, const uint4& b, float acc) {
    const T2* u = reinterpret_cast<const T2*>(&a);
    const T2* v = reinterpret_cast<const T2*>(&b);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 fu = to_float2(u[i]);
      const float2 fv = to_float2(v[i]);
      acc = fmaf(fu.x, fv.x, acc);
      acc = fmaf(fu.y, fv.y, acc);
    }
    return acc;
  }
};

// kElems elements of T per 16-byte vector; dot(a, b, acc) adds their products
// to acc in element order; round(v) is the one rounding of an fp32 result to T.
template <typename T>
struct VecTraits;
template <>
struct VecTraits<float> {
  static constexpr int kElems = 4;
  __device__ static float dot(const uint4& a, const uint4& b, float acc) {
    const float4 u = reinterpret_cast<const float4&>(a);
    const float4 v = reinterpret_cast<const float4&>(b);
    acc = fmaf(u.x, v.x, acc);
    acc = fmaf(u.y, v.y, acc);
    acc = fmaf(u.z, v.z, acc);
    return fmaf(u.w, v.w, acc);
  }
  __device__ static float round(float v) { return v; }
};
template <>
struct VecTraits<__half> : HalfVecTraits<__half, __half2> {
  __device__ static __half round(float v) { return __float2half_rn(v); }
};
template <>
struct VecTraits<__nv_bfloat16> : HalfVecTraits<__nv_bfloat16, __nv_bfloat162> {
  __device__ static __nv_bfloat16 round(float v) { return __float2bfloat16_rn(v); }
};

// Butterfly sum over a full warp: the same order on every lane, so every lane
// holds the same bits.
__device__ __forceinline__ float warp_sum_f32(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// A 16-byte load of weights that this kernel reads once: not kept in L1, and a
// 256-byte L2 prefetch hint (a warp's row segment is 512 bytes).
__device__ __forceinline__ uint4 load_stream_v4(const void* ptr) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr));
  return v;
}

// A 16-byte load through L1 (data that other warps of the SM read too) when
// `valid`, zeros otherwise, as one predicated load whose predicate is dead once
// it has issued. A C++ `valid ? load : zero` keeps one predicate register per
// load alive until its data arrives, and ptxas holds loads back once it runs out
// of predicate registers (topp_route_warp.cuh).
__device__ __forceinline__ uint4 load_cached_v4_or_zero(const void* ptr, bool valid) {
  uint4 v;
  asm("{\n .reg .pred q;\n setp.ne.u32 q, %5, 0;\n mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n"
      " mov.b32 %3, 0;\n @q ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n}"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr), "r"(static_cast<unsigned>(valid)));
  return v;
}

// 16 bytes from global to shared memory without passing through registers
// (cp.async, sm_80+), or 16 zero bytes when !valid (src is not read then).
__device__ __forceinline__ void cp_async_16_or_zero(void* smem_dst, const void* src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
// The same with an L2 cache policy (createpolicy), for weights read once per call:
// evict_first keeps what the kernel and its neighbours reuse (the routing, x, the
// partials) in L2 while hundreds of megabytes stream through it.
__device__ __forceinline__ void cp_async_16_or_zero_policy(void* smem_dst, const void* src, bool valid,
                                                           unsigned long long policy) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint.L2::256B [%0], [%1], 16, %2, %3;\n" ::"r"(dst),
               "l"(src), "r"(valid ? 16 : 0), "l"(policy)
               : "memory");
}
// Not volatile: the policy is a pure value, so the compiler may compute it once
// per thread instead of once per copy.
__device__ __forceinline__ unsigned long long l2_evict_first_policy() {
  unsigned long long policy;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed cp.async groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Programmatic dependent launch (sm_90+): wait for the previous kernel's memory;
// let the next kernel be scheduled. Both are no-ops in a launch without PDL.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Launches kernel<<<grid, block, smem, stream>>>(args...), allowed to start
// before the previous kernel on the stream ends when `pdl` (the kernel must then
// call grid_dependency_wait before touching that kernel's output).
template <typename... Params, typename... Args>
cudaError_t launch_maybe_pdl_smem(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                  cudaStream_t stream, bool pdl, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// The same without dynamic shared memory.
template <typename... Params, typename... Args>
cudaError_t launch_maybe_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, bool pdl,
                             Args&&... args) {
  return launch_maybe_pdl_smem(kernel, grid, block, 0, stream, pdl, std::forward<Args>(args)...);
}

}  // namespace prunepath::detail
