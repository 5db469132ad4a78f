// CUDA glue for align_experts: device guard, scratch, current stream, launch.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include "align_experts_args.h"
#include "check.h"
#include "ops.h"
#include "prunepath/align_experts.cuh"

namespace prunepath {

AlignOutputs align_experts_cuda(const at::Tensor& expert_ids, const at::Tensor& num_active,
                                int64_t num_experts, int64_t block_m) {
  PRUNEPATH_CHECK_VALUE(expert_ids.is_cuda(), "align_experts_cuda: expert_ids must be a CUDA tensor; got ",
                        expert_ids.device());
  const c10::cuda::CUDAGuard device_guard(expert_ids.device());
  PRUNEPATH_CHECK_VALUE(num_experts <= kAlignCudaMaxExperts,
                        "align_experts: the CUDA kernel handles E <= ", kAlignCudaMaxExperts, "; got ",
                        num_experts);
  AlignCall call = prepare_align_experts(expert_ids, num_active, num_experts, block_m);
  const int64_t words = align_num_chunks(call.params.num_tokens) * num_experts;
  const auto opts = expert_ids.options().dtype(at::kInt);
  at::Tensor bitmap = at::empty({words}, opts);
  at::Tensor chunk_base = at::empty({words}, opts);
  const cudaError_t err =
      launch_align_experts(call.params, reinterpret_cast<uint32_t*>(bitmap.data_ptr<int32_t>()),
                           chunk_base.data_ptr<int32_t>(), at::cuda::getCurrentCUDAStream());
  PRUNEPATH_CHECK(err == cudaSuccess, "align_experts: CUDA launch failed: ", cudaGetErrorString(err));
  return {call.sorted_pairs, call.block_expert, call.expert_offsets, call.expert_counts};
}

}  // namespace prunepath
