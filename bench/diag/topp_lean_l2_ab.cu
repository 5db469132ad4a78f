// Torch-free A/B of the lean topp_route kernel with and without the L2 prefetch one
// resident wave ahead (PRUNEPATH_TOPP_KERNEL lean vs leanl2) at T = 65536, E = 448, bf16
// N(0, 1) logits, tau 0.5, sigmoid gates: checks that both write the same bits, then times
// them interleaved (CUDA events, 10 rounds x 50 launches each, kernel + deferred pass).
// Build and run (GPU machine): bash bench/diag/topp_lean_l2_ab.sh
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "prunepath/topp_route.cuh"

using namespace prunepath;

#define CHECK(x)                                                                          \
  do {                                                                                    \
    cudaError_t e = (x);                                                                  \
    if (e != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); \
      return 1;                                                                           \
    }                                                                                     \
  } while (0)

int main() {
  const int64_t T = 65536;
  const int E = 448;
  std::vector<__nv_bfloat16> host(T * E);
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto& v : host) v = __float2bfloat16(normal(rng));
  __nv_bfloat16* logits;
  int32_t *ids[2], *n[2];
  float* gates[2];
  CHECK(cudaMalloc(&logits, host.size() * sizeof(__nv_bfloat16)));
  CHECK(cudaMemcpy(logits, host.data(), host.size() * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
  for (int v = 0; v < 2; ++v) {
    CHECK(cudaMalloc(&ids[v], T * E * sizeof(int32_t)));
    CHECK(cudaMalloc(&gates[v], T * E * sizeof(float)));
    CHECK(cudaMalloc(&n[v], T * sizeof(int32_t)));
  }
  auto params = [&](int v) {
    ToppRouteParams p{};
    p.num_tokens = T;
    p.num_experts = E;
    p.k = E;
    p.logits_stride = E;
    p.tau = 0.5f;
    p.tau_per_token = nullptr;
    p.tau_stride = 0;
    p.min_experts = 1;
    p.gate = GateMode::kSigmoid;
    p.expert_ids = ids[v];
    p.gates = gates[v];
    p.num_active = n[v];
    return p;
  };
  auto launch = [&](int v) {
    if (v == 0) {
      detail::launch_lean<16, false>(params(0), logits, LogitDType::kBFloat16, nullptr);
    } else {
      detail::launch_lean<16, true>(params(1), logits, LogitDType::kBFloat16, nullptr);
    }
  };
  launch(0);
  launch(1);
  CHECK(cudaDeviceSynchronize());
  std::vector<int32_t> a(T * E), b(T * E);
  std::vector<float> ga(T * E), gb(T * E);
  CHECK(cudaMemcpy(a.data(), ids[0], a.size() * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(b.data(), ids[1], b.size() * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(ga.data(), gates[0], ga.size() * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(gb.data(), gates[1], gb.size() * 4, cudaMemcpyDeviceToHost));
  const bool same = a == b && std::memcmp(ga.data(), gb.data(), ga.size() * 4) == 0;
  int64_t kept = 0;
  std::vector<int32_t> na(T);
  CHECK(cudaMemcpy(na.data(), n[0], T * 4, cudaMemcpyDeviceToHost));
  for (int32_t k : na) kept += k;
  std::printf("T=%lld E=%d bf16 N(0,1) tau=0.5: lean and leanl2 outputs %s; mean kept %.1f\n", (long long)T,
              E, same ? "bit-identical" : "DIFFER", double(kept) / T);
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  std::vector<float> us[2];
  for (int round = 0; round < 10; ++round) {
    for (int v = 0; v < 2; ++v) {
      CHECK(cudaEventRecord(e0));
      for (int i = 0; i < 50; ++i) launch(v);
      CHECK(cudaEventRecord(e1));
      CHECK(cudaEventSynchronize(e1));
      float ms = 0;
      CHECK(cudaEventElapsedTime(&ms, e0, e1));
      us[v].push_back(ms * 1000.0f / 50);
    }
  }
  for (int v = 0; v < 2; ++v) {
    std::sort(us[v].begin(), us[v].end());
    std::printf("%-6s us per call: min %.1f median %.1f max %.1f\n", v == 0 ? "lean" : "leanl2",
                us[v].front(), us[v][us[v].size() / 2], us[v].back());
  }
  return same ? 0 : 1;
}
