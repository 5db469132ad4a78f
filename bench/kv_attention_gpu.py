#!/usr/bin/env python
"""Roofline benchmark of ``prunepath_ops.attention.kv_decode_attention`` against SDPA, for the H200.

Legend: B sequences, Hq query heads, Hkv kv heads, D head dim, S_max cache rows, L_b valid keys.

Shapes (bf16, Hq = 32, Hkv = 8, D = 128, Llama-3-8B attention): B in {1, 8, 32} x context in
{1024, 4096, 16384}, every sequence at that length, S_max = context + 256; plus a ragged batch
(B = 32, one sequence at 16384, the others uniform in [128, 2048], seeded, S_max = 16640), and
caches allocated far longer than their sequences (B = 1 and 8 at 1024 keys in S_max = 16640).

For every case the script

1. checks the op against ``F.scaled_dot_product_attention`` in fp32 over exactly each sequence's
   valid prefix (relative error ``||out - ref|| / ||ref||`` < 2e-2 for bf16/fp16, 1e-4 for fp32),
   that two runs are bitwise equal and that the CUDA-graph replay gives the eager bits; a case
   that fails is reported as FAIL, its times are not results;
2. times, with ``triton.testing.do_bench`` (median, L2 flushed before each call): the op eager,
   the op captured once in a CUDA graph and replayed (decode runs graphed), SDPA's best case
   (uniform lengths only: contiguous ``[B, Hkv, L, D]`` copies of exactly the valid prefix made
   before timing, ``enable_gqa=True`` or kv heads repeated to Hq, whichever is faster; only the
   attention call is timed) and SDPA over the whole ``S_max`` cache with a boolean mask (what a
   static-cache user without a ragged kernel writes; both GQA variants, the faster reported);
3. reports times, the achieved TB/s over the KV bytes actually read
   (``sum_b L_b * Hkv * D * 2 tensors * 2 bytes``), the ratios, and the targets: never slower
   than SDPA's best case by more than 5 %, at B = 1 / 16k at least 3.5 TB/s, the ragged batch at
   least 2x faster than masked SDPA;
4. on CUDA in fp16/bf16, also times torch's bundled FlashAttention-2 (its varlen forward) reading
   the caches in place with ``seqused_k`` (eager, graphed, steady), the baseline a decode server
   on this cache layout has without this library, in a table of its own.

``--cache-layout head`` allocates the caches ``[B, Hkv, S_max, D]`` and passes their
``transpose(1, 2)`` views (the op takes any strides but the last): each kv head's rows are then
contiguous, as in SDPA's copies, which shows how much of the gap to SDPA's best is the layout.

``--sweep`` also times a grid of launcher configurations (``block_n``, ``num_splits`` up to 8x
the default, ``num_warps``, ``num_stages``) at B = 1 / 16k, B = 32 / 1k and B = 32 / 4k through
``kv_decode_attention_triton``'s overrides, each checked against the default configuration and
timed as CUDA-graph replays on the GPU.

It prints markdown tables and writes ``<name>.json`` and ``<name>.md`` (GPU, versions, command
line, date) to ``--out``. Exit status 1 when a case failed its checks, 2 with ``--strict`` when
a target was missed.

    bash bench/gpu_build.sh                                             # once per fresh GPU machine
    python3 bench/kv_attention_gpu.py --out bench/results --sweep      # on the H200, ~2 minutes
    python3 bench/kv_attention_gpu.py --device cpu --tiny --out /tmp/x                   # CPU smoke test
    TRITON_INTERPRET=1 python3 bench/kv_attention_gpu.py --device cpu --tiny --backend triton --sweep --out /tmp/x
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import capture, environment, header_lines, make_timer, write_results  # noqa: E402

from prunepath_ops.attention import kv_decode_attention  # noqa: E402
from prunepath_ops.ffn._env import interpreting  # noqa: E402

H200_COPY_TBPS = 4.24
TARGET_TBPS_B1_16K = 3.5
TARGET_SDPA_SLACK = 1.05  # ours / SDPA best at most this
TARGET_RAGGED_SPEEDUP = 2.0  # masked SDPA / ours at least this ("far faster")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# prealloc: (B, L, S_max) of caches allocated far longer than their sequences (a server's static cache).
FULL = {"Hq": 32, "Hkv": 8, "D": 128, "batches": (1, 8, 32), "contexts": (1024, 4096, 16384), "slack": 256,
        "ragged": (32, 16384, 128, 2048), "prealloc": ((1, 1024, 16640), (8, 1024, 16640)),
        "sweep": ((1, 16384), (32, 1024), (32, 4096))}  # fmt: skip
TINY = {"Hq": 8, "Hkv": 2, "D": 16, "batches": (1, 3), "contexts": (24, 40), "slack": 8,
        "ragged": (3, 40, 3, 12), "prealloc": ((1, 12, 40),), "sweep": ((1, 40),)}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=("cuda", "cpu", "auto"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="B values (default 1 8 32)")
    ap.add_argument("--contexts", type=int, nargs="+", default=None, help="uniform lengths (default 1024 4096 16384)")
    ap.add_argument("--no-ragged", action="store_true", help="skip the ragged batch")
    ap.add_argument("--no-prealloc", action="store_true", help="skip the caches allocated far longer than L")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of launcher configurations")
    ap.add_argument("--steady-calls", type=int, default=20, help="calls per graph of the steady-state timing (0: skip)")
    ap.add_argument("--steady-mb", type=float, default=256.0, help="KV cache copies the steady calls cycle over, MB")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--backend", choices=("auto", "triton", "cpu"), default="auto")
    ap.add_argument(
        "--split-plan",
        choices=("auto", "length", "static"),
        default="auto",
        help="how the Triton kernels cut the key axis (triton_attention.SPLIT_BY_LENGTH): auto, the default (from "
        "the batch's lengths on the device for B > 1 and caches longer than LONG_CACHE, else static); length: always "
        "from the lengths; static: splits per sequence from S_max, each sequence cutting its own keys over them",
    )
    ap.add_argument(
        "--cache-layout",
        choices=("seq", "head"),
        default="seq",
        help="seq: caches allocated [B, S_max, Hkv, D] (flash-attn's); head: allocated [B, Hkv, S_max, D] and "
        "passed as a transposed view, so each kv head's rows are contiguous",
    )
    ap.add_argument("--warmup", type=float, default=None, help="warmup per measurement, ms (default 10)")
    ap.add_argument("--rep", type=float, default=None, help="timed repetitions per measurement, ms (default 50)")
    ap.add_argument("--timer", choices=("auto", "do_bench", "events"), default="auto")
    ap.add_argument("--peak-tbps", type=float, default=H200_COPY_TBPS, help="bandwidth of the floor, TB/s")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    ap.add_argument("--strict", action="store_true", help="exit status 2 when a target is missed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory for <name>.json and <name>.md")
    ap.add_argument("--name", default=None, help="output file stem (default kv_attention_<device>[_tiny])")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device (use --device cpu --tiny for a smoke test)")
    args.shape = TINY if args.tiny else FULL
    args.batches = args.batches or list(args.shape["batches"])
    args.contexts = args.contexts or list(args.shape["contexts"])
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.warmup = args.warmup if args.warmup is not None else 10.0
    args.rep = args.rep if args.rep is not None else (5.0 if args.tiny else 50.0)
    args.name = args.name or f"kv_attention_{args.device}{'_tiny' if args.tiny else ''}"
    return args


# ----------------------------------------------------------------------------- inputs


class Case:
    """Inputs of one case: q ``[B, Hq, D]``, caches ``[B, S_max, Hkv, D]``, lengths ``[B]`` int32."""

    def __init__(self, name: str, lens: list[int], S_max: int, args: argparse.Namespace):
        sh = args.shape
        self.name, self.lens, self.S_max = name, lens, S_max
        self.B, self.Hq, self.Hkv, self.D = len(lens), sh["Hq"], sh["Hkv"], sh["D"]
        self.uniform = len(set(lens)) == 1
        dtype, device = DTYPES[args.dtype], torch.device(args.device)
        gen = torch.Generator(device=device).manual_seed(args.seed + sum(lens))

        def rnd(*shape):
            return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

        self.q = rnd(self.B, self.Hq, self.D)
        if args.cache_layout == "head":  # [B, Hkv, S_max, D] storage seen as [B, S_max, Hkv, D]
            self.k_cache = rnd(self.B, self.Hkv, S_max, self.D).transpose(1, 2)
            self.v_cache = rnd(self.B, self.Hkv, S_max, self.D).transpose(1, 2)
        else:
            self.k_cache = rnd(self.B, S_max, self.Hkv, self.D)
            self.v_cache = rnd(self.B, S_max, self.Hkv, self.D)
        self.seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
        self.kv_bytes = sum(lens) * self.Hkv * self.D * 2 * self.q.element_size()

    def op(self, backend: str) -> Callable[[], torch.Tensor]:
        return lambda: kv_decode_attention(self.q, self.k_cache, self.v_cache, self.seqlens, backend=backend)


def ragged_case(args: argparse.Namespace) -> Case:
    """One long sequence among short ones: B - 1 lengths uniform in [lo, hi], seeded, the long one first."""
    B, long_len, lo, hi = args.shape["ragged"]
    gen = torch.Generator().manual_seed(args.seed + 17)
    short = torch.randint(lo, hi + 1, (B - 1,), generator=gen).tolist()
    return Case(f"ragged B={B} (1 x {long_len}, {B - 1} in [{lo}, {hi}])", [long_len, *short],
                long_len + args.shape["slack"], args)  # fmt: skip


# ----------------------------------------------------------------------------- SDPA baselines


def sdpa_best(case: Case) -> dict[str, Callable[[], torch.Tensor]]:
    """SDPA over exactly the valid prefix (uniform L), inputs prepared contiguous outside the timing."""
    L, G = case.lens[0], case.Hq // case.Hkv
    q = case.q[:, :, None, :]  # [B, Hq, 1, D]
    k = case.k_cache[:, :L].transpose(1, 2).contiguous()  # [B, Hkv, L, D]
    v = case.v_cache[:, :L].transpose(1, 2).contiguous()  # [B, Hkv, L, D]
    kr, vr = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # [B, Hq, L, D]
    return {
        "enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "repeat_kv": lambda: F.scaled_dot_product_attention(q, kr, vr),
    }


def sdpa_masked(case: Case) -> dict[str, Callable[[], torch.Tensor]]:
    """SDPA over the whole cache ``[B, *, S_max, D]`` with a boolean mask of the valid keys."""
    G = case.Hq // case.Hkv
    q = case.q[:, :, None, :]
    k = case.k_cache.transpose(1, 2).contiguous()  # [B, Hkv, S_max, D]
    v = case.v_cache.transpose(1, 2).contiguous()
    kr, vr = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # [B, Hq, S_max, D]
    mask = torch.arange(case.S_max, device=q.device)[None, :] < case.seqlens[:, None].long()  # [B, S_max]
    mask = mask[:, None, None, :]  # [B, 1, 1, S_max]
    return {
        "enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
        "repeat_kv": lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask),
    }


def flash_in_place(case: Case, k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None):
    """torch's bundled FlashAttention-2 (its varlen forward) reading the caches in place, or None.

    What a decode server does with flash-attn on a static cache, and the fastest baseline a user of
    this layout has without this library: the B queries as B segments of one token, the caches as
    B segments of ``S_max`` rows (``cu_seqlens_k = b * S_max``, static) of which ``seqused_k =
    cache_seqlens`` are valid; no copy, ragged lengths included. CUDA and fp16/bf16 only; None
    where it does not apply.
    """
    k_cache = case.k_cache if k_cache is None else k_cache
    v_cache = case.v_cache if v_cache is None else v_cache
    if not case.q.is_cuda or case.q.dtype == torch.float32 or not k_cache.is_contiguous():
        return None  # the varlen call needs each sequence's rows contiguous: not the head-major layout
    B, S = case.B, case.S_max
    cu_q = torch.arange(B + 1, dtype=torch.int32, device=case.q.device)  # one query token per sequence
    cu_k = cu_q * S  # sequence b's rows start at b * S_max
    k = k_cache.view(B * S, case.Hkv, case.D)
    v = v_cache.view(B * S, case.Hkv, case.D)
    scale = 1.0 / math.sqrt(case.D)

    def fn() -> torch.Tensor:  # [B, Hq, D]
        return torch.ops.aten._flash_attention_forward(
            case.q, k, v, cu_q, cu_k, 1, S, 0.0, False, False, scale=scale, seqused_k=case.seqlens
        )[0]

    return fn


def run_flash(case: Case, row: dict, ref: torch.Tensor, args: argparse.Namespace, timer) -> None:
    """Adds FlashAttention-2 in place (eager, graphed, steady) to ``row``, or why it could not run."""
    fn = flash_in_place(case)
    if fn is None:
        return
    try:
        err = rel_err(fn(), ref)
        if not err < row["tol"]:
            row["flash_error"] = f"rel err {err:.1e}"
            return
        row["flash_us"] = timer(fn)[0] * 1e3
        row["flash_graph_us"] = timer(capture(fn)[0])[0] * 1e3
        row["graph_ratio_flash"] = row["graph_us"] / row["flash_graph_us"]
        if args.steady_calls > 0 and "steady_copies" in row:
            n, copies = args.steady_calls, row["steady_copies"]
            fns = [fn] + [flash_in_place(case, case.k_cache.clone(), case.v_cache.clone()) for _ in range(copies - 1)]

            def steady():
                for i in range(n):
                    fns[i % copies]()

            row["flash_steady_us"] = timer(capture(steady)[0])[0] * 1e3 / n
            row["steady_ratio_flash"] = row["steady_us"] / row["flash_steady_us"]
    except (RuntimeError, TypeError) as exc:  # this torch built without flash, or another schema
        row["flash_error"] = repr(exc)[:200]


def fastest(fns: dict[str, Callable[[], torch.Tensor]], timer, expected: torch.Tensor) -> tuple[str | None, float]:
    """(variant, median ms) of the fastest variant whose output matches ``expected``; failures are skipped."""
    best: tuple[str | None, float] = (None, float("inf"))
    for name, fn in fns.items():
        try:
            if rel_err(fn()[:, :, 0], expected) > 2e-2:
                continue
            med, _, _ = timer(fn)
        except (RuntimeError, TypeError):  # a variant this torch or backend does not support
            continue
        if med < best[1]:
            best = (name, med)
    return best


# ----------------------------------------------------------------------------- checks


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def sdpa_reference(case: Case) -> torch.Tensor:
    """``[B, Hq, D]`` fp32: SDPA in fp32 over each sequence's valid prefix (zeros for L_b = 0)."""
    G = case.Hq // case.Hkv
    out = torch.zeros(case.B, case.Hq, case.D, dtype=torch.float32, device=case.q.device)
    for b, n in enumerate(case.lens):
        if n == 0:
            continue
        k = case.k_cache[b, :n].float().transpose(0, 1).repeat_interleave(G, dim=0)  # [Hq, L, D]
        v = case.v_cache[b, :n].float().transpose(0, 1).repeat_interleave(G, dim=0)  # [Hq, L, D]
        out[b] = F.scaled_dot_product_attention(case.q[b].float()[:, None, :], k, v)[:, 0]
    return out


# ----------------------------------------------------------------------------- steady state


def steady_state(case: Case, args: argparse.Namespace, timer) -> dict:
    """Device time per call with ``--steady-calls`` calls in one CUDA graph (us), ours and SDPA best.

    The calls cycle over copies of the caches (as many as make ``--steady-mb`` MB, up to 8), so the
    KV bytes come from HBM as they do when every layer has its own cache; the graph's own launch,
    which a single captured call pays in full, is spread over the calls. SDPA best gets the same
    treatment on copies of its contiguous valid prefix (uniform lengths only).
    """
    n = args.steady_calls
    per_copy = 2 * case.k_cache.numel() * case.k_cache.element_size()
    copies = max(1, min(8, math.ceil(args.steady_mb * 2**20 / per_copy)))
    caches = [(case.k_cache, case.v_cache)] + [(case.k_cache.clone(), case.v_cache.clone()) for _ in range(copies - 1)]

    def ours():
        for i in range(n):
            kc, vc = caches[i % copies]
            kv_decode_attention(case.q, kc, vc, case.seqlens, backend=args.backend)

    out = {"steady_copies": copies, "steady_us": timer(capture(ours)[0])[0] * 1e3 / n}
    if case.uniform:
        L, q = case.lens[0], case.q[:, :, None, :]
        prefixes = [(k[:, :L].transpose(1, 2).contiguous(), v[:, :L].transpose(1, 2).contiguous()) for k, v in caches]

        def sdpa():
            for i in range(n):
                k, v = prefixes[i % copies]
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        try:
            out["sdpa_steady_us"] = timer(capture(sdpa)[0])[0] * 1e3 / n
        except (RuntimeError, TypeError):  # enable_gqa missing on this torch: no steady SDPA number
            pass
    return out


# ----------------------------------------------------------------------------- one case


def run_case(case: Case, args: argparse.Namespace, timer) -> dict:
    row = {"case": case.name, "B": case.B, "lens_sum": sum(case.lens), "L_max": max(case.lens), "S_max": case.S_max,
           "uniform": case.uniform, "kv_bytes": case.kv_bytes,
           "floor_us": case.kv_bytes / (args.peak_tbps * 1e12) * 1e6}  # fmt: skip
    if args.backend == "triton" or (args.device == "cuda" and args.backend == "auto"):
        from prunepath_ops.attention.triton_attention import launch_config, length_split_plan, sequence_split

        cfg = launch_config(case.B, case.Hkv, case.S_max, case.D, case.q.device)
        row.update({f"cfg_{k}": v for k, v in cfg.items()})
        if cfg["by_length"]:
            plan = length_split_plan(case.lens, case.Hkv, case.S_max, cfg["fill"], cfg["min_chunk"], cfg["num_splits"],
                                     cfg["block_n"])  # fmt: skip
            row["plan_max_splits"], row["plan_max_chunk"] = max(plan)
            row["plan_programs"] = case.Hkv * sum(ns for ns, _ in plan)
        else:  # the static plan: each sequence cuts its own keys over the grid's splits
            used = [sequence_split(n, cfg["num_splits"], cfg["min_chunk"], cfg["block_n"]) for n in case.lens]
            row["plan_max_splits"], row["plan_max_chunk"] = max(used)
    op = case.op(args.backend)
    ref = sdpa_reference(case)
    out = op()
    row["rel_err"] = rel_err(out, ref)
    row["tol"] = 1e-4 if out.dtype == torch.float32 else 2e-2
    row["deterministic"] = torch.equal(op(), out)
    replay = None
    if args.device == "cuda":
        replay, graph_out = capture(op)
        replay()
        torch.cuda.synchronize()
        row["graph_matches_eager"] = torch.equal(graph_out, out)
    ok = bool(torch.isfinite(out).all()) and row["rel_err"] < row["tol"] and row["deterministic"]
    row["check_ok"] = ok and row.get("graph_matches_eager", True)
    suffix = "" if row["check_ok"] else "_unchecked"  # a failed case's time is not a result
    med, p20, p80 = timer(op)
    row.update({"ours_us" + suffix: med * 1e3, "ours_us_p20" + suffix: p20 * 1e3, "ours_us_p80" + suffix: p80 * 1e3})
    if replay is not None:
        med, _, _ = timer(replay)
        row["graph_us" + suffix] = med * 1e3
    if not row["check_ok"]:
        return row
    row["TBps"] = case.kv_bytes / (row["ours_us"] * 1e-6) / 1e12
    if "graph_us" in row:
        row["graph_TBps"] = case.kv_bytes / (row["graph_us"] * 1e-6) / 1e12
    if case.uniform:
        variant, ms = fastest(sdpa_best(case), timer, ref)
        if variant is not None:
            row.update({"sdpa_best_us": ms * 1e3, "sdpa_best_variant": variant})
            row["ratio_sdpa_best"] = row["ours_us"] / row["sdpa_best_us"]
            if "graph_us" in row:
                row["graph_ratio_sdpa_best"] = row["graph_us"] / row["sdpa_best_us"]
    if replay is not None and args.steady_calls > 0:
        try:
            row.update(steady_state(case, args, timer))
            row["steady_TBps"] = case.kv_bytes / (row["steady_us"] * 1e-6) / 1e12
            if "sdpa_steady_us" in row:
                row["steady_ratio_sdpa"] = row["steady_us"] / row["sdpa_steady_us"]
        except Exception as exc:  # e.g. out of memory for the copies: keep the other columns
            row["steady_error"] = repr(exc)[:300]
    variant, ms = fastest(sdpa_masked(case), timer, ref)
    if variant is not None:
        row.update({"sdpa_masked_us": ms * 1e3, "sdpa_masked_variant": variant})
        row["speedup_sdpa_masked"] = row["sdpa_masked_us"] / row["ours_us"]
    if replay is not None:
        run_flash(case, row, ref, args, timer)
    return row


# ----------------------------------------------------------------------------- sweep


def c_is_cuda(case) -> bool:
    """Whether the case runs on the GPU (sweep timings are graphed there)."""
    return case.q.is_cuda


def sweep_configs(args: argparse.Namespace, B: int, S_max: int) -> list[dict]:
    """Launcher overrides to try: tiles x warps x stages x {the static plan's splits, half, double, ...}.

    A forced split count always runs the static plan; where the default is the length plan, the
    default itself (no override, ``{}``) is timed as well.
    """
    from prunepath_ops.attention.triton_attention import launch_config

    sh = args.shape
    dev = torch.device(args.device)
    default_by_length = launch_config(B, sh["Hkv"], S_max, sh["D"], dev)["by_length"]
    out = [{}] if default_by_length else []
    if args.tiny:
        base = launch_config(B, sh["Hkv"], S_max, sh["D"], dev, split_by_length=False)["num_splits"]
        return out + [{"num_splits": ns} for ns in sorted({1, 2, base})]
    for block_n in (64, 128):
        auto = launch_config(B, sh["Hkv"], S_max, sh["D"], dev, block_n=block_n, split_by_length=False)["num_splits"]
        # Up to 8x the default split count: more programs per SM keep more KV bytes in flight.
        for ns in sorted({1, max(1, auto // 2), auto, 2 * auto, 4 * auto, 8 * auto}):
            for warps in (4, 8):
                for stages in (2, 3):
                    out.append({"block_n": block_n, "num_splits": ns, "num_warps": warps, "num_stages": stages})
    return out


def run_sweep(args: argparse.Namespace, timer) -> list[dict]:
    from prunepath_ops.attention.triton_attention import kv_decode_attention_triton, launch_config

    rows = []
    for B, L in args.shape["sweep"]:
        case = Case(f"B={B} L={L}", [L] * B, L + args.shape["slack"], args)
        default = launch_config(B, case.Hkv, case.S_max, case.D, case.q.device)
        expected = case.op("triton")()
        for cfg in sweep_configs(args, B, case.S_max):

            def fn(cfg=cfg, c=case):
                return kv_decode_attention_triton(c.q, c.k_cache, c.v_cache, c.seqlens, None, None, None, **cfg)

            row = {"case": case.name, **cfg}
            # With the length plan as the default only the override-free row is the default.
            row["is_default"] = cfg == {} or (
                not default["by_length"] and all(default.get(k) == v for k, v in cfg.items())
            )
            if cfg == {}:
                row["note"] = "splits from the lengths"
            try:
                row["rel_err_vs_default"] = rel_err(fn(), expected.float())
                if row["rel_err_vs_default"] > 2e-2:
                    row["error"] = "differs from the default configuration"
                else:
                    # Graphed on the GPU: the launch overhead (~10 us eager) would hide the kernels' differences.
                    med, _, _ = timer(capture(fn)[0] if c_is_cuda(case) else fn)
                    row["us"] = med * 1e3
                    row["TBps"] = case.kv_bytes / (med * 1e-3) / 1e12
            except Exception as exc:  # e.g. out of shared memory for a large tile and many stages
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rows.append(row)
            print(f"sweep {case.name} {cfg}: " + (f"{row['us']:.1f} us" if "us" in row else row["error"]), flush=True)
        del case
        gc.collect()
    return rows


# ----------------------------------------------------------------------------- report


def _f(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def _us(r: dict, key: str) -> str:
    if key in ("ours_us", "graph_us") and not r.get("check_ok", False):
        return "FAIL"
    v = r.get(key)
    return "-" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def case_table(rows: list[dict]) -> str:
    head = ("| case | S_max | splits x chunk | ours us | TB/s | graphed us | TB/s | SDPA best us | ours / SDPA best "
            "| graphed / SDPA best | steady us | TB/s | SDPA steady us | steady / SDPA steady | SDPA masked us "
            "| masked / ours | floor us | rel err |")  # fmt: skip
    out = [head, "|---|" + "---:|" * 17]
    for r in rows:
        plan = "-"
        if "cfg_num_splits" in r:  # the longest sequence's splits used x keys, of the grid's splits per sequence
            plan = f"{r['plan_max_splits']} x {r['plan_max_chunk']} of {r['cfg_num_splits']}"
        if r.get("cfg_by_length"):  # the kernels' plan from the lengths: the most-split sequence's splits x keys
            plan = f"by length: {r['plan_max_splits']} x {r['plan_max_chunk']}"
        out.append(
            f"| {r['case']} | {r['S_max']} | {plan} | {_us(r, 'ours_us')} | {_f(r.get('TBps'), '.2f')} "
            f"| {_us(r, 'graph_us')} | {_f(r.get('graph_TBps'), '.2f')} | {_us(r, 'sdpa_best_us')} "
            f"| {_f(r.get('ratio_sdpa_best'), '.2f')} | {_f(r.get('graph_ratio_sdpa_best'), '.2f')} "
            f"| {_us(r, 'steady_us')} | {_f(r.get('steady_TBps'), '.2f')} | {_us(r, 'sdpa_steady_us')} "
            f"| {_f(r.get('steady_ratio_sdpa'), '.2f')} | {_us(r, 'sdpa_masked_us')} | {_f(r.get('speedup_sdpa_masked'), '.1f', 'x')} "
            f"| {_us(r, 'floor_us')} | {_f(r.get('rel_err'), '.1e')} |"
        )
    return "\n".join(out)


def flash_table(rows: list[dict]) -> str:
    out = ["| case | flash us | flash graphed us | graphed / flash graphed | flash steady us | steady / flash steady "
           "| note |", "|---|" + "---:|" * 6]  # fmt: skip
    for r in rows:
        if "flash_us" in r or "flash_error" in r:
            out.append(
                f"| {r['case']} | {_us(r, 'flash_us')} | {_us(r, 'flash_graph_us')} | {_f(r.get('graph_ratio_flash'), '.2f')} "
                f"| {_us(r, 'flash_steady_us')} | {_f(r.get('steady_ratio_flash'), '.2f')} | {r.get('flash_error', '')} |"
            )
    return "\n".join(out) if len(out) > 2 else ""


def sweep_table(rows: list[dict]) -> str:
    out = ["| case | block_n | splits | warps | stages | us | TB/s | default | note |", "|---|" + "---:|" * 8]
    for r in sorted(rows, key=lambda r: (r["case"], r.get("us", float("inf")))):
        out.append(
            f"| {r['case']} | {r.get('block_n', '-')} | {r.get('num_splits', '-')} | {r.get('num_warps', '-')} "
            f"| {r.get('num_stages', '-')} | {_us(r, 'us')} | {_f(r.get('TBps'), '.2f')} "
            f"| {'yes' if r['is_default'] else ''} | {r.get('error', r.get('note', ''))} |"
        )
    return "\n".join(out)


def targets(rows: list[dict], args: argparse.Namespace) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each target the run covers; eager and graphed both listed."""
    out = []
    for r in rows:
        if not r.get("check_ok"):
            continue
        for mode, us_key, tb_key in (("eager", "ours_us", "TBps"), ("graphed", "graph_us", "graph_TBps")):
            if us_key not in r:
                continue
            if r.get("sdpa_best_us") is not None:
                ratio = r[us_key] / r["sdpa_best_us"]
                out.append((f"{r['case']} {mode}: ours <= {TARGET_SDPA_SLACK:g} x SDPA best", f"{ratio:.2f}x",
                            ratio <= TARGET_SDPA_SLACK))  # fmt: skip
            if not args.tiny and r["B"] == 1 and r["L_max"] == 16384 and r["uniform"]:
                out.append((f"{r['case']} {mode}: >= {TARGET_TBPS_B1_16K} TB/s", f"{r[tb_key]:.2f} TB/s",
                            r[tb_key] >= TARGET_TBPS_B1_16K))  # fmt: skip
            if not r["uniform"] and r.get("sdpa_masked_us") is not None:
                speedup = r["sdpa_masked_us"] / r[us_key]
                out.append((f"{r['case']} {mode}: >= {TARGET_RAGGED_SPEEDUP:g}x faster than masked SDPA",
                            f"{speedup:.1f}x", speedup >= TARGET_RAGGED_SPEEDUP))  # fmt: skip
    return out


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.split_plan != "auto":
        from prunepath_ops.attention import triton_attention

        triton_attention.SPLIT_BY_LENGTH = args.split_plan == "length"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")  # the fp32 oracle must not use TF32
    timer_desc, timer = make_timer(args)
    env = environment(args, timer_desc)
    env["backend"] = args.backend
    where = env.get("gpu") or env["cpu"]
    sh = args.shape
    print(f"# kv_decode_attention vs SDPA on {where} ({args.device}, {args.dtype})")
    print(f"torch {env['torch']}, CUDA {env['torch_cuda']}, triton {env['triton']}; timer: {timer_desc}")
    print(f"command: {env['command']}\n", flush=True)

    rows, failures = [], []
    start = time.perf_counter()
    with torch.inference_mode():
        builders = [lambda B=B, L=L: Case(f"B={B} L={L}", [L] * B, L + sh["slack"], args)
                    for L in args.contexts for B in args.batches]  # fmt: skip
        if not args.no_ragged:
            builders.append(lambda: ragged_case(args))
        if not args.no_prealloc:
            builders += [lambda B=B, L=L, S=S: Case(f"B={B} L={L} in S_max={S}", [L] * B, S, args)
                         for B, L, S in sh["prealloc"]]  # fmt: skip
        for build in builders:
            case = None
            try:
                case = build()
                row = run_case(case, args, timer)
            except Exception:  # one crash should not hide the other cases
                row = {"case": case.name if case else "?", "check_ok": False, "error": traceback.format_exc(limit=4)}
            rows.append(row)
            if not row["check_ok"]:
                failures.append(row)
                why = row.get("error") or f"rel err {row['rel_err']:.2e}, deterministic {row['deterministic']}, " \
                    f"graph matches eager {row.get('graph_matches_eager')}"  # fmt: skip
                print(f"{row['case']}: FAIL {why}", flush=True)
            else:
                print(f"{row['case']}: ours {_us(row, 'ours_us')} us ({row['TBps']:.2f} TB/s), graphed "
                      f"{_us(row, 'graph_us')} us, SDPA best {_us(row, 'sdpa_best_us')} us, SDPA masked "
                      f"{_us(row, 'sdpa_masked_us')} us, flash graphed {_us(row, 'flash_graph_us')} us "
                      f"{row.get('flash_error', '')}, rel err {row['rel_err']:.1e}", flush=True)  # fmt: skip
            del case
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
        sweep = []
        if args.sweep and (args.device == "cuda" or interpreting()):
            sweep = run_sweep(args, timer)
        elif args.sweep:
            print("--sweep: the Triton kernels need a GPU or TRITON_INTERPRET=1; skipped", flush=True)
    elapsed = time.perf_counter() - start

    met = targets(rows, args)
    lines = [
        *header_lines(f"kv_decode_attention on {where}", env, args),
        f"- {args.dtype}, Hq = {sh['Hq']}, Hkv = {sh['Hkv']}, D = {sh['D']}, q / caches randn, S_max = L_max + "
        f"{sh['slack']}; ours: `kv_decode_attention(q, k_cache, v_cache, cache_seqlens, backend='{args.backend}')` "
        "(no append), eager and captured once in a CUDA graph then replayed",
        "- cache layout: "
        + (
            "`[B, S_max, Hkv, D]` allocated as such (each row holds every kv head)"
            if args.cache_layout == "seq"
            else "head-major: allocated `[B, Hkv, S_max, D]` and passed as its `transpose(1, 2)` "
            "view (each kv head's rows contiguous; the op takes any strides but the last)"
        ),
        "- split plan: "
        + {
            "auto": "the default: from the lengths on the device for B > 1 and caches longer than `LONG_CACHE`, "
            "else static",
            "length": "from the lengths on the device (`SPLIT_BY_LENGTH = True`)",
            "static": "static (`SPLIT_BY_LENGTH = False`)",
        }[args.split_plan]
        + "; static: the grid's splits per sequence come from S_max and each sequence cuts its own keys over "
        "them (`sequence_split`; the column shows the longest sequence's splits used x keys, of the grid's); "
        "a length-planned case shows its most-split sequence's splits x keys",
        "- SDPA best (uniform lengths only): `F.scaled_dot_product_attention` on contiguous `[B, Hkv, L, D]` copies "
        "of exactly the valid prefix made before timing, with `enable_gqa=True` or with kv heads repeated to Hq "
        "(copies made before timing), the faster of the two; only the attention call is timed",
        "- SDPA masked: the same over the whole `[B, *, S_max, D]` cache with a boolean `[B, 1, 1, S_max]` mask",
        f"- steady: {args.steady_calls} calls in one CUDA graph cycling over copies of the caches (about "
        f"{args.steady_mb:g} MB, at most 8 copies), time / calls: the kernels and the gaps between them as in a "
        "model's decode step, without the graph's launch and with the KV bytes coming from HBM; SDPA steady: "
        "the enable_gqa form the same way",
        f"- TB/s over the KV bytes actually read, sum_b L_b * Hkv * D * 2 tensors * sizeof(dtype); floor = bytes / "
        f"{args.peak_tbps} TB/s (measured H200 copy)",
        "- checks before timing: relative error vs fp32 SDPA over each valid prefix (< 2e-2 for bf16), two runs "
        f"bitwise equal, graph replay equal to eager; total {elapsed:.1f} s",
        "",
        "## Cases",
        "",
        case_table([r for r in rows if "error" not in r]),
    ]
    variants = sorted({f"{r['case']}: best {r.get('sdpa_best_variant') or '-'}, masked {r.get('sdpa_masked_variant')}"
                       for r in rows if "sdpa_masked_variant" in r})  # fmt: skip
    if variants:
        lines += ["", "SDPA variant timed (the faster GQA form per case):", ""] + [f"- {v}" for v in variants]
    flash = flash_table([r for r in rows if "error" not in r])
    if flash:
        lines += ["", "## FlashAttention-2 in place (a baseline beside SDPA)", "",
                  "torch's bundled FlashAttention-2 varlen forward (`torch.ops.aten._flash_attention_forward`) on the "
                  "caches in place: q as B segments of one token, the caches as B segments of S_max rows with "
                  "`seqused_k = cache_seqlens` (what a decode server runs on a static cache; ragged included, no "
                  "copies); checked against the fp32 reference like ours; eager, graphed and steady as above.", "",
                  flash]  # fmt: skip
    if met:
        lines += ["", "## Targets", "", "| target | measured | met |", "|---|---:|---|"]
        lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in met]
    if sweep:
        lines += ["", "## Sweep (launcher overrides, graphed on the GPU, fastest first)", "", sweep_table(sweep)]
    if failures:
        lines += ["", f"**{len(failures)} case(s) FAILED (their times are not results):**"]
        for r in failures:
            why = r.get("error", "").strip().splitlines()[-1:] or [f"rel err {r.get('rel_err')}"]
            lines.append(f"- {r['case']}: {why[0]}")
    else:
        lines += ["", f"All {len(rows)} cases passed the correctness, determinism and graph checks."]
    report = "\n".join(lines) + "\n"
    print()
    print(report)
    targets_json = [{"target": t, "measured": m, "met": ok} for t, m, ok in met]
    write_results(
        args.out, args.name, report, {"environment": env, "rows": rows, "sweep": sweep, "targets": targets_json}
    )
    if failures:
        return 1
    return 2 if args.strict and not all(ok for _, _, ok in met) else 0


if __name__ == "__main__":
    sys.exit(main())
