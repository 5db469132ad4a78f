// CPU kernel of decode_gemv: each output is one fp32 dot product in K order,
// rounded once to the dtype (the order the CUDA kernel's per-lane sums follow
// within a lane; across lanes it differs, so values may differ in the last bit).
// Parallel over output features.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "check.h"
#include "decode_gemv_args.h"
#include "ops.h"

namespace prunepath {

at::Tensor decode_gemv_cpu(const at::Tensor& x, const at::Tensor& weight, bool /*pdl*/) {
  PRUNEPATH_CHECK_VALUE(x.device().is_cpu(), "decode_gemv_cpu: x must be on the CPU; got ", x.device());
  const auto [B, K, N, x_stride, y] = prepare_decode_gemv(x, weight);
  if (B == 0 || N == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "decode_gemv_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    // A grain of rows whose weights are about 256 KB: one task streams them for every token.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(K, 1));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* w = wp + n * K;
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* xr = xp + b * x_stride;
          float acc = 0.0f;
          for (int64_t k = 0; k < K; ++k) acc += static_cast<float>(w[k]) * static_cast<float>(xr[k]);
          yp[b * N + n] = static_cast<scalar_t>(acc);
        }
      }
    });
  });
  return y;
}

}  // namespace prunepath
