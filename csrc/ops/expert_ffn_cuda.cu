// CUDA glue for expert_ffn: checks, device guard, current stream, a workspace
// for the per-block partial sums, launch (tokens in chunks that bound the
// workspace). Nothing here synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "check.h"
#include "expert_ffn_args.h"
#include "ops.h"
#include "prunepath/expert_ffn_cuda.cuh"

namespace prunepath {
namespace {

// Blocks per SM of the partial kernel, and whether to cap it there (tuning knobs of
// bench/sparse_ffn_sweep.py; the defaults come from its H200 run).
int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

constexpr int64_t kWorkspaceBytes = int64_t{64} << 20;  // partial sums of one chunk of tokens

}  // namespace

at::Tensor expert_ffn_cuda(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& gates,
                           const at::Tensor& num_active, const at::Tensor& w_in,
                           const std::optional<at::Tensor>& b_in, const at::Tensor& w_down,
                           const std::optional<at::Tensor>& b_out, bool gated, c10::string_view act,
                           bool pdl) {
  const ExpertFfnShape shape =
      check_expert_ffn_inputs(x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out, gated, act);
  PRUNEPATH_CHECK_VALUE(x.is_cuda(), "expert_ffn_cuda: x must be a CUDA tensor; got ", x.device());
  const auto same_device = [&](const at::Tensor& t, const char* name) {
    PRUNEPATH_CHECK_VALUE(t.device() == x.device(), "expert_ffn: ", name, " is on ", t.device(),
                          " but x is on ", x.device());
  };
  same_device(expert_ids, "expert_ids");
  same_device(gates, "gates");
  same_device(num_active, "num_active");
  same_device(w_in, "w_in");
  same_device(w_down, "w_down");
  if (b_in.has_value()) same_device(*b_in, "b_in");
  if (b_out.has_value()) same_device(*b_out, "b_out");
  const c10::cuda::CUDAGuard device_guard(x.device());

  const int64_t T = shape.T, d = shape.d, K = shape.K;
  at::Tensor y = at::empty({T, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (T == 0 || d == 0) return y;
  const at::Tensor xc = x.contiguous();
  const at::Tensor ids = expert_ids.contiguous();
  const at::Tensor gts = gates.contiguous();
  const at::Tensor num = num_active.contiguous();
  const at::Tensor w_in_c = w_in.contiguous();
  const at::Tensor w_down_c = w_down.contiguous();
  const at::Tensor b_in_c = b_in.has_value() ? b_in->contiguous() : at::Tensor();
  const at::Tensor b_out_c = b_out.has_value() ? b_out->contiguous() : at::Tensor();

  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int blocks_per_sm =
      std::max(1, env_int("PRUNEPATH_EXPERT_FFN_BLOCKS_PER_SM", kFfnDefaultBlocksPerSm));
  const int cap = env_int("PRUNEPATH_EXPERT_FFN_CAP", 1) != 0 ? blocks_per_sm : 0;
  const int64_t P1 = expert_ffn_blocks_per_token(1, K, shape.S, static_cast<int64_t>(blocks_per_sm) * sms);
  const int64_t chunk = std::clamp<int64_t>(kWorkspaceBytes / (P1 * d * 4), 1, std::min<int64_t>(T, 65535));
  const int32_t P = expert_ffn_blocks_per_token(chunk, K, shape.S, static_cast<int64_t>(blocks_per_sm) * sms);
  at::Tensor partial = at::empty({chunk, P, d}, x.options().dtype(at::kFloat));

  DecodeDType dtype = DecodeDType::kFloat32;
  if (x.scalar_type() == at::kHalf) dtype = DecodeDType::kFloat16;
  if (x.scalar_type() == at::kBFloat16) dtype = DecodeDType::kBFloat16;
  const int64_t elems = 16 / static_cast<int64_t>(x.element_size());
  const auto aligned = [](const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; };
  const bool vec =
      d % elems == 0 && aligned(xc.data_ptr()) && aligned(w_in_c.data_ptr()) && aligned(w_down_c.data_ptr());
  const int64_t esize = static_cast<int64_t>(x.element_size());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    ExpertFfnCudaParams p{};
    p.x = static_cast<const char*>(xc.data_ptr()) + t0 * d * esize;
    p.expert_ids = ids.data_ptr<int32_t>() + t0 * K;
    p.gates = gts.data_ptr<float>() + t0 * K;
    p.num_active = num.data_ptr<int32_t>() + t0;
    p.w_in = w_in_c.data_ptr();
    p.b_in = b_in_c.defined() ? b_in_c.data_ptr() : nullptr;
    p.w_down = w_down_c.data_ptr();
    p.b_out = b_out_c.defined() ? b_out_c.data_ptr() : nullptr;
    p.partial = partial.data_ptr<float>();
    p.y = static_cast<char*>(y.data_ptr()) + t0 * d * esize;
    p.hidden = d;
    p.tokens = static_cast<int32_t>(std::min(chunk, T - t0));
    p.k = static_cast<int32_t>(K);
    p.num_experts = static_cast<int32_t>(shape.E);
    p.width = static_cast<int32_t>(shape.S);
    p.blocks_per_token = P;
    p.gated = gated;
    p.act = shape.act;
    const cudaError_t err = launch_expert_ffn_cuda(p, dtype, vec, pdl, cap, stream);
    PRUNEPATH_CHECK(err == cudaSuccess, "expert_ffn: CUDA launch failed: ", cudaGetErrorString(err));
  }
  return y;
}

}  // namespace prunepath
