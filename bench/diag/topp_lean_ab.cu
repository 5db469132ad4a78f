// Torch-free A/B of the lean topp_route kernel at T = 65536, bf16 N(0, 1) logits, tau 0.5,
// sigmoid gates, E = 448 and 1024: this tree's kernel without and with its L2 prefetch
// (PRUNEPATH_TOPP_KERNEL=lean_prefetch) at several distances, and a baseline commit's default
// kernel for these shapes (topp_lean_ab_base.cu). Checks that every variant writes the bits
// of the first, then times them interleaved (CUDA events, 10 rounds x 50 launches each, kernel +
// deferred pass). Build: bash bench/diag/topp_lean_ab.sh build BASE_REV BINARY (see there).
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

#ifndef PRUNEPATH_AB_BASE
#define PRUNEPATH_AB_BASE "?"
#endif

// topp_lean_ab_base.cu: the baseline commit's default topp_route kernel (bf16).
void base_launch_lean(const void* params, size_t params_size, int ipl, const void* logits);

struct Variant {
  const char* name;
  bool prefetch;
  double waves;  // prefetch distance, in resident waves of warps
  bool base;     // the baseline commit's kernel
};

constexpr Variant kVariants[] = {
    {"lean", false, 0.0, false},
    {"base " PRUNEPATH_AB_BASE, false, 0.0, true},
    {"prefetch 0.375", true, kLeanPrefetchWaves, false},
    {"prefetch 0.25", true, 0.25, false},
};
constexpr int kNumVariants = sizeof(kVariants) / sizeof(kVariants[0]);

template <int IPL>
void launch(const Variant& v, const ToppRouteParams& p, const void* logits) {
  if (v.base) {
    base_launch_lean(&p, sizeof(p), IPL, logits);
  } else if (v.prefetch) {
    detail::launch_lean<IPL, true>(p, logits, LogitDType::kBFloat16, nullptr, v.waves);
  } else {
    detail::launch_lean<IPL, false>(p, logits, LogitDType::kBFloat16, nullptr);
  }
}

template <int IPL>
int run(int E) {
  const int64_t T = 65536;
  std::vector<__nv_bfloat16> host(T * E);
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto& v : host) v = __float2bfloat16(normal(rng));
  __nv_bfloat16* logits;
  int32_t *ids[kNumVariants], *n[kNumVariants];
  float* gates[kNumVariants];
  CHECK(cudaMalloc(&logits, host.size() * sizeof(__nv_bfloat16)));
  CHECK(cudaMemcpy(logits, host.data(), host.size() * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
  for (int v = 0; v < kNumVariants; ++v) {
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
  for (int v = 0; v < kNumVariants; ++v) launch<IPL>(kVariants[v], params(v), logits);
  CHECK(cudaDeviceSynchronize());
  std::vector<int32_t> a(T * E), b(T * E), na(T), nb(T);
  std::vector<float> ga(T * E), gb(T * E);
  CHECK(cudaMemcpy(a.data(), ids[0], a.size() * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(ga.data(), gates[0], ga.size() * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(na.data(), n[0], T * 4, cudaMemcpyDeviceToHost));
  bool all_same = true;
  for (int v = 1; v < kNumVariants; ++v) {
    CHECK(cudaMemcpy(b.data(), ids[v], b.size() * 4, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(gb.data(), gates[v], gb.size() * 4, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(nb.data(), n[v], T * 4, cudaMemcpyDeviceToHost));
    const bool same = a == b && na == nb && std::memcmp(ga.data(), gb.data(), ga.size() * 4) == 0;
    if (!same) std::printf("variant %s DIFFERS from %s\n", kVariants[v].name, kVariants[0].name);
    all_same &= same;
  }
  int64_t kept = 0;
  for (int32_t k : na) kept += k;
  std::printf("T=%lld E=%d bf16 N(0,1) tau=0.5: %d variants, outputs %s; mean kept %.1f\n", (long long)T, E,
              kNumVariants, all_same ? "bit-identical" : "DIFFER", double(kept) / T);
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  std::vector<float> us[kNumVariants];
  for (int round = 0; round < 10; ++round) {
    for (int v = 0; v < kNumVariants; ++v) {
      const ToppRouteParams p = params(v);
      CHECK(cudaEventRecord(e0));
      for (int i = 0; i < 50; ++i) launch<IPL>(kVariants[v], p, logits);
      CHECK(cudaEventRecord(e1));
      CHECK(cudaEventSynchronize(e1));
      float ms = 0;
      CHECK(cudaEventElapsedTime(&ms, e0, e1));
      us[v].push_back(ms * 1000.0f / 50);
    }
  }
  for (int v = 0; v < kNumVariants; ++v) {
    std::sort(us[v].begin(), us[v].end());
    std::printf("E=%-5d %-16s us per call: min %6.1f median %6.1f max %6.1f\n", E, kVariants[v].name,
                us[v].front(), us[v][us[v].size() / 2], us[v].back());
  }
  CHECK(cudaFree(logits));
  for (int v = 0; v < kNumVariants; ++v) {
    CHECK(cudaFree(ids[v]));
    CHECK(cudaFree(gates[v]));
    CHECK(cudaFree(n[v]));
  }
  return all_same ? 0 : 1;
}

int main() {
  const int a = run<16>(448);
  const int b = run<32>(1024);
  return a | b;
}
