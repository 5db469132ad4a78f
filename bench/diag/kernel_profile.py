#!/usr/bin/env python
"""Per-kernel device time of the decode FFN, the decode attention and the prefill FFN (H200 diagnosis).

What the roofline tables cannot say: how a call's time splits between its kernels and the gaps
between them. Each case runs under ``torch.profiler`` (CUDA activity only); a kernel's time is the
sum of its durations over the profiled calls divided by the number of calls, and "gaps" is the
wall time per call (CUDA events around the same replays) minus the sum of all kernels.

- decode FFN (Llama-3-8B shape, bf16, T = 1, 10/30/50/100 % active): 20 calls in one CUDA graph
  cycling over 4 weight copies (the "steady" timing of bench/sparse_ffn_gpu.py), PDL off and on;
- decode attention (B = 1, 16k context, Hq 32 / Hkv 8, D 128): 20 calls over cache copies, PDL off and on;
- prefill FFN (T = 4096, 30 %): one eager call (alignment, zero fill, up kernel, cuBLAS down).

    python3 bench/diag/kernel_profile.py --out /tmp/out    # on the H200, ~1 minute
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from common import capture  # noqa: E402
from sparse_ffn_gpu import Weights, fixed_fraction_route  # noqa: E402

from prunepath_ops.attention.triton_attention import kv_decode_attention_triton  # noqa: E402
from prunepath_ops.ffn.triton_ffn import sparse_ffn_decode_triton, sparse_ffn_prefill_triton  # noqa: E402


def profile(fn, calls_per_fn: int, reps: int = 5) -> dict[str, float]:
    """``{kernel name: us per call}`` plus ``"wall"`` and ``"gaps"``, over ``reps`` runs of ``fn``."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end) * 1e3 / (reps * calls_per_fn)
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per = collections.defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name[:60]] += ev.device_time / (reps * calls_per_fn)
    out = dict(sorted(per.items(), key=lambda kv: -kv[1]))
    out["wall"] = wall
    out["gaps"] = wall - sum(per.values())
    return out


def table(title: str, results: dict[str, dict[str, float]]) -> list[str]:
    names = []
    for r in results.values():
        names += [n for n in r if n not in names and n not in ("wall", "gaps")]
    cols = list(results)
    lines = [f"### {title}", "", "| kernel | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for n in [*names, "gaps", "wall"]:
        lines.append(f"| {n} | " + " | ".join(f"{results[c].get(n, 0.0):.2f}" for c in cols) + " |")
    return [*lines, ""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    lines = [f"# Per-kernel device time, {torch.cuda.get_device_name()}", "",
             f"torch {torch.__version__}; us per call; command: `python3 bench/diag/kernel_profile.py`", ""]  # fmt: skip
    n = 20
    with torch.inference_mode():
        w = Weights(4096, 14336, 32, torch.bfloat16, dev, seed=0)
        p = w.packed
        packs = [p] + [dataclasses.replace(p, w_in=p.w_in.clone(), w_down=p.w_down.clone()) for _ in range(3)]
        x = torch.randn(1, 4096, device=dev).to(torch.bfloat16)
        res = {}
        for frac in (0.1, 0.3, 0.5, 1.0):
            route = fixed_fraction_route(1, w.E, frac, dev, 0)
            for pdl in (False, True):

                def calls(route=route, pdl=pdl):
                    for i in range(n):
                        pk = packs[i % 4]
                        sparse_ffn_decode_triton(
                            x, *route, pk.w_in, pk.b_in, pk.w_down, pk.b_out, True, "silu", pdl=pdl
                        )

                res[f"{frac:.0%} pdl={int(pdl)}"] = profile(capture(calls)[0], n)
        lines += table("decode FFN, Llama-3-8B, T = 1, steady (20 calls / graph, 4 weight copies)", res)
        print("\n".join(lines), flush=True)
        packs.clear()

        B, L, Hq, Hkv, D = 1, 16384, 32, 8, 128
        q = torch.randn(B, Hq, D, device=dev, dtype=torch.bfloat16)
        caches = [(torch.randn(B, L + 256, Hkv, D, device=dev, dtype=torch.bfloat16),
                   torch.randn(B, L + 256, Hkv, D, device=dev, dtype=torch.bfloat16)) for _ in range(4)]  # fmt: skip
        lens = torch.full((B,), L, device=dev, dtype=torch.int32)
        res = {}
        for pdl in (False, True):
            for bn in (64, 128):

                def attn(pdl=pdl, bn=bn):
                    for i in range(n):
                        kc, vc = caches[i % 4]
                        kv_decode_attention_triton(q, kc, vc, lens, None, None, None, pdl=pdl, block_n=bn)

                res[f"pdl={int(pdl)} bn={bn}"] = profile(capture(attn)[0], n)
        lines += table("decode attention, B = 1, 16k, steady (20 calls / graph, 4 cache copies)", res)
        print("\n".join(lines[-10:]), flush=True)
        caches.clear()

        res = {}
        x = torch.randn(4096, 4096, device=dev).to(torch.bfloat16)
        route = fixed_fraction_route(4096, w.E, 0.3, dev, 0)
        for bm, bk, nw, ns in ((128, 64, 4, 4), (256, 64, 8, 3), (256, 64, 8, 4)):

            def prefill(bm=bm, bk=bk, nw=nw, ns=ns):
                sparse_ffn_prefill_triton(x, *route, p.w_in, p.b_in, p.w_down, p.b_out, True, "silu",
                                          block_m=bm, block_k=bk, num_warps=nw, num_stages=ns)  # fmt: skip

            try:
                res[f"bm={bm} bk={bk} w={nw} s={ns}"] = profile(prefill, 1)
            except Exception as exc:  # e.g. out of shared memory
                print(f"prefill {bm} {bk} {nw} {ns}: {exc!r}"[:300])
        lines += table("prefill FFN, Llama-3-8B, T = 4096, 30 %, eager", res)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernel_profile_cuda.md"), "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
