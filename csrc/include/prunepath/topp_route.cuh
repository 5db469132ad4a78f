// Top-p (cumulative-mass) expert routing on the GPU, SPEC.md section 3.
// Launcher: picks a kernel by (T, E), or the one named for A/B measurements.
// No host synchronisation, any T. Torch-free: raw pointers and a cudaStream_t.
//
// Kernels (all give the same selection; see each header):
//   warp   topp_route_warp.cuh   warp per token, candidate threshold + full-sort
//                                fallback in one kernel (E <= 1024)
//   lean   topp_route_lean.cuh   warp per token, one histogram pass, the full-sort
//                                fallback deferred to a second kernel (E <= 1024;
//                                E <= 64, scalar tau >= 1 and min_experts > 256 run
//                                the warp kernel, which sorts the whole row anyway)
//   lean_prefetch                lean plus an L2 prefetch of the row a warp a
//                                fraction of a resident wave later reads (for
//                                A/B runs: faster before the row loads were all
//                                issued at once, slower since)
//   rank   topp_route_rank.cuh   block per token, thread per expert, rank by
//                                counting: low latency for few tokens (E <= 1024)
//   block  topp_route_block.cuh  block per token, CUB radix sort (any E <= 4096;
//                                the only kernel for E > 1024)
#pragma once

#include <atomic>
#include <cstring>

#include "prunepath/topp_route_block.cuh"
#include "prunepath/topp_route_common.cuh"
#include "prunepath/topp_route_lean.cuh"
#include "prunepath/topp_route_rank.cuh"
#include "prunepath/topp_route_warp.cuh"

namespace prunepath {

enum class ToppKernel : int32_t { kAuto = 0, kWarp = 1, kBlock = 2, kLean = 3, kRank = 4, kLeanPrefetch = 5 };

// The names PRUNEPATH_TOPP_KERNEL takes (read once per process by the torch glue).
constexpr const char* kToppKernelNames = "auto, warp, block, lean, rank, lean_prefetch";

// The `auto` policy, in one place:
//  * E > kToppRouteWarpMaxExperts: block (the only kernel for wide rows);
//  * T < kToppRouteSmallTokens: rank. A warp per token leaves the GPU nearly
//    idle and serialises the whole row on 32 lanes; a block per token finishes
//    one token in a few barriers. Around 2 tokens per SM (132 SMs on an H200)
//    the warp kernels start to fill the machine; to be tuned from measurements;
//  * otherwise lean (throughput).
// A named variant that does not handle E falls back to auto's choice for it.
constexpr int64_t kToppRouteSmallTokens = 256;

// nullptr or "" means auto. Returns false for an unknown name.
inline bool parse_topp_kernel(const char* name, ToppKernel* out) {
  if (name == nullptr || name[0] == '\0' || std::strcmp(name, "auto") == 0) {
    *out = ToppKernel::kAuto;
  } else if (std::strcmp(name, "warp") == 0) {
    *out = ToppKernel::kWarp;
  } else if (std::strcmp(name, "block") == 0) {
    *out = ToppKernel::kBlock;
  } else if (std::strcmp(name, "lean") == 0) {
    *out = ToppKernel::kLean;
  } else if (std::strcmp(name, "rank") == 0) {
    *out = ToppKernel::kRank;
  } else if (std::strcmp(name, "lean_prefetch") == 0) {
    *out = ToppKernel::kLeanPrefetch;
  } else {
    return false;
  }
  return true;
}

// The kernel that runs for (T, E) when `requested` is asked for.
inline ToppKernel resolve_topp_kernel(ToppKernel requested, int64_t num_tokens, int32_t num_experts) {
  if (num_experts > kToppRouteWarpMaxExperts) return ToppKernel::kBlock;
  if (requested != ToppKernel::kAuto) return requested;
  return num_tokens < kToppRouteSmallTokens ? ToppKernel::kRank : ToppKernel::kLean;
}

namespace detail {

// Multiprocessor count of the current device, queried once per device.
inline int current_device_sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 132;
  int count = device >= 0 && device < kMaxDevices ? cache[device].load(std::memory_order_relaxed) : 0;
  if (count == 0) {
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0) {
      count = 132;
    }
    if (device >= 0 && device < kMaxDevices) cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

inline dim3 warp_grid(int64_t num_tokens) {
  return dim3(static_cast<unsigned>((num_tokens + kToppRouteWarpsPerBlock - 1) / kToppRouteWarpsPerBlock));
}

template <int IPL>
inline void launch_warp(const ToppRouteParams& p, const void* logits, LogitDType dtype, cudaStream_t stream) {
  topp_route_warp_kernel<IPL>
      <<<warp_grid(p.num_tokens), kToppRouteWarpsPerBlock * 32, 0, stream>>>(p, logits, dtype);
}

// `waves_ahead`: the L2 prefetch distance in resident waves (tuning runs only).
template <int IPL, bool L2_AHEAD>
inline void launch_lean(const ToppRouteParams& p, const void* logits, LogitDType dtype, cudaStream_t stream,
                        double waves_ahead = kLeanPrefetchWaves) {
  // The lean kernel's slot loops rely on E > 16 IPL (detail::lean_slot_present),
  // which dispatch_row_width's widths give; a narrower row takes the warp kernel.
  if (p.num_experts <= 16 * IPL) {
    launch_warp<IPL>(p, logits, dtype, stream);
    return;
  }
  int64_t ahead = 0;  // only the prefetching variant reads it
  if constexpr (L2_AHEAD) {
    const double wave = static_cast<double>(current_device_sm_count()) * lean_kernel_min_blocks(IPL) *
                        kToppRouteWarpsPerBlock;
    ahead = static_cast<int64_t>(waves_ahead * wave);
  }
  if (dtype == LogitDType::kFloat32) {
    topp_route_lean_kernel<IPL, false, L2_AHEAD>
        <<<warp_grid(p.num_tokens), kToppRouteWarpsPerBlock * 32, 0, stream>>>(p, logits, dtype, ahead);
  } else {
    topp_route_lean_kernel<IPL, true, L2_AHEAD>
        <<<warp_grid(p.num_tokens), kToppRouteWarpsPerBlock * 32, 0, stream>>>(p, logits, dtype, ahead);
  }
  // Enough resident blocks to take every token if all were deferred, no more:
  // when none is, the pass costs a launch and one read of num_active.
  constexpr int64_t kTokensPerBlock = kToppRouteWarpsPerBlock * 32;
  const int64_t wanted = (p.num_tokens + kTokensPerBlock - 1) / kTokensPerBlock;
  const int64_t resident = static_cast<int64_t>(current_device_sm_count()) * warp_kernel_min_blocks(IPL);
  const unsigned blocks = static_cast<unsigned>(wanted < resident ? wanted : resident);
  topp_route_deferred_kernel<IPL><<<blocks, kToppRouteWarpsPerBlock * 32, 0, stream>>>(p, logits, dtype);
}

// Items per lane (warp kernels) or warps per block (rank kernel) for E <= 1024:
// the smallest power of two with 32 * n >= E.
template <template <int> class Launch>
inline void dispatch_row_width(int32_t E, const ToppRouteParams& p, const void* logits, LogitDType dtype,
                               cudaStream_t stream) {
  if (E <= 32) {
    Launch<1>::run(p, logits, dtype, stream);
  } else if (E <= 64) {
    Launch<2>::run(p, logits, dtype, stream);
  } else if (E <= 128) {
    Launch<4>::run(p, logits, dtype, stream);
  } else if (E <= 256) {
    Launch<8>::run(p, logits, dtype, stream);
  } else if (E <= 512) {
    Launch<16>::run(p, logits, dtype, stream);
  } else {
    Launch<32>::run(p, logits, dtype, stream);
  }
}

template <int IPL>
struct WarpLaunch {
  static void run(const ToppRouteParams& p, const void* logits, LogitDType dtype, cudaStream_t stream) {
    launch_warp<IPL>(p, logits, dtype, stream);
  }
};

template <bool L2_AHEAD>
struct LeanLaunch {
  template <int IPL>
  struct Width {
    static void run(const ToppRouteParams& p, const void* logits, LogitDType dtype, cudaStream_t stream) {
      if constexpr (IPL >= 4) {
        launch_lean<IPL, L2_AHEAD>(p, logits, dtype, stream);
      } else {
        launch_warp<IPL>(p, logits, dtype, stream);
      }
    }
  };
};

template <int NWARPS>
struct RankLaunch {
  static void run(const ToppRouteParams& p, const void* logits, LogitDType dtype, cudaStream_t stream) {
    topp_route_rank_kernel<NWARPS>
        <<<static_cast<unsigned>(p.num_tokens), NWARPS * 32, 0, stream>>>(p, logits, dtype);
  }
};

inline void launch_block(const ToppRouteParams& p, const void* logits, LogitDType dtype,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.num_tokens));
  const int32_t E = p.num_experts;
  // Threads x items >= E; the radix-sort storage (16 counter lanes x (threads + 1)
  // x 4 bytes with 5-bit digits) plus the row fits the 48 KB of static shared memory.
  if (E <= 128) {
    topp_route_block_kernel<128, 1><<<grid, 128, 0, stream>>>(p, logits, dtype);
  } else if (E <= 256) {
    topp_route_block_kernel<256, 1><<<grid, 256, 0, stream>>>(p, logits, dtype);
  } else if (E <= 512) {
    topp_route_block_kernel<512, 1><<<grid, 512, 0, stream>>>(p, logits, dtype);
  } else if (E <= 1024) {
    topp_route_block_kernel<512, 2><<<grid, 512, 0, stream>>>(p, logits, dtype);
  } else if (E <= 2048) {
    topp_route_block_kernel<256, 8><<<grid, 256, 0, stream>>>(p, logits, dtype);
  } else {  // fewer radix bits: fits in 48 KB of static shared memory
    topp_route_block_kernel<512, 8, 4><<<grid, 512, 0, stream>>>(p, logits, dtype);
  }
}

}  // namespace detail

// Returns cudaErrorInvalidValue for E outside [1, kToppRouteCudaMaxExperts].
inline cudaError_t launch_topp_route(const ToppRouteParams& p, const void* logits, LogitDType dtype,
                                     cudaStream_t stream, ToppKernel requested = ToppKernel::kAuto) {
  if (p.num_tokens == 0) return cudaSuccess;
  const int32_t E = p.num_experts;
  if (E < 1 || E > kToppRouteCudaMaxExperts) return cudaErrorInvalidValue;
  switch (resolve_topp_kernel(requested, p.num_tokens, E)) {
    case ToppKernel::kBlock: detail::launch_block(p, logits, dtype, stream); break;
    case ToppKernel::kRank:
      detail::dispatch_row_width<detail::RankLaunch>(E, p, logits, dtype, stream);
      break;
    case ToppKernel::kLean:
    case ToppKernel::kLeanPrefetch: {
      // Every token would be deferred to the full sort: run the warp kernel, which
      // goes straight to it, in one pass.
      const bool all_full =
          (p.tau_per_token == nullptr && !(p.tau < 1.0f)) || p.min_experts > kToppRouteMaxCandidates;
      if (all_full) {
        detail::dispatch_row_width<detail::WarpLaunch>(E, p, logits, dtype, stream);
      } else if (requested == ToppKernel::kLeanPrefetch) {
        detail::dispatch_row_width<detail::LeanLaunch<true>::Width>(E, p, logits, dtype, stream);
      } else {
        detail::dispatch_row_width<detail::LeanLaunch<false>::Width>(E, p, logits, dtype, stream);
      }
      break;
    }
    default: detail::dispatch_row_width<detail::WarpLaunch>(E, p, logits, dtype, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace prunepath
