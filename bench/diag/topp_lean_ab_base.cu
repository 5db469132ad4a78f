// The baseline side of bench/diag/topp_lean_ab.cu: the default kernel of another commit's headers
// (extracted by topp_lean_ab.sh), compiled with -Dprunepath=prunepath_base so that its kernels and
// the tree's live side by side in one binary. Parameters cross as bytes: the two ToppRouteParams
// are distinct types of the same layout (checked by size).
#include <cstring>

#include "prunepath/topp_route.cuh"

void base_launch_lean(const void* params, size_t params_size, int ipl, const void* logits) {
  prunepath::ToppRouteParams p;
  if (params_size != sizeof(p)) __builtin_trap();
  std::memcpy(&p, params, sizeof(p));
  (void)ipl;  // the base's own dispatch picks the row width from p.num_experts
  prunepath::launch_topp_route(p, logits, prunepath::LogitDType::kBFloat16, nullptr);
}
