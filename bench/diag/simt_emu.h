// Minimal SIMT emulator that runs torch-free CUDA kernels on the CPU, for
// checking kernel logic on a machine without a GPU (see topp_route_emu.cpp).
// Every CUDA thread is a ucontext fiber in one OS thread; warp collectives
// (shuffles, ballots, __syncwarp) and __syncthreads are barriers between
// fibers. One block runs at a time, so __shared__ can be `static`. Covers the
// intrinsics the topp_route kernels use, with CUDA's semantics for full-warp
// masks; not CUB, not divergent-mask collectives, not memory-model corner
// cases. Include it before any CUDA header; compile with g++ -std=c++20
// -ffp-contract=off (so a * b + c is not fused where CUDA would not fuse it).
#pragma once
#define __shared__ static
#define __device__
#define __global__
#define __host__
#define __launch_bounds__(...)
#define __noinline__ __attribute__((noinline))
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

namespace emu {

struct U3 {
  unsigned x = 0, y = 0, z = 0;
};

struct Group {
  int size = 0, arrived = 0;
  unsigned long long gen = 0;
};

struct Thread {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  U3 tidx;
};

struct Warp {
  Group g;
  unsigned long long slot[32];
  int live = 32;
};

inline ucontext_t g_sched;
inline std::vector<Thread> g_threads;
inline std::vector<Warp> g_warps;
inline Group g_block;
inline int g_cur = 0;
inline U3 g_bidx, g_bdim, g_gdim;
inline std::function<void()> g_body;

inline Thread& cur() { return g_threads[g_cur]; }
inline void yield() { swapcontext(&g_threads[g_cur].ctx, &g_sched); }

inline void barrier(Group& grp) {
  const unsigned long long gen = grp.gen;
  if (++grp.arrived == grp.size) {
    grp.arrived = 0;
    grp.gen++;
  } else {
    while (grp.gen == gen) yield();
  }
}

inline void trampoline() {
  g_body();
  cur().done = true;
  // A thread that exits leaves its warp and block groups (CUDA: exited threads
  // do not take part in __syncthreads; the kernels only exit whole warps).
  Warp& w = g_warps[g_cur / 32];
  w.g.size--;
  if (w.g.arrived == w.g.size && w.g.size > 0 && w.g.arrived > 0) {
    w.g.arrived = 0;
    w.g.gen++;
  }
  g_block.size--;
  if (g_block.arrived == g_block.size && g_block.size > 0 && g_block.arrived > 0) {
    g_block.arrived = 0;
    g_block.gen++;
  }
  swapcontext(&g_threads[g_cur].ctx, &g_sched);
}

// Runs body() as every thread of grid x block, block after block.
inline void launch(unsigned grid, unsigned block, std::function<void()> body) {
  g_body = std::move(body);
  g_gdim = {grid, 1, 1};
  g_bdim = {block, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    g_bidx = {b, 0, 0};
    g_threads.assign(block, Thread{});
    g_warps.assign((block + 31) / 32, Warp{});
    for (auto& w : g_warps) w.g.size = 32;
    g_block = Group{};
    g_block.size = static_cast<int>(block);
    for (unsigned t = 0; t < block; ++t) {
      Thread& th = g_threads[t];
      th.tidx = {t, 0, 0};
      th.stack.resize(256 * 1024);
      getcontext(&th.ctx);
      th.ctx.uc_stack.ss_sp = th.stack.data();
      th.ctx.uc_stack.ss_size = th.stack.size();
      th.ctx.uc_link = &g_sched;
      makecontext(&th.ctx, trampoline, 0);
    }
    for (;;) {
      bool any = false;
      for (unsigned t = 0; t < block; ++t) {
        if (g_threads[t].done) continue;
        any = true;
        g_cur = static_cast<int>(t);
        swapcontext(&g_sched, &g_threads[t].ctx);
      }
      if (!any) break;
    }
  }
}

inline int lane() { return static_cast<int>(cur().tidx.x % 32); }
inline Warp& warp() { return g_warps[cur().tidx.x / 32]; }

template <typename T>
T exchange(T v, int src_lane) {
  Warp& w = warp();
  unsigned long long raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  w.slot[lane()] = raw;
  barrier(w.g);
  unsigned long long r = w.slot[src_lane];
  barrier(w.g);
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

}  // namespace emu

#define threadIdx (emu::cur().tidx)
#define blockIdx (emu::g_bidx)
#define blockDim (emu::g_bdim)
#define gridDim (emu::g_gdim)

inline void __syncwarp(unsigned = 0xffffffffu) { emu::barrier(emu::warp().g); }
// Cache hints change nothing on the host.
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
inline void __syncthreads() { emu::barrier(emu::g_block); }

template <typename T>
T __shfl_sync(unsigned, T v, int src) {
  return emu::exchange(v, src & 31);
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int m) {
  return emu::exchange(v, (emu::lane() ^ m) & 31);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned d) {
  const int l = emu::lane();
  return emu::exchange(v, l - static_cast<int>(d) >= 0 ? l - static_cast<int>(d) : l);
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned d) {
  const int l = emu::lane();
  return emu::exchange(v, l + static_cast<int>(d) <= 31 ? l + static_cast<int>(d) : l);
}
inline unsigned __ballot_sync(unsigned, int pred) {
  emu::Warp& w = emu::warp();
  w.slot[emu::lane()] = pred ? 1 : 0;
  emu::barrier(w.g);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= (w.slot[l] ? 1u : 0u) << l;
  emu::barrier(w.g);
  return bits;
}
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
namespace emu {
// The warp's 32 values folded with `pick` (the __reduce_*_sync collectives).
template <typename Pick>
unsigned reduce_sync(unsigned v, unsigned init, Pick pick) {
  Warp& w = warp();
  w.slot[lane()] = v;
  barrier(w.g);
  unsigned r = init;
  for (int l = 0; l < 32; ++l) r = pick(static_cast<unsigned>(w.slot[l]), r);
  barrier(w.g);
  return r;
}
}  // namespace emu
inline unsigned __reduce_min_sync(unsigned, unsigned v) {
  return emu::reduce_sync(v, 0xffffffffu, [](unsigned a, unsigned b) { return a < b ? a : b; });
}
inline unsigned __reduce_max_sync(unsigned, unsigned v) {
  return emu::reduce_sync(v, 0u, [](unsigned a, unsigned b) { return a > b ? a : b; });
}
// Fibers switch only at barriers, so a read-modify-write is atomic.
template <typename T>
T atomicAdd(T* a, T v) {
  const T old = *a;
  *a = old + v;
  return old;
}
template <typename T>
T atomicMin(T* a, T v) {
  const T old = *a;
  *a = v < old ? v : old;
  return old;
}
template <typename T>
T atomicMax(T* a, T v) {
  const T old = *a;
  *a = v > old ? v : old;
  return old;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(static_cast<int>(v)); }
inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline unsigned __float2uint_rz(float x) {
  if (!(x > 0.0f)) return 0u;
  if (x >= 4294967296.0f) return 0xffffffffu;
  return static_cast<unsigned>(x);
}
inline unsigned __float2uint_ru(float x) {
  if (!(x > 0.0f)) return 0u;
  if (x >= 4294967296.0f) return 0xffffffffu;
  const double c = std::ceil(static_cast<double>(x));
  return c >= 4294967296.0 ? 0xffffffffu : static_cast<unsigned>(c);
}
