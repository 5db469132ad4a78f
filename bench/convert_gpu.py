#!/usr/bin/env python
"""Conversion speed (issue 5): balanced k-means and the whole per-layer conversion at real FFN shapes.

Issue 5 asks that converting a 7B model (k-means on 14336 vectors of 4096 floats per layer, 32
layers) takes minutes on a GPU and still runs on the CPU for small models. For each shape this
times, on one layer of random N(0, 0.02) weights (bf16 on CUDA, fp32 on the CPU, as the models
load): ``balanced_kmeans`` on the gate rows (S = 32), and ``convert_mlp`` (k-means, permutation,
packing and the permutation-identity check), then multiplies by the model's layer count. k-means stops when
the assignment no longer changes: random rows settle within a few iterations, real rows may run to
``max_iter``, so the table also gives the bound ``k-means s x max_iter / iterations`` (it scales the
initialisation too, so it overestimates).

    python3 bench/convert_gpu.py --out bench/results                            # on the H200
    python3 bench/convert_gpu.py --device cpu --shapes smollm2 llama3-8b --out DIR  # here
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import environment, header_lines, write_results  # noqa: E402

from prunepath_ops.convert import balanced_kmeans, convert_mlp  # noqa: E402
from prunepath_ops.models.llama import LlamaMLP  # noqa: E402

# name: (d, F, layers)
SHAPES = {
    "smollm2": (576, 1536, 30),
    "llama2-7b": (4096, 11008, 32),
    "llama3-8b": (4096, 14336, 32),
    "llama3-70b": (8192, 28672, 80),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(name: str, args) -> dict:
    d, F, layers = SHAPES[name]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(F)
    mlp = LlamaMLP(d, F).to(dtype)
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.02)
    mlp = mlp.to(args.device)
    row = {"shape": name, "d": d, "F": F, "layers": layers, "E": F // 32, "dtype": str(dtype)}

    _sync(args.device)
    t0 = time.perf_counter()
    res = balanced_kmeans(mlp.gate_proj.weight, 32, seed=0, max_iter=args.max_iter)
    _sync(args.device)
    row["kmeans_s"] = time.perf_counter() - t0
    row["iterations"] = int(getattr(res, "iterations", -1))
    counts = torch.bincount(res.assignment.cpu(), minlength=F // 32)
    assert bool((counts == 32).all()), "unbalanced partition"

    t0 = time.perf_counter()
    convert_mlp(mlp, 32, 0, max_iter=args.max_iter)
    _sync(args.device)
    row["convert_layer_s"] = time.perf_counter() - t0
    row["convert_model_min"] = row["convert_layer_s"] * layers / 60
    slow_kmeans = row["kmeans_s"] * args.max_iter / max(row["iterations"], 1)
    row["convert_model_max_iter_min"] = (row["convert_layer_s"] - row["kmeans_s"] + slow_kmeans) * layers / 60
    print(f"{name}: k-means {row['kmeans_s']:.2f} s ({row['iterations']} iterations), layer "
          f"{row['convert_layer_s']:.2f} s, model ~{row['convert_model_min']:.1f} min", flush=True)  # fmt: skip
    return row


def warm_up(device: str) -> None:
    """One untimed conversion of a small FFN: the first shape would otherwise pay CUDA's context,
    cuBLAS handles and kernel loading (session 16's first GPU table timed SmolLM2's layer at 3.2 s)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # as run() loads
    mlp = LlamaMLP(64, 256).to(dtype).to(device)
    convert_mlp(mlp, 32, 0)
    _sync(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["smollm2", "llama3-8b", "llama3-70b"])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-iter", type=int, default=30, help="k-means iterations at most (default 30, the CLI's)")
    ap.add_argument("--out", help="directory for convert_<device>.md / .json")
    ap.add_argument("--peak-tbps", type=float, default=4.24)
    args = ap.parse_args(argv)
    env = environment(args, "time.perf_counter around one call (synchronised), after an untimed warm-up")
    warm_up(args.device)
    rows = [run(name, args) for name in args.shapes]
    lines = header_lines(f"Conversion speed on {env.get('gpu', 'the CPU')}", env, args)
    lines += [
        "- one layer of random N(0, 0.02) weights per shape, S = 32, seed 0; model time = layer time x layers",
        "",
        "| shape | d | F | E | dtype | k-means s | iterations | convert_mlp s (one layer) | whole model, min | "
        "whole model at max_iter iterations, min |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['shape']} ({r['layers']} layers) | {r['d']} | {r['F']} | {r['E']} | {r['dtype']} | "
                     f"{r['kmeans_s']:.2f} | {r['iterations']} | {r['convert_layer_s']:.2f} | "
                     f"{r['convert_model_min']:.1f} | {r['convert_model_max_iter_min']:.1f} |")  # fmt: skip
    write_results(args.out, f"convert_{args.device}", "\n".join(lines), {"env": env, "rows": rows})
    if not args.out:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
