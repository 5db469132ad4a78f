#!/usr/bin/env python
"""A few launches of one decode-FFN kernel, for Nsight Compute (``ncu``) to profile on the H200.

Batch 1, Llama-3-8B FFN shape (d 4096, F 14336, S 32, E 448), bf16, 30 % of the experts active:
the issue's decode row. ``--which`` picks what runs: ``triton`` (the Triton one-token path,
``decode_expert_kernel`` + ``decode_reduce_kernel``), ``cuda`` (the CUDA kernel of
``prunepath::expert_ffn``: ``expert_ffn_partial_kernel`` + ``expert_ffn_reduce_kernel``), ``bulk`` (the experimental TMA bulk-copy
expert kernel, where the build has it) or ``dense`` (the three ``F.linear`` of the dense FFN:
the streaming reference, cuBLAS GEMVs). The question it answers: with the same bytes to stream,
why does the expert kernel reach ~74 % of the HBM bandwidth where cuBLAS reaches ~86 %
(warp stall reasons, achieved occupancy, DRAM throughput over the kernel's duration).

    ncu --clock-control none -k regex:decode_expert --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats python3 bench/diag/decode_expert_ncu.py --which triton
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sparse_ffn_gpu import Weights, fixed_fraction_route  # noqa: E402

from prunepath_ops.ffn.triton_ffn import sparse_ffn_decode_triton  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--which", choices=("triton", "cuda", "bulk", "dense"), default="triton")
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--launches", type=int, default=4)
    args = ap.parse_args(argv)
    w = Weights(4096, 14336, 32, torch.bfloat16, "cuda", 0)
    x = torch.randn(1, w.d, device="cuda").bfloat16()
    route = fixed_fraction_route(1, w.E, args.fraction, "cuda", 0)
    p = w.packed
    with torch.inference_mode():
        for _ in range(args.launches):
            if args.which == "dense":
                F.linear(F.silu(F.linear(x, w.wg)) * F.linear(x, w.wu), w.wd)
            elif args.which == "cuda":
                torch.ops.prunepath.expert_ffn(x, *route, p.w_in, p.b_in, p.w_down, p.b_out, p.gated, p.act, False)
            else:
                extra = {"expert_kernel": "bulk"} if args.which == "bulk" else {}
                sparse_ffn_decode_triton(x, *route, p.w_in, p.b_in, p.w_down, p.b_out, p.gated, p.act, **extra)
        torch.cuda.synchronize()
    print(f"{args.which}: {args.launches} launches done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
