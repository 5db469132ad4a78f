#!/usr/bin/env python
"""Roofline benchmark of ``prunepath_ops.sparse_ffn`` against the dense FFN and index_select, for the H200.

Shapes (gated SiLU FFN, expert width S = 32, bf16): Llama-3-8B (d=4096, F=14336, E=448),
d=4096 / F=11008 (E=344) and SmolLM2-135M (d=576, F=1536, E=48). Every token keeps exactly
10 / 30 / 50 / 100 % of the experts: a seeded random distinct subset per token in random order,
gates uniform in (0, 1), padded with -1 to K = E (a ``Route`` built directly, no router).
Decode: batch 1, 4, 16; prefill: 2048 and 4096 tokens.

For every case the script

1. checks ``sparse_ffn`` (path auto) against ``reference.masked_dense_ffn`` evaluated in fp32 on a
   subset of the tokens (relative error ``||out - ref|| / ||ref||`` < 2e-2 for bf16/fp16, 1e-4 for
   fp32) and checks that three runs on the same input are bitwise equal; a case that fails is
   reported as FAIL, its time is not a result;
2. times, with ``triton.testing.do_bench`` (median, L2 flushed before each call; CUDA events with
   the same flush when triton is missing), rotating among 3 different ``x``: the op, the dense
   FFN ``reference.dense_ffn`` (three ``F.linear`` + silu * mul; once per shape and token count, and
   for prefill again beside each case: ``--prefill-rounds`` alternating dense / sparse timings, the
   median of each, so that both run at the clocks of the same thermal and power state) and,
   at batch 1, ``reference.index_select_ffn`` (what a user would write without the library);
3. reports speedups, the bytes of the union of the selected experts' weights (3 * S * d * 2 bytes
   per expert), the floor (bytes / 4.24 TB/s, the measured H200 copy), the achieved TB/s and, for
   prefill, the TFLOP/s on the selected work (2 * T * 3 * S * d * n_active) against 690 TFLOP/s.

It prints markdown tables and writes ``<name>.json`` and ``<name>.md`` (GPU, versions, command line,
date) to ``--out``. Exit status 1 when any case failed its checks.

    bash bench/gpu_build.sh                                         # once per fresh GPU machine
    python3 bench/sparse_ffn_gpu.py --out bench/results            # on the H200, < 4 minutes
    python3 bench/sparse_ffn_gpu.py --out /tmp/q --quick           # 8B shape, T=1 and 4096, 30/100 %
    python3 bench/sparse_ffn_gpu.py --device cpu --tiny --out /tmp/x                     # CPU smoke test
    TRITON_INTERPRET=1 python3 bench/sparse_ffn_gpu.py --device cpu --tiny --backend triton --out /tmp/x
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import capture, environment, header_lines, make_timer, write_results  # noqa: E402

import prunepath_ops  # noqa: E402
from prunepath_ops import reference as R  # noqa: E402
from prunepath_ops.ffn._env import DECODE_MAX_TOKENS  # noqa: E402

H200_COPY_TBPS = 4.24
H200_BF16_TFLOPS = 690.0
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# name -> (d, F, S); E = F / S.
SHAPES = {
    "llama3-8b": (4096, 14336, 32),
    "d4096-f11008": (4096, 11008, 32),
    "smollm2-135m": (576, 1536, 32),
}
TINY_SHAPES = {"tiny-a": (64, 256, 32), "tiny-b": (48, 96, 16)}
FRACTIONS = (0.1, 0.3, 0.5, 1.0)
DECODE_T = (1, 4, 16)
PREFILL_T = (2048, 4096)
TINY_PREFILL_T = (24,)
N_INPUTS = 3  # x tensors the timed functions rotate among
L2_BYTES = 60 * 2**20  # H200 L2 cache (approximately)
# ENVIRONMENT.md: dense SwiGLU FFN via three F.linear (us) and index_select at batch 1 (us).
ENV_DENSE_US = {("d4096-f11008", 1): 95.0, ("llama3-8b", 1): 111.0, ("d4096-f11008", 2048): 870.0,
                ("llama3-8b", 2048): 1120.0}  # fmt: skip
ENV_INDEX_SELECT_US = {("llama3-8b", 0.1): 76.0, ("llama3-8b", 0.3): 122.0, ("llama3-8b", 0.5): 177.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=("cuda", "cpu", "auto"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="llama3-8b only, T in (1, 4096), 30 %% and 100 %%")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and token counts (CPU smoke test)")
    ap.add_argument("--shapes", nargs="+", default=None, help=f"subset of {list(SHAPES)}")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help=f"decode token counts (default {DECODE_T})")
    ap.add_argument("--prefill", type=int, nargs="+", default=None, help=f"prefill token counts (default {PREFILL_T})")
    ap.add_argument("--fractions", type=float, nargs="+", default=None, help=f"experts kept (default {FRACTIONS})")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--backend", choices=("auto", "cuda", "triton", "cpu", "reference"), default="auto")
    ap.add_argument("--check-tokens", type=int, default=128, help="tokens compared with the reference per case")
    ap.add_argument("--warmup", type=float, default=None, help="warmup per measurement, ms (default 15; quick 10)")
    ap.add_argument("--rep", type=float, default=None, help="timed repetitions per measurement, ms (default 60)")
    ap.add_argument("--timer", choices=("auto", "do_bench", "events"), default="auto")
    ap.add_argument("--peak-tbps", type=float, default=H200_COPY_TBPS, help="bandwidth of the floor, TB/s")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="matmul peak, TFLOP/s")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    ap.add_argument("--steady-calls", type=int, default=20, help="calls per graph of the steady-state decode timing")
    ap.add_argument("--steady-copies", type=int, default=4,
                    help="weight copies the steady-state calls cycle over (0: skip that timing)")  # fmt: skip
    ap.add_argument("--prefill-rounds", type=int, default=3,
                    help="prefill: alternating dense/sparse timings per case, medians of each (1: dense once per T)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory for <name>.json and <name>.md")
    ap.add_argument("--name", default=None, help="output file stem (default sparse_ffn_<device>[_quick|_tiny])")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device (use --device cpu --tiny for a smoke test)")
    if args.tiny:
        table = TINY_SHAPES
        args.shapes = args.shapes or list(TINY_SHAPES)
        args.prefill = args.prefill or list(TINY_PREFILL_T)
    else:
        table = SHAPES
        args.shapes = args.shapes or (["llama3-8b"] if args.quick else list(SHAPES))
        args.prefill = args.prefill or ([4096] if args.quick else list(PREFILL_T))
    bad = [s for s in args.shapes if s not in table]
    if bad:
        ap.error(f"--shapes: unknown {bad}; choose among {list(table)}")
    args.shape_table = table
    args.batches = args.batches or ([1] if args.quick else list(DECODE_T))
    if any(t > DECODE_MAX_TOKENS or t < 1 for t in args.batches):
        ap.error(f"--batches: decode token counts must lie in [1, {DECODE_MAX_TOKENS}]")
    args.fractions = args.fractions or ([0.3, 1.0] if args.quick else list(FRACTIONS))
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (10.0 if args.quick else 15.0)
    args.rep = args.rep if args.rep is not None else (5.0 if args.tiny else 60.0)
    suffix = "_tiny" if args.tiny else ("_quick" if args.quick else "")
    args.name = args.name or f"sparse_ffn_{args.device}{suffix}"
    return args


# ----------------------------------------------------------------------------- inputs


def fixed_fraction_route(T: int, E: int, frac: float, device, seed: int) -> prunepath_ops.Route:
    """Each token keeps exactly ``max(1, round(frac * E))`` distinct random experts, in random order.

    The order stands for a descending router probability (argsort of uniform noise); gates are
    uniform in (0.01, 0.99); K = E slots, -1 / 0 in the unused ones.
    """
    n = max(1, min(E, round(frac * E)))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + T * 4099 + E * 7 + int(frac * 1000))
    ids = torch.argsort(torch.rand(T, E, generator=gen), dim=1).int()  # [T, E]: a random permutation per row
    gates = 0.01 + 0.98 * torch.rand(T, E, generator=gen)
    ids[:, n:] = -1
    gates[:, n:] = 0.0
    num_active = torch.full((T,), n, dtype=torch.int32)
    return prunepath_ops.Route(ids.to(device), gates.to(device), num_active.to(device))


def union_experts(route: prunepath_ops.Route, E: int) -> int:
    """Experts selected by at least one token (their weights are the bytes the batch must read)."""
    ids = route.expert_ids
    mask = torch.zeros(E + 1, dtype=torch.bool, device=ids.device)
    mask[torch.where(ids >= 0, ids.long(), E).flatten()] = True
    return int(mask[:E].sum())


class Weights:
    """Dense (nn.Linear layout) and packed weights of one shape, plus fp32 copies for the reference."""

    def __init__(self, d: int, F: int, S: int, dtype: torch.dtype, device, seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)

        def rnd(*shape):
            return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype)

        self.d, self.F, self.S, self.E = d, F, S, F // S
        self.wg, self.wu, self.wd = rnd(F, d), rnd(F, d), rnd(d, F)
        self.packed = prunepath_ops.pack_experts(self.wg, self.wd, S, w_up=self.wu)
        self.wg32, self.wu32, self.wd32 = (w.float() for w in (self.wg, self.wu, self.wd))
        self.expert_bytes = 3 * S * d * self.wg.element_size()


def llama3_8b_prefill(T: int, active: float, device, seed: int = 0):
    """The prefill diagnostics' case: Llama-3-8B FFN ``Weights`` (bf16), ``x`` (torch.manual_seed(seed),
    N(0, 1), bf16, ``[T, 4096]``) and ``fixed_fraction_route(T, 448, active)``."""
    d, F, S = SHAPES["llama3-8b"]
    torch.manual_seed(seed)
    w = Weights(d, F, S, torch.bfloat16, device, seed)
    x = torch.randn(T, d, device=device).to(torch.bfloat16)
    return w, x, fixed_fraction_route(T, w.E, active, device, seed)


def rotating(fn: Callable, xs: list[torch.Tensor]) -> Callable[[], object]:
    """A zero-argument callable that applies ``fn`` to the next ``x`` of ``xs`` at each call."""
    cycle = itertools.cycle(xs)
    return lambda: fn(next(cycle))


# ----------------------------------------------------------------------------- one case


def check_case(w: Weights, x: torch.Tensor, route, args) -> dict:
    """Correctness (fp32 masked dense oracle on a subset of tokens) and determinism (3 runs bitwise equal)."""
    T = x.shape[0]
    outs = [prunepath_ops.sparse_ffn(x, route, w.packed, backend=args.backend) for _ in range(3)]
    deterministic = all(torch.equal(outs[0], o) for o in outs[1:])
    n = min(T, args.check_tokens)
    idx = torch.linspace(0, T - 1, n, device=x.device).round().long().unique()
    ids, gates, na = (t.index_select(0, idx) for t in route)
    ref = R.masked_dense_ffn(x.index_select(0, idx).float(), w.wg32, w.wd32, ids, gates, na, w.S, w_up=w.wu32)
    out = outs[0].index_select(0, idx).float()
    rel = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    tol = 1e-4 if x.dtype == torch.float32 else 2e-2
    ok = bool(torch.isfinite(out).all()) and rel < tol
    return {"rel_err": rel, "tol": tol, "check_tokens": int(idx.numel()), "correct": ok,
            "deterministic": deterministic, "check_ok": ok and deterministic}  # fmt: skip


def run_case(shape: str, w: Weights, T: int, frac: float, xs, dense_us: float, args, timer) -> dict:
    d, S, E = w.d, w.S, w.E
    route = fixed_fraction_route(T, E, frac, xs[0].device, args.seed)
    n_active = int(route.num_active[0])
    n_union = union_experts(route, E)
    nbytes = n_union * w.expert_bytes
    row = {"shape": shape, "d": d, "F": w.F, "S": S, "E": E, "dtype": args.dtype, "T": T,
           "phase": "decode" if T <= DECODE_MAX_TOKENS else "prefill", "frac": frac, "n_active": n_active,
           "union_experts": n_union, "union_bytes": nbytes, "floor_us": nbytes / (args.peak_tbps * 1e12) * 1e6,
           "dense_us": dense_us}  # fmt: skip
    row.update(check_case(w, xs[0], route, args))
    sparse_call = rotating(lambda x: prunepath_ops.sparse_ffn(x, route, w.packed, backend=args.backend), xs)
    key = "sparse_us" if row["check_ok"] else "sparse_us_unchecked"  # a failed case's time is not a result
    if T > DECODE_MAX_TOKENS and args.prefill_rounds > 1 and row["check_ok"]:
        # Dense and sparse in alternating rounds, so that both run at the same clocks: a dense
        # prefill FFN draws the H200's 690 W cap and its SM clock falls from ~1.9 to ~1.5 GHz within
        # a second of sustained load (bench/results/prefill_clock_diag.md), so a dense time taken
        # once, earlier, on a cooler GPU is not the same machine as the sparse time.
        # Also both captured in a CUDA graph: at small shapes the eager call is bound by the host
        # (Python and the launches of ~10 kernels), the graph replay shows the GPU's time.
        calls = {"dense_us": rotating(dense_fn(w), xs), key: sparse_call}
        if xs[0].is_cuda:
            calls["dense_graph_us"] = cuda_graphed(dense_fn(w), xs[0])
            calls["sparse_graph_us"] = cuda_graphed(
                lambda x: prunepath_ops.sparse_ffn(x, route, w.packed, backend=args.backend), xs[0]
            )
        times = {name: [] for name in calls}
        for _ in range(args.prefill_rounds):
            for name, fn in calls.items():
                times[name].append(timer(fn)[0] * 1e3)
        for name, v in times.items():
            row.update({name: statistics.median(v), name + "_rounds": v})
        dense_us = row["dense_us"]
        med = row[key] * 1e-3
        if "sparse_graph_us" in row:
            row["speedup_dense_graph"] = row["dense_graph_us"] / row["sparse_graph_us"]
    else:
        med, p20, p80 = timer(sparse_call)
        row.update({key: med * 1e3, key + "_p20": p20 * 1e3, key + "_p80": p80 * 1e3})
    if not row["check_ok"]:
        return row
    sparse_s = med * 1e-3
    row["speedup_dense"] = dense_us / row["sparse_us"]
    row["TBps"] = nbytes / sparse_s / 1e12
    row["pct_bw"] = 100 * row["TBps"] / args.peak_tbps
    flops = 2 * T * 3 * S * d * n_active
    row["TFLOPs"] = flops / sparse_s / 1e12
    row["pct_tflops"] = 100 * row["TFLOPs"] / args.peak_tflops
    row["dense_TFLOPs"] = 2 * T * 3 * w.F * d / (dense_us * 1e-6) / 1e12
    if T <= DECODE_MAX_TOKENS and xs[0].is_cuda:
        sparse_graph = cuda_graphed(lambda x: prunepath_ops.sparse_ffn(x, route, w.packed, backend=args.backend), xs[0])
        row["sparse_graph_us"] = timer(sparse_graph)[0] * 1e3
        row["dense_graph_us"] = timer(cuda_graphed(dense_fn(w), xs[0]))[0] * 1e3
        row["speedup_dense_graph"] = row["dense_graph_us"] / row["sparse_graph_us"]
        row["TBps_graph"] = nbytes / (row["sparse_graph_us"] * 1e-6) / 1e12
        row["pct_bw_graph"] = 100 * row["TBps_graph"] / args.peak_tbps
        if args.steady_copies > 0:
            try:
                row["sparse_steady_us"], row["dense_steady_us"] = steady_state(w, route, xs[0], args, timer)
                row["speedup_dense_steady"] = row["dense_steady_us"] / row["sparse_steady_us"]
                row["pct_bw_steady"] = 100 * nbytes / (row["sparse_steady_us"] * 1e-6) / 1e12 / args.peak_tbps
                if T == 1 and args.backend == "auto":  # auto runs the CUDA kernel here: Triton's in the same run
                    row["triton_steady_us"] = steady_state(w, route, xs[0], args, timer, backend="triton")[0]
            except Exception as exc:  # e.g. out of memory for the copies: keep the other columns
                row["steady_error"] = repr(exc)[:300]
    if T == 1:
        ids_x = xs[0]
        ref_out = prunepath_ops.sparse_ffn(ids_x, route, w.packed, backend=args.backend).float()
        base = R.index_select_ffn(ids_x, *route, w.packed.w_in, w.packed.w_down).float()
        row["index_select_rel_diff"] = float((base - ref_out).norm() / ref_out.norm().clamp_min(1e-30))
        ims, _, _ = timer(rotating(lambda x: R.index_select_ffn(x, *route, w.packed.w_in, w.packed.w_down), xs))
        row["index_select_us"] = ims * 1e3
        row["speedup_index_select"] = row["index_select_us"] / row["sparse_us"]
    return row


def steady_state(w: Weights, route, x: torch.Tensor, args, timer, backend: str | None = None) -> tuple[float, float]:
    """``(sparse, dense)`` device time per call, us, in the steady state of a decode step.

    One CUDA graph holds ``--steady-calls`` calls back to back, cycling over ``--steady-copies``
    copies of the weights, so no call finds its weights in L2 (4 x 352 MB at the 8B shape against a
    50 MB L2), as in a model where the other layers' weights pass between two calls of one layer.
    The graph's time over the number of calls leaves out the graph's own launch, which a single
    captured call (the "graph" columns) pays in full: the kernels and the gaps between them remain.
    """
    n, k = args.steady_calls, args.steady_copies
    backend = backend or args.backend
    p = w.packed
    packs = [p] + [dataclasses.replace(p, w_in=p.w_in.clone(), w_down=p.w_down.clone()) for _ in range(k - 1)]
    dense = [(w.wg, w.wu, w.wd)] + [(w.wg.clone(), w.wu.clone(), w.wd.clone()) for _ in range(k - 1)]

    def sparse_calls():
        for i in range(n):
            prunepath_ops.sparse_ffn(x, route, packs[i % k], backend=backend)

    def dense_calls():
        for i in range(n):
            wg, wu, wd = dense[i % k]
            R.dense_ffn(x, wg, wd, w_up=wu)

    sparse_us = timer(capture(sparse_calls)[0])[0] * 1e3 / n
    dense_us = timer(capture(dense_calls)[0])[0] * 1e3 / n
    packs.clear()
    dense.clear()
    gc.collect()
    torch.cuda.empty_cache()
    return sparse_us, dense_us


def cuda_graphed(fn: Callable, x: torch.Tensor) -> Callable[[], object]:
    """``fn(x)`` captured once in a CUDA graph; returns the replay (the decode steps of a model run graphed)."""
    return capture(lambda: fn(x))[0]


def dense_fn(w: Weights) -> Callable:
    # reference.dense_ffn is exactly silu(F.linear(x, Wg)) * F.linear(x, Wu), then F.linear(h, Wd).
    return lambda x: R.dense_ffn(x, w.wg, w.wd, w_up=w.wu)


# ----------------------------------------------------------------------------- report


def _f(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def _time(r: dict, key: str) -> str:
    if key == "sparse_us" and not r.get("check_ok", False):
        return "FAIL"
    v = r.get(key)
    return "-" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def decode_table(rows: list[dict]) -> str:
    head = ("| shape | T | active | experts/token | union | sparse us (graph) | dense us (graph) | vs dense (graph) "
            "| TB/s (graph) | % of peak (graph) | sparse us (steady) | dense us (steady) | vs dense (steady) "
            "| % of peak (steady) | Triton decode us (steady) | sparse us (eager) | dense us (eager) | index_select us (eager) "
            "| vs dense (eager) | vs index_select (eager) | union MB | floor us | rel err |")  # fmt: skip
    out = [head, "|" + "---|" * 2 + "---:|" * 21]
    for r in rows:
        out.append(
            f"| {r['shape']} | {r['T']} | {r['frac']:.0%} | {r['n_active']} | {r['union_experts']} "
            f"| {_time(r, 'sparse_graph_us')} | {_time(r, 'dense_graph_us')} "
            f"| {_f(r.get('speedup_dense_graph'), '.2f', 'x')} | {_f(r.get('TBps_graph'), '.2f')} "
            f"| {_f(r.get('pct_bw_graph'), '.0f')} | {_time(r, 'sparse_steady_us')} | {_time(r, 'dense_steady_us')} "
            f"| {_f(r.get('speedup_dense_steady'), '.2f', 'x')} | {_f(r.get('pct_bw_steady'), '.0f')} "
            f"| {_time(r, 'triton_steady_us')} | {_time(r, 'sparse_us')} | {_time(r, 'dense_us')} | {_time(r, 'index_select_us')} "
            f"| {_f(r.get('speedup_dense'), '.2f', 'x')} | {_f(r.get('speedup_index_select'), '.2f', 'x')} "
            f"| {r['union_bytes'] / 1e6:.1f} | {_time(r, 'floor_us')} | {_f(r.get('rel_err'), '.1e')} |"
        )
    return "\n".join(out)


def prefill_table(rows: list[dict]) -> str:
    head = ("| shape | T | active | experts/token | sparse us | dense us | vs dense | sparse us (graph) "
            "| dense us (graph) | vs dense (graph) | sparse TFLOP/s (selected) "
            "| % of peak | dense TFLOP/s | union MB | floor us | TB/s | rel err |")  # fmt: skip
    out = [head, "|" + "---|" * 2 + "---:|" * 15]
    for r in rows:
        out.append(
            f"| {r['shape']} | {r['T']} | {r['frac']:.0%} | {r['n_active']} | {_time(r, 'sparse_us')} "
            f"| {_time(r, 'dense_us')} | {_f(r.get('speedup_dense'), '.2f', 'x')} | {_time(r, 'sparse_graph_us')} "
            f"| {_time(r, 'dense_graph_us')} | {_f(r.get('speedup_dense_graph'), '.2f', 'x')} "
            f"| {_f(r.get('TFLOPs'), '.0f')} "
            f"| {_f(r.get('pct_tflops'), '.0f')} | {_f(r.get('dense_TFLOPs'), '.0f')} "
            f"| {r['union_bytes'] / 1e6:.1f} | {_time(r, 'floor_us')} | {_f(r.get('TBps'), '.2f')} "
            f"| {_f(r.get('rel_err'), '.1e')} |"
        )
    return "\n".join(out)


def env_comparison(rows: list[dict], dense: dict) -> list[str]:
    """Lines setting this run's dense / index_select baselines next to ENVIRONMENT.md's numbers."""
    lines = []
    for (shape, T), us in ENV_DENSE_US.items():
        if (shape, T) in dense:
            lines.append(f"- dense {shape} T={T}: {dense[shape, T]:.1f} us here, {us:g} us in ENVIRONMENT.md")
    for r in rows:
        ref = ENV_INDEX_SELECT_US.get((r["shape"], r["frac"]))
        if ref is not None and r["T"] == 1 and r.get("index_select_us") is not None:
            lines.append(f"- index_select {r['shape']} T=1 {r['frac']:.0%}: {r['index_select_us']:.1f} us here, "
                         f"{ref:g} us in ENVIRONMENT.md")  # fmt: skip
    return lines


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")  # the fp32 oracle must not use TF32
    torch.manual_seed(args.seed)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    timer_desc, timer = make_timer(args)
    env = environment(args, timer_desc)
    env["backend"] = args.backend
    where = env.get("gpu") or env["cpu"]
    print(f"# sparse_ffn: prunepath vs dense FFN vs index_select on {where} ({args.device}, {args.dtype})")
    print(f"torch {env['torch']}, CUDA {env['torch_cuda']}, triton {env['triton']}; timer: {timer_desc}")
    print(f"command: {env['command']}\n", flush=True)

    rows, failures, dense = [], [], {}
    start = time.perf_counter()
    with torch.inference_mode():
        for shape in args.shapes:
            d, F, S = args.shape_table[shape]
            w = Weights(d, F, S, dtype, device, args.seed)
            print(f"## {shape}: d={d} F={F} S={S} E={w.E}, weights {3 * F * d * w.wg.element_size() / 1e6:.1f} MB",
                  flush=True)  # fmt: skip
            for T in [*args.batches, *args.prefill]:
                gen = torch.Generator(device=device).manual_seed(args.seed + T)
                xs = [torch.randn(T, d, generator=gen, device=device, dtype=torch.float32).to(dtype)
                      for _ in range(N_INPUTS)]  # fmt: skip
                try:
                    med, _, _ = timer(rotating(dense_fn(w), xs))
                    dense[shape, T] = med * 1e3
                except Exception:
                    dense[shape, T] = None
                    print(f"dense {shape} T={T}: ERROR\n{traceback.format_exc(limit=3)}", flush=True)
                for frac in args.fractions:
                    label = f"{shape} T={T} {frac:.0%}"
                    try:
                        row = run_case(shape, w, T, frac, xs, dense[shape, T], args, timer)
                    except Exception:  # one crash should not hide the other cases
                        row = {"shape": shape, "T": T, "frac": frac, "check_ok": False,
                               "error": traceback.format_exc(limit=4)}  # fmt: skip
                    rows.append(row)
                    if not row["check_ok"]:
                        failures.append(row)
                        why = row.get("error") or (f"rel err {row['rel_err']:.2e} (tol {row['tol']:g}), "
                                                   f"deterministic {row['deterministic']}")  # fmt: skip
                        print(f"{label}: FAIL {why}", flush=True)
                        continue
                    extra = f", index_select {_time(row, 'index_select_us')} us" if T == 1 else ""
                    print(f"{label}: sparse {_time(row, 'sparse_us')} us, dense {_time(row, 'dense_us')} us{extra}, "
                          f"{row['TBps']:.2f} TB/s, {row['TFLOPs']:.1f} TFLOP/s, rel err {row['rel_err']:.1e}",
                          flush=True)  # fmt: skip
                del xs
            del w
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    elapsed = time.perf_counter() - start

    ok_rows = [r for r in rows if "error" not in r]
    dec = [r for r in ok_rows if r["phase"] == "decode"]
    pre = [r for r in ok_rows if r["phase"] == "prefill"]
    small = [s for s in args.shapes if 3 * args.shape_table[s][1] * args.shape_table[s][0] * 2 < L2_BYTES]
    lines = [
        *header_lines(f"sparse_ffn on {where}", env, args),
        f"- each timed function rotates among {N_INPUTS} different x",
        f"- {args.dtype}, gated SiLU FFN, weights randn * 0.02, x randn; sparse: `prunepath_ops.sparse_ffn(x, route, "
        f"packed, path='auto', backend='{args.backend}')` (decode kernels for T <= {DECODE_MAX_TOKENS}, prefill above; "
        "auto runs the CUDA kernel of expert_ffn at T = 1 on the decode path, Triton otherwise; at T = 1 the column "
        "'Triton decode us (steady)' times backend='triton' in the same run)",
        "- dense: `prunepath_ops.reference.dense_ffn` = F.linear(h, Wd) with h = silu(F.linear(x, Wg)) * "
        "F.linear(x, Wu) (three F.linear); index_select: `reference.index_select_ffn` (batch 1 only)",
        "- routing: every token keeps exactly the given fraction of the E experts (random distinct subset, "
        "random order, gates uniform in (0.01, 0.99)), K = E",
        f"- union: experts selected by at least one token; bytes = union * 3 * S * d * sizeof(dtype); floor = bytes / "
        f"{args.peak_tbps} TB/s (measured H200 copy); % of peak: of {args.peak_tbps} TB/s (decode), of "
        f"{args.peak_tflops:g} TFLOP/s on the selected work 2 * T * 3 * S * d * n_active (prefill)",
        "- decode: (graph) = the op captured once in a CUDA graph and replayed (how a decode step runs: GPU time "
        "only, the graph's launch included); (steady) = "
        f"{args.steady_calls} calls in one graph cycling over {args.steady_copies} weight copies, time / calls (the "
        "kernels and the gaps between them as inside a model's decode step, no graph launch, no weights left in L2); "
        "(eager) = a Python call per step (adds the dispatch overhead of the custom op); dense likewise",
        (
            f"- prefill: each row's dense us is the median of {args.prefill_rounds} timings alternating with the row's "
            f"sparse timings (sparse us: the median of those; likewise the (graph) columns, each FFN captured once in "
            "a CUDA graph and replayed: GPU time without the host's launches), so both ran at the same clocks; the "
            "dense FFN at T = "
            "4096 draws the H200's ~690 W cap, its SM clock falling to ~1.5 GHz under sustained load "
            "(bench/results/prefill_clock_diag.md)"
            if args.prefill_rounds > 1
            else "- prefill: dense timed once per shape and token count, before the sparse cases"
        ),
        f"- checks before timing: relative error vs `reference.masked_dense_ffn` in fp32 on up to "
        f"{args.check_tokens} tokens per case (< 2e-2 for bf16), and three runs bitwise equal; total {elapsed:.1f} s",
    ]
    if small:
        lines.append(f"- {', '.join(small)}: the weights (< {L2_BYTES >> 20} MB) fit in the H200's ~60 MB L2; "
                     "do_bench flushes L2 before every call, so these are cold-L2 (HBM) times, as in a model whose "
                     "layers together exceed L2")  # fmt: skip
    lines += env_comparison(ok_rows, dense)
    if dec:
        lines += ["", "## Decode", "", decode_table(dec)]
    if pre:
        lines += ["", "## Prefill", "", prefill_table(pre)]
    if failures:
        lines += ["", f"**{len(failures)} case(s) FAILED (their times are not results):**"]
        for r in failures:
            why = r.get("error", "").strip().splitlines()[-1:] or [
                f"rel err {r['rel_err']:.2e} (tol {r['tol']:g}), deterministic {r['deterministic']}"]  # fmt: skip
            lines.append(f"- {r['shape']} T={r['T']} {r['frac']:.0%}: {why[0]}")
    else:
        lines += ["", f"All {len(rows)} cases passed the correctness and determinism checks."]
    report = "\n".join(lines) + "\n"
    print()
    print(report)
    dense_json = [{"shape": s, "T": t, "dense_us": v} for (s, t), v in dense.items()]
    write_results(args.out, args.name, report, {"environment": env, "dense": dense_json, "rows": rows})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
