// Instantiates every topp_route kernel through the launcher, torch-free, so
// that `nvcc -Xptxas -v` reports registers / spills / shared memory per
// template instance without building the extension. See topp_route_regs.sh.
#include "prunepath/topp_route.cuh"

cudaError_t topp_route_regs_all_variants(const prunepath::ToppRouteParams& p, const void* logits,
                                         prunepath::LogitDType dtype, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  for (auto v : {prunepath::ToppKernel::kWarp, prunepath::ToppKernel::kBlock, prunepath::ToppKernel::kLean,
                 prunepath::ToppKernel::kRank}) {
    err = prunepath::launch_topp_route(p, logits, dtype, stream, v);
  }
  return err;
}
