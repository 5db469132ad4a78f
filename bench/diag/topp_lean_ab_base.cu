// The baseline side of bench/diag/topp_lean_ab.cu: the lean kernel of another commit's headers
// (extracted by topp_lean_ab.sh), compiled with -Dprunepath=prunepath_base so that its kernels and
// the tree's live side by side in one binary. Parameters cross as bytes: the two ToppRouteParams
// are distinct types of the same layout (checked by size).
#include <cstring>

#include "prunepath/topp_route.cuh"

void base_launch_lean(const void* params, size_t params_size, int ipl, const void* logits) {
  prunepath::ToppRouteParams p;
  if (params_size != sizeof(p)) __builtin_trap();
  std::memcpy(&p, params, sizeof(p));
  if (ipl == 16) {
    prunepath::detail::launch_lean<16, true>(p, logits, prunepath::LogitDType::kBFloat16, nullptr);
  } else {
    prunepath::detail::launch_lean<32, true>(p, logits, prunepath::LogitDType::kBFloat16, nullptr);
  }
}
