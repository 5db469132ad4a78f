#!/usr/bin/env python
"""Where the CUDA expert_ffn kernels spend a batch-1 decode call (H200 diagnosis).

The fit over fractions (bench/results/expert_ffn_cuda_steps_h200.md) leaves ~9 us per call that is
not streaming. This script builds the two kernels of ``csrc/include/prunepath/expert_ffn_cuda.cuh``
with their ``trace`` pointer set (a small ``load_inline`` extension, bf16 only), runs 20 calls in
one CUDA graph over 4 weight copies (the steady state of bench/diag/expert_ffn_cuda_sweep.py), and
reports from the ``%globaltimer`` stamps, per call: the spread of block starts, when the routing
wait returned, when the neuron table, the first layer and h were done, when each block's last warp
ended (the tail), when the reduction kernel's blocks were released and ended, and the gap to the
next call. Per-SM end times go to ``expert_ffn_trace_blocks.txt`` (SM id, offset from the call's
first wait, us) to see whether the slow SMs are always the same ones.

    python3 bench/diag/expert_ffn_trace.py --out /tmp/out    # on the H200, ~1.5 minutes (build)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from common import capture, write_texts  # noqa: E402
from sparse_ffn_gpu import Weights, fixed_fraction_route  # noqa: E402
from torch.utils.cpp_extension import load_inline  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SLOTS = 6 + 8  # kFfnTraceSlots

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include "prunepath/expert_ffn_cuda.cuh"

void run(torch::Tensor x, torch::Tensor ids, torch::Tensor gates, torch::Tensor num, torch::Tensor w_in,
         torch::Tensor w_down, torch::Tensor y, torch::Tensor partial, torch::Tensor trace, int64_t P) {
  prunepath::ExpertFfnCudaParams p{};
  p.x = x.data_ptr();
  p.expert_ids = ids.data_ptr<int32_t>();
  p.gates = gates.data_ptr<float>();
  p.num_active = num.data_ptr<int32_t>();
  p.w_in = w_in.data_ptr();
  p.w_down = w_down.data_ptr();
  p.partial = partial.data_ptr<float>();
  p.y = y.data_ptr();
  p.hidden = x.size(1);
  p.tokens = static_cast<int32_t>(x.size(0));
  p.k = static_cast<int32_t>(ids.size(1));
  p.num_experts = static_cast<int32_t>(w_down.size(0));
  p.width = static_cast<int32_t>(w_down.size(1));
  p.blocks_per_token = static_cast<int32_t>(P);
  p.gated = true;
  p.act = prunepath::FfnActivation::kSilu;
  p.trace = reinterpret_cast<unsigned long long*>(trace.data_ptr<int64_t>());
  const cudaError_t err = prunepath::detail::launch_expert_ffn_typed<__nv_bfloat16>(
      p, true, true, 1, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, cudaGetErrorString(err));
}
"""


def build():
    return load_inline(
        name="expert_ffn_trace_ext",
        cpp_sources="void run(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, "
        "torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t);",
        cuda_sources=SOURCE,
        functions=["run"],
        extra_include_paths=[os.path.join(ROOT, "csrc", "include")],
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a"],
        verbose=False,
    )


def summarize(tr: torch.Tensor, P: int, red_blocks: int, nxt_wait: float | None) -> tuple[dict, list]:
    """Offsets in us from the call's earliest wait release."""
    k1 = tr[: P * SLOTS].view(P, SLOTS).tolist()
    k2 = tr[P * SLOTS : P * SLOTS + red_blocks * 4].view(red_blocks, 4).tolist()
    t0 = min(r[2] for r in k1)

    def us(v):
        return (v - t0) / 1e3

    def stats(vals):
        return min(vals), statistics.median(vals), max(vals)

    ends = [us(max(r[6:])) for r in k1]
    out = {
        "entry": stats([us(r[1]) for r in k1]),
        "waited": stats([us(r[2]) for r in k1]),
        "table": stats([us(r[3]) for r in k1]),
        "first": stats([us(r[4]) for r in k1]),
        "h": stats([us(r[5]) for r in k1]),
        "end": stats(ends),
        "warp_spread": statistics.median([(max(r[6:]) - min(r[6:])) / 1e3 for r in k1]),
        "r_entry": stats([us(r[0]) for r in k2]),
        "r_waited": stats([us(r[1]) for r in k2]),
        "r_end": stats([us(r[2]) for r in k2]),
    }
    if nxt_wait is not None:
        out["next_wait"] = us(nxt_wait)
    per_sm = [(int(r[0]), e) for r, e in zip(k1, ends, strict=True)]
    return out, per_sm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ext = build()
    ws = [Weights(4096, 14336, 32, torch.bfloat16, "cuda", seed) for seed in range(4)]
    d, E = 4096, ws[0].E
    x = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    P = max(sms, -(-E * 32 // 128))
    red_blocks = d // 32
    lines = [f"# expert_ffn CUDA kernel trace, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"P = {P} blocks, {args.calls} calls per graph over 4 weight copies", "",
             "offsets in us from the call's first wait release (min / median / max over blocks)", ""]  # fmt: skip
    dump = ["# fraction, call, SM, end offset us"]
    with torch.inference_mode():
        for frac in args.fractions:
            if frac > 0:
                route = fixed_fraction_route(1, E, frac, "cuda", 0)
            else:  # nothing selected: the fixed cost alone
                route = fixed_fraction_route(1, E, 0.1, "cuda", 0)
                route = (route[0], route[1], torch.zeros_like(route[2]))
            ids, gates, num = route
            partial = torch.empty(1, P, d, device="cuda")
            ys = [torch.empty(1, d, device="cuda", dtype=torch.bfloat16) for _ in range(args.calls)]
            traces = [torch.zeros(P * SLOTS + red_blocks * 4, dtype=torch.int64, device="cuda")
                      for _ in range(args.calls)]  # fmt: skip

            def calls(ids=ids, gates=gates, num=num, partial=partial, ys=ys, traces=traces):
                for i in range(args.calls):
                    p = ws[i % 4].packed
                    ext.run(x, ids, gates, num, p.w_in, p.w_down, ys[i], partial, traces[i], P)

            replay, _ = capture(calls)
            for _ in range(5):
                replay()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            replay()
            end.record()
            end.synchronize()
            per_call = start.elapsed_time(end) * 1e3 / args.calls
            lines.append(f"## fraction {frac:.0%}: {per_call:.2f} us per call (this replay)")
            lines.append("")
            lines.append("| call | entry | waited | table | first layer | h | block end | warp spread (median) | "
                         "reduce entry | reduce waited | reduce end | next call waited |")  # fmt: skip
            lines.append("|---:|---|---|---|---|---|---|---:|---|---|---|---:|")
            tr = [t.cpu() for t in traces]
            for i in range(2, args.calls - 1):
                nxt = min(tr[i + 1][: P * SLOTS].view(P, SLOTS)[:, 2].tolist())
                s, per_sm = summarize(tr[i], P, red_blocks, nxt)
                cell = lambda v: f"{v[0]:.2f} / {v[1]:.2f} / {v[2]:.2f}"  # noqa: E731
                lines.append(
                    f"| {i} | {cell(s['entry'])} | {cell(s['waited'])} | {cell(s['table'])} | {cell(s['first'])} | "
                    f"{cell(s['h'])} | {cell(s['end'])} | {s['warp_spread']:.2f} | {cell(s['r_entry'])} | "
                    f"{cell(s['r_waited'])} | {cell(s['r_end'])} | {s['next_wait']:.2f} |"
                )
                dump += [f"{frac} {i} {sm} {e:.3f}" for sm, e in per_sm]
            lines.append("")
    text = "\n".join(lines)
    print(text)
    write_texts(args.out, {"expert_ffn_trace.md": text, "expert_ffn_trace_blocks.txt": "\n".join(dump)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
