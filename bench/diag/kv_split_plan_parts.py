#!/usr/bin/env python
"""Where the time of ``kv_decode_attention``'s split plans goes on the GPU: one table, graphed replays.

Legend: B sequences, Hkv kv heads, S_max cache rows, L keys per sequence.

The length plan (``triton_attention.SPLIT_BY_LENGTH``) ran one split per sequence at B = 32 / 4k in
161 us where the static plan's forced single split took 135.6 (bench/results/kv_attention_cuda_static_sweep.md,
sweep), and its loss grew with L. This times, per case and as CUDA-graph replays (do_bench, L2
flushed), the parts that differ between the two:

- ``static`` / ``static, 1 split``: the default static plan, and the static plan forced to one split;
- ``length``: the length plan as launched (its fill at ``PROGRAMS_PER_SM`` 2, no more programs
  than the GPU holds at once, each looping over work items); ``a program per item``: the grid of
  B + cdiv(fill, Hkv) items per kv head (session 19's first version); ``2 per SM``: cdiv(fill, Hkv)
  programs per kv head; ``fill x1``: the plan's fill at one program per SM;
- ``length, no PDL``: without the programmatic dependent launch (the combine kernel then cannot
  start beside the split kernel);
- ``..., no combine``: the split kernel alone (the combine kernel replaced by a no-op while the
  graph is captured; the output is then incomplete, only the time is read).

    python3 bench/diag/kv_split_plan_parts.py --out bench/results   # on the H200, ~1 minute
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from common import capture, environment, header_lines, make_timer, write_results  # noqa: E402

from prunepath_ops.attention import kernels, triton_attention  # noqa: E402
from prunepath_ops.attention.triton_attention import kv_decode_attention_triton  # noqa: E402

CASES = [(32, 1024), (32, 4096), (32, 16384), (8, 4096), (8, 16384), (1, 1024), (1, 16384), ("ragged", 16384)]
HQ, HKV, D, SLACK = 32, 8, 128, 256


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def inputs(B, L, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if B == "ragged":
        lens = [L] + torch.randint(128, 2049, (31,), generator=torch.Generator().manual_seed(17)).tolist()
    else:
        lens = [L] * B
    nb, S_max = len(lens), max(lens) + SLACK

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(torch.bfloat16)

    q, k, v = rnd(nb, HQ, D), rnd(nb, S_max, HKV, D), rnd(nb, S_max, HKV, D)
    return q, k, v, torch.tensor(lens, dtype=torch.int32, device="cuda"), lens


VARIANTS = {
    "static": ({}, {"split_by_length": False}, False),
    "static, 1 split": ({}, {"split_by_length": False, "num_splits": 1}, False),
    "static, no combine": ({}, {"split_by_length": False}, True),
    "length": ({}, {"split_by_length": True}, False),
    "length, no combine": ({}, {"split_by_length": True}, True),
    "length, a program per item": ({}, {"split_by_length": True, "programs": "items"}, False),
    "length, 2 per SM": ({}, {"split_by_length": True, "programs": "fill"}, False),
    "length, no PDL": ({}, {"split_by_length": True, "pdl": False}, False),
    "length, fill x1": ({"PROGRAMS_PER_SM": 1}, {"split_by_length": True}, False),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="kv_split_plan_parts")
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--rep", type=float, default=50.0)
    ap.add_argument("--timer", default="auto")
    args = ap.parse_args()
    args.device, args.peak_tbps = "cuda", 4.24  # the measured H200 copy (ENVIRONMENT.md)
    desc, timer = make_timer(args)
    env = environment(args, desc)
    rows = []
    for B, L in CASES:
        q, k, v, seqlens, lens = inputs(B, L)
        name = f"B={B} L={L}" if B != "ragged" else f"ragged B=32 (1 x {L}, 31 in [128, 2048])"
        ref = kv_decode_attention_triton(q, k, v, seqlens, None, None, None, split_by_length=False)
        row = {"case": name}
        for label, (consts, kwargs, no_combine) in VARIANTS.items():
            with mock.patch.multiple(triton_attention, **consts) if consts else contextlib.nullcontext():
                cfg = triton_attention.launch_config(len(lens), HKV, k.shape[1], D, q.device, **{
                    k_: v_ for k_, v_ in kwargs.items() if k_ in ("num_splits", "split_by_length")})  # fmt: skip
                if kwargs.get("programs") == "items":
                    kwargs = {**kwargs, "programs": cfg["items"]}
                elif kwargs.get("programs") == "fill":
                    kwargs = {**kwargs, "programs": cfg["fill"] // HKV}
                with (
                    mock.patch.object(kernels, "combine_splits_kernel", _NoLaunch())
                    if no_combine
                    else contextlib.nullcontext()
                ):
                    call = functools.partial(kv_decode_attention_triton, q, k, v, seqlens, None, None, None, **kwargs)
                    replay, out = capture(call)
            replay()
            torch.cuda.synchronize()
            if not no_combine:
                assert torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2), (name, label)
            if cfg["by_length"]:  # the launcher's default programs: what fits the GPU at once (resident_programs)
                resident = max(triton_attention._RESIDENT.values())
                programs = kwargs.get("programs") or triton_attention.programs_per_head(cfg["items"], resident, HKV)
                grid = f"{HKV} x {programs}"
            else:
                grid = f"{len(lens) * HKV} x {cfg['num_splits']}"
            row[label] = (timer(replay)[0] * 1e3, grid)
            print(f"{name:45s} {label:30s} grid {grid:>10s} {row[label][0]:8.1f} us", flush=True)
        rows.append(row)
    lines = header_lines("kv_decode_attention split plans, part by part", env, args)
    lines += ["", "CUDA-graph replays of one call, us (grid: programs of the split kernel).", ""]
    lines.append("| case | " + " | ".join(VARIANTS) + " |")
    lines.append("|---|" + "---:|" * len(VARIANTS))
    for r in rows:
        lines.append(f"| {r['case']} | " + " | ".join(f"{r[k][0]:.1f} ({r[k][1]})" for k in VARIANTS) + " |")
    report = "\n".join(lines) + "\n"
    print(report)
    write_results(args.out, args.name, report, {"env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
