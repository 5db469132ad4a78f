// Top-p (cumulative-mass) expert routing on the GPU, SPEC.md section 3.
// Launcher: picks the warp-per-token kernel for E <= 1024 and the
// block-per-token CUB kernel above. No host synchronisation, any T.
// Torch-free: raw pointers and a cudaStream_t.
#pragma once

#include "prunepath/topp_route_block.cuh"
#include "prunepath/topp_route_common.cuh"
#include "prunepath/topp_route_warp.cuh"

namespace prunepath {

// Returns cudaErrorInvalidValue for E outside [1, kToppRouteCudaMaxExperts].
inline cudaError_t launch_topp_route(const ToppRouteParams& p, const void* logits, LogitDType dtype,
                                     cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  const int32_t E = p.num_experts;
  if (E < 1 || E > kToppRouteCudaMaxExperts) return cudaErrorInvalidValue;
  if (E <= kToppRouteWarpMaxExperts) {
    const dim3 grid(
        static_cast<unsigned>((p.num_tokens + kToppRouteWarpsPerBlock - 1) / kToppRouteWarpsPerBlock));
    const dim3 block(kToppRouteWarpsPerBlock * 32);
    if (E <= 32) {
      topp_route_warp_kernel<1><<<grid, block, 0, stream>>>(p, logits, dtype);
    } else if (E <= 64) {
      topp_route_warp_kernel<2><<<grid, block, 0, stream>>>(p, logits, dtype);
    } else if (E <= 128) {
      topp_route_warp_kernel<4><<<grid, block, 0, stream>>>(p, logits, dtype);
    } else if (E <= 256) {
      topp_route_warp_kernel<8><<<grid, block, 0, stream>>>(p, logits, dtype);
    } else if (E <= 512) {
      topp_route_warp_kernel<16><<<grid, block, 0, stream>>>(p, logits, dtype);
    } else {
      topp_route_warp_kernel<32><<<grid, block, 0, stream>>>(p, logits, dtype);
    }
    return cudaGetLastError();
  }
  const dim3 grid(static_cast<unsigned>(p.num_tokens));
  if (E <= 2048) {
    topp_route_block_kernel<256, 8><<<grid, 256, 0, stream>>>(p, logits, dtype);
  } else {  // fewer radix bits: fits in 48 KB of static shared memory
    topp_route_block_kernel<512, 8, 4><<<grid, 512, 0, stream>>>(p, logits, dtype);
  }
  return cudaGetLastError();
}

}  // namespace prunepath
