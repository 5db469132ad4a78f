// Routed expert FFN on CUDA for a token at a time: the decode regime at batch 1,
// where the cost is reading the selected experts' weights once. Torch-free.
//
//   y[t] = sum_{j < num_active[t]} gates[t, j] * FFN_{expert_ids[t, j]}(x[t])  (+ b_out)
//
// Why neurons, not experts, are the unit of work: one program per selected
// expert (the Triton decode kernel) puts 134 programs of 786 KB each on 132 SMs
// at Llama-3-8B's 30 %; the block scheduler doubles some SMs up and the kernel
// ends ~4 us after its median program (bench/results/decode_expert_diag_h200.md).
// Here a token's n * S selected neurons are cut into P equal contiguous ranges
// (P = a fixed number of blocks per SM, at most kFfnMaxNeurons neurons each), so
// every block streams the same bytes whatever n is, and the launcher keeps at
// most that many blocks per SM (an unused shared-memory reservation), so the
// blocks cannot pile up on a few SMs.
//
// Measured (H200, bf16, one token at Llama-3-8B's shape, steady state,
// bench/results/expert_ffn_cuda_steps_h200.md): 17.8 / 33.7 / 49.5 us at
// 10 / 30 / 50 % of the experts against the Triton kernel's 25.3 / 33.8 / 48.7.
// Streaming runs at about the copy peak; what remains is ~9 us per call of
// fixed cost (setup, the phase switch, the reduction). Session 12: 17.1 / 33.3 /
// 49.2 / 91.6 us at 10 / 30 / 50 / 100 % against Triton's 24.7 / 34.0 / 48.7 /
// 91.6 (bench/results/sparse_ffn_cuda_llama3_8b.md), so sparse_ffn's backend
// "auto" takes this kernel for one token on the decode path.
//
// Kernel 1 (expert_ffn_partial_kernel, grid [P, T], one block of kFfnWarps
// warps per SM by default): per block,
//  1. the neurons' expert rows and gates (slot ids preloaded to shared memory
//     in the same round trip as num_active);
//  2. first layer: every warp owns one 1/kFfnWarps slice of d and walks all of
//     the block's gate/up rows, kFfnRowBatch rows per step, so every warp does
//     the same work; per-warp sums meet in shared memory in warp order;
//  3. h = gate * act(x Wg^T) * (x Wu^T) (or gate * act(x Wi^T + bi)), fp32;
//  4. down projection: every warp owns columns and sums its neurons' rows in
//     neuron order, then writes the block's fp32 partial [d] to a workspace.
// Steps 2 and 4 stream through one per-warp ring of kFfnStages steps in shared
// memory filled by cp.async (registers alone held too few bytes in flight: 62 %
// of DRAM bandwidth against 71 % with the ring), and the first down-projection
// steps are in flight while the last first-layer steps are summed.
// Kernel 2 (expert_ffn_reduce_kernel, PDL-launched, small blocks that fit beside
// kernel 1's): sums the P partials of a token in a fixed order, adds b_out,
// rounds once.
// Every sum has a fixed order: bitwise reproducible on a given GPU (P depends
// on its SM count). Slots j >= num_active[t] are never used as experts; a slot
// whose id lies outside [0, E) contributes nothing (the host cannot check ids
// without synchronising).
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "prunepath/decode_common.cuh"
#include "prunepath/ffn_activation.h"

namespace prunepath {

struct ExpertFfnCudaParams {
  const void* x;              // [T, d] contiguous
  const int32_t* expert_ids;  // [T, K]
  const float* gates;         // [T, K]
  const int32_t* num_active;  // [T]
  const void* w_in;           // [E, 2S (gated: gate rows, then up rows) or S, d]
  const void* b_in;           // [E, S] or nullptr (plain FFN only)
  const void* w_down;         // [E, S, d]
  const void* b_out;          // [d] or nullptr
  float* partial;             // [T, P, d] fp32 workspace
  void* y;                    // [T, d] out, dtype of x
  int64_t hidden;             // d
  int32_t tokens;             // T
  int32_t k;                  // K
  int32_t num_experts;        // E
  int32_t width;              // S
  int32_t blocks_per_token;   // P
  bool gated;
  FfnActivation act;
  // Diagnostics only (bench/diag/expert_ffn_trace.py), nullptr otherwise: per block of kernel 1,
  // kFfnTraceSlots %globaltimer stamps (see ExpertFfnTrace), then 4 per block of kernel 2 (entry, after the
  // wait, end, %smid).
  unsigned long long* trace;
};

constexpr int kFfnWarps = 8;         // per block of kernel 1
constexpr int kFfnMaxNeurons = 128;  // per block (the launcher sizes P for it)
constexpr int kFfnRowBatch = 8;      // first-layer rows in flight per warp
constexpr int kFfnRowVecs = 2;       // first-layer vectors per lane and row in flight
constexpr int kFfnDownBatch = 8;     // down-projection rows in flight per warp
constexpr int kFfnColVecs = 2;       // down-projection column vectors per lane
constexpr int kFfnSlotCache = 1024;  // slots preloaded to shared memory (K above: read in place)
constexpr int kFfnSlotLoads = kFfnSlotCache / (kFfnWarps * 32);  // per thread, all in flight at once
static_assert(kFfnSlotLoads * kFfnWarps * 32 == kFfnSlotCache, "every cached slot has a loading thread");
constexpr int kFfnStages = 3;                              // steps of the per-warp shared-memory ring
constexpr int kFfnStepUnits = kFfnRowBatch * kFfnRowVecs;  // units per lane and step (down: the same)
static_assert(kFfnDownBatch * kFfnColVecs == kFfnStepUnits, "the two phases share the ring");
constexpr int kFfnReduceGroups = 32;  // partial groups per block of kernel 2
constexpr int kFfnReduceCols = 8;     // column units per block of kernel 2  // per block of kernel 2
constexpr int kFfnDefaultBlocksPerSm = 1;

// Slots of ExpertFfnCudaParams::trace per block of kernel 1 (index (t * P + block) * kFfnTraceSlots),
// followed by 4 per block of kernel 2 (index T * P * kFfnTraceSlots + (t * gridDim.x + block) * 4).
enum ExpertFfnTrace : int {
  kTraceSm = 0,         // %smid
  kTraceEntry = 1,      // kernel entry
  kTraceWaited = 2,     // after griddepcontrol.wait
  kTraceTable = 3,      // neuron table built
  kTraceFirstDone = 4,  // every warp's first-layer sums in shared memory
  kTraceHDone = 5,      // h formed
  kTraceWarpEnd = 6,    // + warp: that warp's last partial stored
  kFfnTraceSlots = kTraceWarpEnd + kFfnWarps,
};

namespace detail {

__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned sm_id() {
  unsigned id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}

// A unit of streaming: a 16-byte vector of kElems elements (kVec), or one element.
template <typename T, bool kVec>
struct FfnUnit;

template <typename T>
struct FfnUnit<T, true> {
  using Unit = uint4;
  static constexpr int kElems = VecTraits<T>::kElems;
  __device__ static Unit zero() { return make_uint4(0u, 0u, 0u, 0u); }
  // *dst = unit u of `row` when `valid`, zeros otherwise (u is not read then),
  // asynchronously: cp.async, complete after cp_async_wait.
  __device__ static void copy_async(Unit* dst, const T* row, int64_t u, bool valid) {
    cp_async_16_or_zero_policy(dst, reinterpret_cast<const uint4*>(row) + u, valid, l2_evict_first_policy());
  }
  // Unit u of `row` through L1 when `valid`, zeros otherwise.
  __device__ static Unit cached(const T* row, int64_t u, bool valid) {
    return load_cached_v4_or_zero(reinterpret_cast<const uint4*>(row) + u, valid);
  }
  __device__ static float dot(const Unit& w, const Unit& x, float acc) {
    return VecTraits<T>::dot(w, x, acc);
  }
  // acc[i] += h * w[i], element by element.
  __device__ static void axpy(const Unit& w, float h, float (&acc)[kElems]) {
    if constexpr (sizeof(T) == 4) {
      const float4 f = reinterpret_cast<const float4&>(w);
      acc[0] = fmaf(h, f.x, acc[0]);
      acc[1] = fmaf(h, f.y, acc[1]);
      acc[2] = fmaf(h, f.z, acc[2]);
      acc[3] = fmaf(h, f.w, acc[3]);
    } else {
      using T2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
      const T2* v = reinterpret_cast<const T2*>(&w);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = to_float2(v[i]);
        acc[2 * i] = fmaf(h, f.x, acc[2 * i]);
        acc[2 * i + 1] = fmaf(h, f.y, acc[2 * i + 1]);
      }
    }
  }
};

template <typename T>
struct FfnUnit<T, false> {
  using Unit = T;
  static constexpr int kElems = 1;
  __device__ static Unit zero() { return VecTraits<T>::round(0.0f); }
  // No cp.async for a single element: a load and a shared-memory store.
  __device__ static void copy_async(Unit* dst, const T* row, int64_t u, bool valid) {
    *dst = cached(row, u, valid);
  }
  __device__ static Unit cached(const T* row, int64_t u, bool valid) {
    return valid ? __ldg(row + u) : zero();
  }
  __device__ static float dot(const Unit& w, const Unit& x, float acc) {
    return fmaf(to_float(w), to_float(x), acc);
  }
  __device__ static void axpy(const Unit& w, float h, float (&acc)[1]) {
    acc[0] = fmaf(h, to_float(w), acc[0]);
  }
};

__device__ __forceinline__ void store_partial(float* dst, const float (&v)[1]) { *dst = v[0]; }
__device__ __forceinline__ void store_partial(float* dst, const float (&v)[4]) {
  *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store_partial(float* dst, const float (&v)[8]) {
  reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

}  // namespace detail

// Kernel 1. `kVec`: d is a multiple of the 16-byte vector and x, w_in, w_down
// are 16-byte aligned (else one element per lane and step).
template <typename T, bool kVec>
__global__ void __launch_bounds__(kFfnWarps * 32, 1) expert_ffn_partial_kernel(const ExpertFfnCudaParams p) {
  using U = detail::FfnUnit<T, kVec>;
  using Unit = typename U::Unit;
  constexpr int kElems = U::kElems;
  __shared__ int32_t s_ids[kFfnSlotCache];
  __shared__ float s_slot_gates[kFfnSlotCache];
  __shared__ int64_t s_in_row[kFfnMaxNeurons];  // element offset of the neuron's gate (or only) row; -1: none
  __shared__ int64_t s_down_row[kFfnMaxNeurons];  // element offset of its down row; -1: none
  __shared__ float s_gate[kFfnMaxNeurons];
  __shared__ float s_bias[kFfnMaxNeurons];
  __shared__ float s_sum[2 * kFfnMaxNeurons][kFfnWarps];
  __shared__ float s_h[kFfnMaxNeurons];

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t t = blockIdx.y;
  const int64_t P = p.blocks_per_token;
  const int64_t pb = blockIdx.x;
  const int32_t K = p.k;
  const int32_t S = p.width;
  const int64_t d = p.hidden;
  const int32_t* ids = p.expert_ids + t * K;
  const float* slot_gates = p.gates + t * K;
  unsigned long long* trace = p.trace != nullptr ? p.trace + (t * P + pb) * kFfnTraceSlots : nullptr;
  const auto stamp = [&](int slot) {
    if (trace != nullptr && threadIdx.x == 0) trace[slot] = detail::global_timer_ns();
  };
  stamp(kTraceEntry);

  // Everything below reads the routing or x, the previous kernels' outputs. The
  // reduction may be scheduled now: its blocks wait for this grid to finish.
  detail::grid_dependency_wait();
  detail::grid_launch_dependents();
  stamp(kTraceWaited);
  if (trace != nullptr && threadIdx.x == 0) trace[kTraceSm] = detail::sm_id();
  // The token's routing in one round trip: num_active and up to kFfnSlotLoads slots per thread are
  // all loaded before any is used (a plain strided loop waits for each load before the next: two
  // round trips at K = 448, each a DRAM miss when the weights streamed since evicted the routing).
  const bool cached_slots = K <= kFfnSlotCache;
  int32_t n = p.num_active[t];
  if (cached_slots) {
    int32_t slot_id[kFfnSlotLoads];
    float slot_gate[kFfnSlotLoads];
#pragma unroll
    for (int i = 0; i < kFfnSlotLoads; ++i) {
      const int s = static_cast<int>(threadIdx.x) + i * kFfnWarps * 32;
      slot_id[i] = s < K ? ids[s] : -1;
      slot_gate[i] = s < K ? slot_gates[s] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kFfnSlotLoads; ++i) {
      const int s = static_cast<int>(threadIdx.x) + i * kFfnWarps * 32;
      if (s < K) {
        s_ids[s] = slot_id[i];
        s_slot_gates[s] = slot_gate[i];
      }
    }
  }
  n = n < 0 ? 0 : (n > K ? K : n);
  __syncthreads();

  // This block's neurons: [lo, hi) of the token's n * S selected neurons, in slot order
  // (n * S <= K * S < 2^31: the launcher checks it, so 32-bit division).
  const int32_t total = n * S;
  const int32_t lo = static_cast<int32_t>(static_cast<int64_t>(total) * pb / P);
  const int nk = static_cast<int>(static_cast<int64_t>(total) * (pb + 1) / P - lo);  // <= kFfnMaxNeurons
  const int64_t rows_in = p.gated ? 2 * static_cast<int64_t>(S) : S;
  if (static_cast<int>(threadIdx.x) < nk) {
    const int32_t g = lo + static_cast<int32_t>(threadIdx.x);
    const int32_t j = g / S;
    const int32_t jj = g - j * S;
    const int32_t e = cached_slots ? s_ids[j] : ids[j];
    const bool ok = e >= 0 && e < p.num_experts;
    s_in_row[threadIdx.x] = ok ? (e * rows_in + jj) * d : -1;
    s_down_row[threadIdx.x] = ok ? (static_cast<int64_t>(e) * S + jj) * d : -1;
    s_gate[threadIdx.x] = cached_slots ? s_slot_gates[j] : slot_gates[j];
    s_bias[threadIdx.x] =
        ok && p.b_in != nullptr
            ? detail::to_float(static_cast<const T*>(p.b_in)[static_cast<int64_t>(e) * S + jj])
            : 0.f;
  }
  __syncthreads();
  stamp(kTraceTable);

  // First layer. Row r of the block is neuron r / 2's gate (even r) or up row
  // (odd r) when gated, neuron r's row otherwise; warp `warp` owns units [u0, u1).
  // Steps (a batch of rows, one pass over the warp's units) stream through a
  // per-warp ring of kFfnStages steps in shared memory (cp.async): kFfnStages - 1
  // steps are in flight while one is summed. Each lane reads back only the units
  // it copied itself, so the ring needs no barrier.
  extern __shared__ __align__(16) unsigned char s_ring_bytes[];
  Unit* ring = reinterpret_cast<Unit*>(s_ring_bytes) + warp * kFfnStages * kFfnStepUnits * 32 + lane;
  const auto slot = [&](int step, int j) -> Unit* {
    return ring + ((step % kFfnStages) * kFfnStepUnits + j) * 32;
  };
  const T* w_in = static_cast<const T*>(p.w_in);
  const T* x = static_cast<const T*>(p.x) + t * d;
  const int64_t units = kVec ? d / kElems : d;
  const int64_t u0 = units * warp / kFfnWarps;
  const int64_t u1 = units * (warp + 1) / kFfnWarps;
  const int rows = p.gated ? 2 * nk : nk;
  constexpr int64_t kPass = 32 * kFfnRowVecs;
  const int passes = static_cast<int>((u1 - u0 + kPass - 1) / kPass);
  const int steps = passes * ((rows + kFfnRowBatch - 1) / kFfnRowBatch);
  const auto issue_in = [&](int step) {
    if (step < steps) {
      const int r0 = step / passes * kFfnRowBatch;
      const int64_t u = u0 + static_cast<int64_t>(step % passes) * kPass;
#pragma unroll
      for (int b = 0; b < kFfnRowBatch; ++b) {
        const int r = r0 + b;
        const int64_t base = r < rows ? s_in_row[p.gated ? r / 2 : r] : -1;
        const T* row = w_in + (base >= 0 ? base + (p.gated && (r & 1) ? S * d : 0) : 0);
#pragma unroll
        for (int i = 0; i < kFfnRowVecs; ++i) {
          const int64_t v = u + 32 * i + lane;
          U::copy_async(slot(step, i * kFfnRowBatch + b), row, v, base >= 0 && v < u1);
        }
      }
    }
  };
  float acc_in[kFfnRowBatch] = {};
  if (passes == 0) {  // this warp owns no units (d < kFfnWarps): its share of every row is 0
    for (int r = lane; r < rows; r += 32) s_sum[r][warp] = 0.f;
  }
  // Down projection: warp `warp` owns column units c0 + (i * kFfnWarps + warp) * 32 + lane and sums
  // its neurons' rows in neuron order. Steps (column pass, neuron batch) stream through the same
  // ring after the first layer's.
  const T* w_down = static_cast<const T*>(p.w_down);
  float* dst = p.partial + (t * P + pb) * d;
  constexpr int64_t kColPass = kFfnWarps * 32 * kFfnColVecs;
  const int col_passes = static_cast<int>((units + kColPass - 1) / kColPass);
  const int batches = (nk + kFfnDownBatch - 1) / kFfnDownBatch;
  const int per_pass = batches > 0 ? batches : 1;  // one (empty) batch still stores the zeros
  const int down_steps = col_passes * per_pass;
  const auto column = [&](int step, int i) {
    return static_cast<int64_t>(step / per_pass) * kColPass +
           (static_cast<int64_t>(i) * kFfnWarps + warp) * 32 + lane;
  };
  const auto issue_down = [&](int step) {
    if (step < down_steps) {
      const int k0 = step % per_pass * kFfnDownBatch;
#pragma unroll
      for (int b = 0; b < kFfnDownBatch; ++b) {
        const int k = k0 + b;
        const int64_t base = k < nk ? s_down_row[k] : -1;
        const T* row = w_down + (base >= 0 ? base : 0);
#pragma unroll
        for (int i = 0; i < kFfnColVecs; ++i) {
          const int64_t c = column(step, i);
          U::copy_async(slot(steps + step, b * kFfnColVecs + i), row, c, base >= 0 && c < units);
        }
      }
    }
  };
  // Ring steps [0, steps) are the first layer's, [steps, steps + down_steps) the down
  // projection's, so the first down steps are in flight while the last first-layer
  // steps are summed and h is formed. An empty group past the end keeps the count.
  const auto issue = [&](int ring_step) {
    if (ring_step < steps) {
      issue_in(ring_step);
    } else {
      issue_down(ring_step - steps);
    }
    detail::cp_async_commit();
  };
  for (int s0 = 0; s0 < kFfnStages - 1; ++s0) issue(s0);
  for (int step = 0; step < steps; ++step) {
    issue(step + kFfnStages - 1);  // into the stage summed at the previous step
    detail::cp_async_wait<kFfnStages - 1>();
    const int64_t u = u0 + static_cast<int64_t>(step % passes) * kPass;
#pragma unroll
    for (int i = 0; i < kFfnRowVecs; ++i) {
      const int64_t v = u + 32 * i + lane;
      const Unit xv = U::cached(x, v, v < u1);
#pragma unroll
      for (int b = 0; b < kFfnRowBatch; ++b)
        acc_in[b] = U::dot(*slot(step, i * kFfnRowBatch + b), xv, acc_in[b]);
    }
    if (step % passes == passes - 1) {  // the batch's last pass: its rows' sums are complete
      const int r0 = step / passes * kFfnRowBatch;
#pragma unroll
      for (int b = 0; b < kFfnRowBatch; ++b) {
        const float sum = detail::warp_sum_f32(acc_in[b]);
        if (lane == 0 && r0 + b < rows) s_sum[r0 + b][warp] = sum;
        acc_in[b] = 0.f;
      }
    }
  }

  // The next down-projection step goes into the stage the last first-layer step freed now, not after
  // the two barriers and h: the warps that finish their first layer early would otherwise keep only
  // kFfnStages - 2 steps in flight while they wait (the trace shows ~1.5 us from the median warp's
  // last first-layer step to h). The down loop below then issues from its second step on. Measured
  // (session 12, same shape as above): 17.1 / 33.3 / 49.2 / 91.6 us against 17.6 / 33.3 / 49.4 / 91.1
  // before, within run-to-run noise: the in-flight steps already covered the switch.
  issue(steps + kFfnStages - 1);
  __syncthreads();  // every warp's first-layer sums are in s_sum
  stamp(kTraceFirstDone);

  if (static_cast<int>(threadIdx.x) < nk) {
    const int k = threadIdx.x;
    float h = 0.f;
    if (s_in_row[k] >= 0) {
      float z = 0.f;
      float up = 0.f;
      const int rz = p.gated ? 2 * k : k;
#pragma unroll
      for (int w = 0; w < kFfnWarps; ++w) z += s_sum[rz][w];
      if (p.gated) {
#pragma unroll
        for (int w = 0; w < kFfnWarps; ++w) up += s_sum[rz + 1][w];
        h = ffn_activation(z, p.act) * up;
      } else {
        h = ffn_activation(z + s_bias[k], p.act);
      }
      h *= s_gate[k];
    }
    s_h[k] = h;
  }
  __syncthreads();
  stamp(kTraceHDone);

  float acc_down[kFfnColVecs][kElems] = {};
  for (int step = 0; step < down_steps; ++step) {
    if (step > 0) issue(steps + step + kFfnStages - 1);  // step 0's was issued before the barriers
    detail::cp_async_wait<kFfnStages - 1>();
    const int k0 = step % per_pass * kFfnDownBatch;
#pragma unroll
    for (int b = 0; b < kFfnDownBatch; ++b) {
      const int k = k0 + b;
      const float h = k < nk && s_down_row[k] >= 0 ? s_h[k] : 0.f;
#pragma unroll
      for (int i = 0; i < kFfnColVecs; ++i) U::axpy(*slot(steps + step, b * kFfnColVecs + i), h, acc_down[i]);
    }
    if (step % per_pass == per_pass - 1) {  // the pass's last batch: store its columns
#pragma unroll
      for (int i = 0; i < kFfnColVecs; ++i) {
        const int64_t c = column(step, i);
        if (c < units) detail::store_partial(dst + c * kElems, acc_down[i]);
#pragma unroll
        for (int e = 0; e < kElems; ++e) acc_down[i][e] = 0.f;
      }
    }
  }
  detail::cp_async_wait<0>();
  if (trace != nullptr && lane == 0) trace[kTraceWarpEnd + warp] = detail::global_timer_ns();
}

// Kernel 2: y[t, c] = round(sum_p partial[t, p, c] + b_out[c]). A block owns
// kFfnReduceCols column units (4 columns each when kVec4) and 32 groups of
// partials: thread (group g, unit u) sums partials g, g + 32, ... of its unit,
// then one thread per column adds the 32 group sums in order. Many small blocks
// (d / 32 for 4-column units) with 4 KB of shared memory: they fit beside kernel
// 1's blocks, so with PDL they are resident and waiting when it ends.
template <typename T, bool kVec4>
__global__ void __launch_bounds__(kFfnReduceGroups* kFfnReduceCols)
    expert_ffn_reduce_kernel(const ExpertFfnCudaParams p) {
  constexpr int kC = kVec4 ? 4 : 1;
  __shared__ float s_part[kFfnReduceGroups][kFfnReduceCols * kC];
  const int unit = static_cast<int>(threadIdx.x) % kFfnReduceCols;
  const int group = static_cast<int>(threadIdx.x) / kFfnReduceCols;
  const int64_t t = blockIdx.y;
  const int64_t d = p.hidden;
  const int64_t P = p.blocks_per_token;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kFfnReduceCols * kC;
  const int64_t c = c0 + static_cast<int64_t>(unit) * kC;

  unsigned long long* trace =
      p.trace != nullptr
          ? p.trace + (static_cast<int64_t>(p.tokens) * P * kFfnTraceSlots + (t * gridDim.x + blockIdx.x) * 4)
          : nullptr;
  if (trace != nullptr && threadIdx.x == 0) trace[0] = detail::global_timer_ns();
  detail::grid_dependency_wait();  // the partials are kernel 1's output
  detail::grid_launch_dependents();
  if (trace != nullptr && threadIdx.x == 0) {
    trace[1] = detail::global_timer_ns();
    trace[3] = detail::sm_id();
  }
  float acc[kC] = {};
  if (c < d) {
    const float* src = p.partial + t * P * d + c;
    // kBatch partials per round, loaded before any is added: one round trip per round.
    constexpr int kBatch = 8;
    for (int64_t q0 = group; q0 < P; q0 += static_cast<int64_t>(kFfnReduceGroups) * kBatch) {
      float v[kBatch][kC];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int64_t q = q0 + static_cast<int64_t>(i) * kFfnReduceGroups;
        if constexpr (kVec4) {
          const float4 f =
              q < P ? __ldcg(reinterpret_cast<const float4*>(src + q * d)) : make_float4(0.f, 0.f, 0.f, 0.f);
          v[i][0] = f.x;
          v[i][1] = f.y;
          v[i][2] = f.z;
          v[i][3] = f.w;
        } else {
          v[i][0] = q < P ? __ldcg(src + q * d) : 0.f;
        }
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
#pragma unroll
        for (int e = 0; e < kC; ++e) acc[e] += v[i][e];
      }
    }
  }
#pragma unroll
  for (int e = 0; e < kC; ++e) s_part[group][unit * kC + e] = acc[e];
  __syncthreads();
  const int col = static_cast<int>(threadIdx.x);
  if (col < kFfnReduceCols * kC && c0 + col < d) {
    float sum = 0.f;
#pragma unroll 8
    for (int g = 0; g < kFfnReduceGroups; ++g) sum += s_part[g][col];
    if (p.b_out != nullptr) sum += detail::to_float(static_cast<const T*>(p.b_out)[c0 + col]);
    static_cast<T*>(p.y)[t * d + c0 + col] = detail::VecTraits<T>::round(sum);
  }
  if (trace != nullptr && threadIdx.x == 0) trace[2] = detail::global_timer_ns();
}

namespace detail {

// Dynamic shared memory of `kernel`: at least `at_least` bytes, and enough that
// (max_blocks + 1) blocks do not fit on an SM when max_blocks > 0.
template <typename Kernel>
cudaError_t smem_to_cap_blocks_uncached(Kernel kernel, int dev, int max_blocks, int at_least, int* bytes) {
  *bytes = at_least;
  int per_sm = 0, reserved = 0, optin = 0;
  cudaError_t err = cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  cudaFuncAttributes attr{};
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  const int want =
      max_blocks > 0 ? per_sm / (max_blocks + 1) + 1 - static_cast<int>(attr.sharedSizeBytes) - reserved : 0;
  const int limit = optin - static_cast<int>(attr.sharedSizeBytes);
  *bytes = want > at_least ? (want > limit ? limit : want) : at_least;
  if (*bytes > 48 * 1024)
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, *bytes);
  return err;
}

// The same, remembered per (kernel, device, max_blocks, at_least): the five
// attribute queries and the attribute write cost host time on every call of the
// one-token decode path, and their answers never change within a process.
template <typename Kernel>
cudaError_t smem_to_cap_blocks(Kernel kernel, int max_blocks, int at_least, int* bytes) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  using Key = std::tuple<const void*, int, int, int>;
  static std::mutex mutex;
  static std::map<Key, int> known;
  const Key key{reinterpret_cast<const void*>(kernel), dev, max_blocks, at_least};
  std::lock_guard<std::mutex> lock(mutex);
  const auto it = known.find(key);
  if (it != known.end()) {
    *bytes = it->second;
    return cudaSuccess;
  }
  err = smem_to_cap_blocks_uncached(kernel, dev, max_blocks, at_least, bytes);
  if (err == cudaSuccess) known.emplace(key, *bytes);
  return err;
}

template <typename T>
cudaError_t launch_expert_ffn_typed(const ExpertFfnCudaParams& p, bool vec, bool pdl, int max_blocks_per_sm,
                                    cudaStream_t stream) {
  const dim3 grid1(static_cast<unsigned>(p.blocks_per_token), static_cast<unsigned>(p.tokens));
  const dim3 block1(kFfnWarps * 32);
  auto* k1 = vec ? expert_ffn_partial_kernel<T, true> : expert_ffn_partial_kernel<T, false>;
  const int ring = kFfnWarps * kFfnStages * kFfnStepUnits * 32 * static_cast<int>(vec ? 16 : sizeof(T));
  int smem = 0;
  cudaError_t err = smem_to_cap_blocks(k1, max_blocks_per_sm, ring, &smem);
  if (err == cudaSuccess)
    err = launch_maybe_pdl_smem(k1, grid1, block1, static_cast<size_t>(smem), stream, pdl, p);
  if (err != cudaSuccess) return err;
  const bool vec4 = p.hidden % 4 == 0;
  const int64_t cols_per_block = kFfnReduceCols * (vec4 ? 4 : 1);
  const dim3 grid2(static_cast<unsigned>((p.hidden + cols_per_block - 1) / cols_per_block),
                   static_cast<unsigned>(p.tokens));
  const dim3 block2(kFfnReduceGroups * kFfnReduceCols);
  return vec4 ? launch_maybe_pdl(expert_ffn_reduce_kernel<T, true>, grid2, block2, stream, pdl, p)
              : launch_maybe_pdl(expert_ffn_reduce_kernel<T, false>, grid2, block2, stream, pdl, p);
}

}  // namespace detail

// Blocks per token for `blocks` blocks in all: at most kFfnMaxNeurons neurons per block.
inline int32_t expert_ffn_blocks_per_token(int64_t tokens, int64_t k, int64_t width, int64_t blocks) {
  const int64_t per_token = tokens > 0 ? (blocks + tokens - 1) / tokens : 1;
  const int64_t needed = (k * width + kFfnMaxNeurons - 1) / kFfnMaxNeurons;
  const int64_t P = per_token > needed ? per_token : needed;
  return static_cast<int32_t>(P < 1 ? 1 : P);
}

// Runs both kernels on `stream` for p.tokens <= 65535 tokens. p.partial holds
// T * P * d floats. `vec`: d is a multiple of 16 bytes of elements and x, w_in,
// w_down are 16-byte aligned. `max_blocks_per_sm` > 0 caps the blocks of
// kernel 1 per SM (through unused shared memory) so that P = that many blocks
// per SM spread evenly; 0 leaves the placement to the hardware.
inline cudaError_t launch_expert_ffn_cuda(const ExpertFfnCudaParams& p, DecodeDType dtype, bool vec, bool pdl,
                                          int max_blocks_per_sm, cudaStream_t stream) {
  if (p.tokens <= 0 || p.hidden <= 0) return cudaSuccess;
  if (p.tokens > 65535 || p.blocks_per_token <= 0 || p.width <= 0) return cudaErrorInvalidValue;
  if (static_cast<int64_t>(p.k) * p.width > INT32_MAX) return cudaErrorInvalidValue;  // 32-bit neuron indices
  switch (dtype) {
    case DecodeDType::kFloat16:
      return detail::launch_expert_ffn_typed<__half>(p, vec, pdl, max_blocks_per_sm, stream);
    case DecodeDType::kBFloat16:
      return detail::launch_expert_ffn_typed<__nv_bfloat16>(p, vec, pdl, max_blocks_per_sm, stream);
    default: return detail::launch_expert_ffn_typed<float>(p, vec, pdl, max_blocks_per_sm, stream);
  }
}

}  // namespace prunepath
