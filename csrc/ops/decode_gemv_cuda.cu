// CUDA glue for decode_gemv: checks, device guard, current stream, launch.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "check.h"
#include "decode_gemv_args.h"
#include "ops.h"
#include "prunepath/decode_gemv.cuh"

namespace prunepath {

at::Tensor decode_gemv_cuda(const at::Tensor& x, const at::Tensor& weight, bool pdl) {
  PRUNEPATH_CHECK_VALUE(x.is_cuda(), "decode_gemv_cuda: x must be a CUDA tensor; got ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto [B, K, N, x_stride, y] = prepare_decode_gemv(x, weight);
  if (B == 0 || N == 0) return y;
  if (K == 0) return y.zero_();

  DecodeGemvParams p{};
  p.x = x.data_ptr();
  p.x_stride = x_stride;
  p.weight = weight.data_ptr();
  p.y = y.data_ptr();
  p.tokens = static_cast<int32_t>(B);
  p.out_features = static_cast<int32_t>(N);
  p.in_features = static_cast<int32_t>(K);
  GemvDType dtype = GemvDType::kFloat32;
  if (x.scalar_type() == at::kHalf) dtype = GemvDType::kFloat16;
  if (x.scalar_type() == at::kBFloat16) dtype = GemvDType::kBFloat16;
  const int64_t elems = 16 / static_cast<int64_t>(x.element_size());
  const auto aligned = [](const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; };
  const bool vec = K % elems == 0 && p.x_stride % elems == 0 && aligned(p.x) && aligned(p.weight);
  const cudaError_t err = launch_decode_gemv(p, dtype, vec, pdl, at::cuda::getCurrentCUDAStream());
  PRUNEPATH_CHECK(err == cudaSuccess, "decode_gemv: CUDA launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace prunepath
