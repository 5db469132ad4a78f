// Where the batch-1 fused router's time goes (linear_topp_route_kernel at Llama-3-8B's router,
// E = 448, d = 4096, bf16): the kernel of this tree against cut-down copies of its first half,
// each timed as 32 back-to-back calls in one CUDA graph with programmatic dependent launch (as in
// the decode step), the router weights rotating over copies larger than L2. Torch-free; built by
// bench/diag/router_split.sh, run on the GPU machine. Prints one table (us per call, medians).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "prunepath/linear_topp_route.cuh"
#include "prunepath/topp_route_rank.cuh"

using namespace prunepath;
using T = __nv_bfloat16;
constexpr int kWarps = 16;  // linear_route_warps(448)

#define CHECK(x)                                                                              \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

// The fused kernel's first half, stopped after: 0 the wait (weights prefetched, nothing else),
// 1 the logits write, 2 the fence and the ticket (the last block returns instead of routing),
// 3 the last block's reload of the row (the rank's first load) and a trivial output.
template <int kStop>
__global__ void __launch_bounds__(kWarps * 32, 1) router_part_kernel(const LinearRouteParams p) {
  using Traits = detail::VecTraits<T>;
  __shared__ float partial_smem[kWarps];
  __shared__ bool last_smem;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int G = p.blocks_per_token, R = p.rows_per_block, W = kWarps / R, E = p.route.num_experts;
  const int64_t t = blockIdx.x / G;
  const int g = static_cast<int>(blockIdx.x % G);
  const int row = g * R + warp / W, slice = warp % W;
  const int64_t units = p.hidden / Traits::kElems, per_slice = (units + W - 1) / W;
  const int64_t begin = slice * per_slice, end = begin + per_slice < units ? begin + per_slice : units;
  const T* w_row = static_cast<const T*>(p.weight) + static_cast<int64_t>(row < E ? row : 0) * p.hidden;
  detail::PlainRow<T> src{static_cast<const T*>(p.x) + t * p.x_stride};
  if constexpr (kStop == 0) {
    uint4 wb = __ldg(reinterpret_cast<const uint4*>(w_row) + begin + lane);
    detail::grid_dependency_wait();
    detail::grid_launch_dependents();
    if (wb.x == 0x7fffffffu && wb.y == 1u)
      static_cast<T*>(p.logits)[0] = Traits::round(1.0f);  // keep the load
    return;
  } else {
    const float dot = detail::row_dot<T, true>(w_row, src, begin, end, lane, row < E);
    if (lane == 0) partial_smem[warp] = dot;
    __syncthreads();
    if (tid < R && g * R + tid < E) {
      float logit = 0.0f;
      for (int s = 0; s < W; ++s) logit += partial_smem[tid * W + s];
      static_cast<T*>(p.logits)[t * E + g * R + tid] = Traits::round(logit);
    }
    if constexpr (kStop == 1) {
      detail::grid_launch_dependents();
      return;
    }
    __threadfence();
    __syncthreads();
    if (tid == 0)
      last_smem = atomicInc(p.tickets + t, static_cast<unsigned>(G - 1)) == static_cast<unsigned>(G - 1);
    __syncthreads();
    detail::grid_launch_dependents();
    if (!last_smem || kStop == 2) return;
    __threadfence();
    const float v = tid < E ? detail::load_logit_cg(p.logits, t * E + tid, LogitDType::kBFloat16) : 0.0f;
    const float m = __syncthreads_or(v > 1e30f);
    if (tid == 0) p.route.num_active[t] = 1 + static_cast<int>(m);
  }
}

// The rank's phases in SM cycles (topp_route_rank_row's Probe marks, read by thread 0).
__device__ long long g_marks[8];
struct ClockProbe {
  __device__ static void mark(int k) {
    if (threadIdx.x == 0) g_marks[k] = clock64();
  }
};

template <bool kBuckets>
__global__ void __launch_bounds__(kWarps * 32, 1)
    rank_probe_kernel(const ToppRouteParams p, const void* logits) {
  if (threadIdx.x == 0) g_marks[0] = clock64();
  topp_route_rank_row<kWarps, true, ClockProbe, kRankCountMax, kBuckets>(p, logits, LogitDType::kBFloat16, 0);
}

// kCountMax: the rank's cut-over from counting to the bitonic sort (kRankCountMax in production);
// kBuckets: rank by bucket where the bins allow it (the default) or always compact and count.
template <int kCountMax = kRankCountMax, bool kBuckets = true>
__global__ void __launch_bounds__(kWarps * 32, 1)
    rank_only_kernel(const ToppRouteParams p, const void* logits) {
  detail::grid_dependency_wait();
  detail::grid_launch_dependents();
  topp_route_rank_row<kWarps, true, NoRankProbe, kCountMax, kBuckets>(p, logits, LogitDType::kBFloat16,
                                                                      blockIdx.x);
}

__global__ void empty_kernel(int* sink) {
  detail::grid_dependency_wait();
  detail::grid_launch_dependents();
  if (sink != nullptr && threadIdx.x == 1024) *sink = 1;
}

int main() {
  const int E = 448, d = 4096, copies = 24, calls = 32, replays = 20;
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::vector<T> hw(static_cast<size_t>(copies) * E * d), hx(d);
  uint32_t s = 12345u;
  auto uni = [&] {
    s = s * 1664525u + 1013904223u;
    return (static_cast<float>(s >> 8) / 16777216.0f) * 2.0f - 1.0f;
  };
  for (auto& v : hw) v = __float2bfloat16(uni() * 0.027f);  // ~N(0, 1/d) scale: logits of std ~1
  for (auto& v : hx) v = __float2bfloat16(uni() * 1.7f);
  T *w, *x, *logits;
  uint32_t* tickets;
  int32_t *ids, *num_active;
  float* gates;
  CHECK(cudaMalloc(&w, hw.size() * sizeof(T)));
  CHECK(cudaMalloc(&x, d * sizeof(T)));
  CHECK(cudaMalloc(&logits, E * sizeof(T)));
  CHECK(cudaMalloc(&tickets, 4));
  CHECK(cudaMalloc(&ids, E * 4));
  CHECK(cudaMalloc(&gates, E * 4));
  CHECK(cudaMalloc(&num_active, 4));
  CHECK(cudaMemcpy(w, hw.data(), hw.size() * sizeof(T), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(x, hx.data(), d * sizeof(T), cudaMemcpyHostToDevice));
  CHECK(cudaMemset(tickets, 0, 4));

  LinearRouteParams p{};
  p.x = x;
  p.x_stride = d;
  p.hidden = d;
  p.logits = logits;
  p.tickets = tickets;
  p.route.num_tokens = 1;
  p.route.num_experts = E;
  p.route.k = E;
  p.route.logits_stride = E;
  p.route.min_experts = 1;
  p.route.gate = GateMode::kSigmoid;
  p.route.expert_ids = ids;
  p.route.gates = gates;
  p.route.num_active = num_active;
  p.rows_per_block = linear_route_rows_per_block(E, sms);
  p.blocks_per_token = (E + p.rows_per_block - 1) / p.rows_per_block;
  const dim3 grid(p.blocks_per_token), block(kWarps * 32);

  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  auto time_graph = [&](auto&& launch_one) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < calls; ++i) CHECK(launch_one(i));
    CHECK(cudaStreamEndCapture(stream, &graph));
    CHECK(cudaGraphInstantiate(&exec, graph, 0));
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    for (int i = 0; i < 3; ++i) CHECK(cudaGraphLaunch(exec, stream));
    std::vector<float> us;
    for (int r = 0; r < replays; ++r) {
      CHECK(cudaEventRecord(a, stream));
      CHECK(cudaGraphLaunch(exec, stream));
      CHECK(cudaEventRecord(b, stream));
      CHECK(cudaEventSynchronize(b));
      float ms = 0.0f;
      CHECK(cudaEventElapsedTime(&ms, a, b));
      us.push_back(ms * 1e3f / calls);
    }
    std::sort(us.begin(), us.end());
    CHECK(cudaGraphExecDestroy(exec));
    CHECK(cudaGraphDestroy(graph));
    return us[us.size() / 2];
  };
  auto with_weights = [&](int i) {
    LinearRouteParams q = p;
    q.weight = w + static_cast<size_t>(i % copies) * E * d;
    return q;
  };
  cudaDeviceProp prop;
  int driver = 0;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  CHECK(cudaDriverGetVersion(&driver));
  std::printf("# %s, CUDA driver API %d, runtime %d (compiled with nvcc %d.%d)\n", prop.name, driver,
              CUDART_VERSION, __CUDACC_VER_MAJOR__, __CUDACC_VER_MINOR__);
  std::printf("# router split: E = %d, d = %d, bf16, %d blocks x %d threads (%d rows each), %d SMs\n", E, d,
              p.blocks_per_token, kWarps * 32, p.rows_per_block, sms);
  std::printf(
      "# us per call: %d calls per CUDA graph with PDL, weights over %d copies (%.0f MB), median of %d\n\n",
      calls, copies, hw.size() * 2.0 / 1e6, replays);
  std::printf("| variant | tau | us per call | num_active |\n|---|---:|---:|---:|\n");
  auto show = [&](const char* name, float tau, float us) {
    int n = -1;
    CHECK(cudaMemcpy(&n, num_active, 4, cudaMemcpyDeviceToHost));
    std::printf("| %s | %.2f | %.2f | %d |\n", name, tau, us, n);
    CHECK(cudaMemset(num_active, 0, 4));
  };
  show("empty kernel, 1 block", 0.f, time_graph([&](int) {
         return detail::launch_maybe_pdl(empty_kernel, dim3(1), block, stream, true, nullptr);
       }));
  show("empty kernel, router grid", 0.f, time_graph([&](int) {
         return detail::launch_maybe_pdl(empty_kernel, grid, block, stream, true, nullptr);
       }));
  show("weights prefetch + wait only", 0.f, time_graph([&](int i) {
         return detail::launch_maybe_pdl(router_part_kernel<0>, grid, block, stream, true, with_weights(i));
       }));
  show("GEMV + logits write", 0.f, time_graph([&](int i) {
         return detail::launch_maybe_pdl(router_part_kernel<1>, grid, block, stream, true, with_weights(i));
       }));
  show("+ fence + ticket", 0.f, time_graph([&](int i) {
         return detail::launch_maybe_pdl(router_part_kernel<2>, grid, block, stream, true, with_weights(i));
       }));
  show("+ last block reloads the row", 0.f, time_graph([&](int i) {
         return detail::launch_maybe_pdl(router_part_kernel<3>, grid, block, stream, true, with_weights(i));
       }));
  // Session 21: bucket ranking (the default) against compaction + counting, the same bits.
  for (float tau : {0.3f, 0.6f, 0.7f, 0.9f}) {
    p.route.tau = tau;
    show("full fused kernel", tau, time_graph([&](int i) {
           return detail::launch_maybe_pdl(linear_topp_route_kernel<kWarps, T, true, false>, grid, block,
                                           stream, true, with_weights(i), LogitDType::kBFloat16);
         }));
    show("full fused kernel, counting (no buckets)", tau, time_graph([&](int i) {
           return detail::launch_maybe_pdl(linear_topp_route_kernel<kWarps, T, true, false, false>, grid,
                                           block, stream, true, with_weights(i), LogitDType::kBFloat16);
         }));
    show("rank only (1 block, logits in L2)", tau, time_graph([&](int) {
           return detail::launch_maybe_pdl(rank_only_kernel<>, dim3(1), block, stream, true, p.route,
                                           static_cast<const void*>(logits));
         }));
    show("rank only, counting (no buckets)", tau, time_graph([&](int) {
           return detail::launch_maybe_pdl(rank_only_kernel<kRankCountMax, false>, dim3(1), block, stream,
                                           true, p.route, static_cast<const void*>(logits));
         }));
  }
  // The rank's cut-over from counting to the bitonic sort: 256 (the default until session 15),
  // kRankCountMax, and counting up to every expert (the logits the last fused call left; tau 1
  // ranks all 448).
  for (float tau : {0.9f, 0.95f, 0.96f, 0.97f, 1.0f}) {
    p.route.tau = tau;
    show("rank only, bitonic above 256 candidates", tau, time_graph([&](int) {
           return detail::launch_maybe_pdl(rank_only_kernel<256>, dim3(1), block, stream, true, p.route,
                                           static_cast<const void*>(logits));
         }));
    show("rank only, default cut-over (kRankCountMax)", tau, time_graph([&](int) {
           return detail::launch_maybe_pdl(rank_only_kernel<>, dim3(1), block, stream, true, p.route,
                                           static_cast<const void*>(logits));
         }));
    show("rank only, counting up to 512", tau, time_graph([&](int) {
           return detail::launch_maybe_pdl(rank_only_kernel<kWarps * 32>, dim3(1), block, stream, true,
                                           p.route, static_cast<const void*>(logits));
         }));
  }
  // Phases of one rank at each tau, from the logits the last fused call left.
  int khz = 0;
  CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
  std::printf(
      "\n# rank phases (topp_route_rank_row, one block), SM cycles of thread 0; nominal clock %.2f GHz; "
      "median of 9 launches; phase 3 is the compaction (counting) or the bucket scatter\n\n| ranking | tau | "
      "softmax | threshold | compaction / scatter | rank | cumsum | outputs | total cycles | num_active "
      "|\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
      khz / 1e6);
  for (bool buckets : {true, false}) {
    for (float tau : {0.3f, 0.6f, 0.7f, 0.9f}) {
      p.route.tau = tau;
      std::vector<std::vector<long long>> runs;
      for (int r = 0; r < 9; ++r) {
        if (buckets) {
          rank_probe_kernel<true><<<1, block, 0, stream>>>(p.route, logits);
        } else {
          rank_probe_kernel<false><<<1, block, 0, stream>>>(p.route, logits);
        }
        CHECK(cudaStreamSynchronize(stream));
        std::vector<long long> m(8);
        CHECK(cudaMemcpyFromSymbol(m.data(), g_marks, sizeof(long long) * 7));
        runs.push_back(m);
      }
      std::printf("| %s | %.2f |", buckets ? "buckets" : "counting", tau);
      long long total = 0;
      for (int k = 1; k <= 6; ++k) {
        std::vector<long long> d;
        for (auto& m : runs) d.push_back(m[k] - m[k - 1]);
        std::sort(d.begin(), d.end());
        total += d[d.size() / 2];
        std::printf(" %lld |", d[d.size() / 2]);
      }
      int n = -1;
      CHECK(cudaMemcpy(&n, num_active, 4, cudaMemcpyDeviceToHost));
      std::printf(" %lld | %d |\n", total, n);
    }
  }
  CHECK(cudaDeviceSynchronize());
  return 0;
}
