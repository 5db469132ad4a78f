// The FFN nonlinearities of the routed expert FFN, shared by the CPU kernel
// (expert_ffn_cpu.h) and the CUDA kernel (expert_ffn_cuda.cuh) so both apply the
// same formula in fp32. Torch-free.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PRUNEPATH_HOST_DEVICE __host__ __device__
#else
#define PRUNEPATH_HOST_DEVICE
#endif

namespace prunepath {

enum class FfnActivation : int32_t { kSilu, kGelu, kGeluTanh, kRelu };

// silu(z) = z sigmoid(z); gelu exact (erf) or with the tanh approximation; relu
// (NaN stays NaN, as in torch).
PRUNEPATH_HOST_DEVICE inline float ffn_activation(float z, FfnActivation act) {
  switch (act) {
    case FfnActivation::kSilu: return z / (1.f + expf(-z));
    case FfnActivation::kGelu: return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
    case FfnActivation::kGeluTanh: {
      const float inner = 0.79788456080286536f * (z + 0.044715f * z * z * z);
      return 0.5f * z * (1.f + tanhf(inner));
    }
    case FfnActivation::kRelu: return z < 0.f ? 0.f : z;
  }
  return z;
}

}  // namespace prunepath
