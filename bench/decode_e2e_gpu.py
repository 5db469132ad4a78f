#!/usr/bin/env python
"""End-to-end decode throughput of a Llama-3-8B-shaped model: dense oracle vs PrunePath, eager vs CUDA graph.

Model: 32 layers, d=4096, F=14336, GQA 32/8, head_dim 128, vocab 128256, bf16, random weights
(normal, std 0.02, drawn on the GPU; norm weights 1). Batch 1, a 512-token random prompt, 256 new
greedy tokens; KV cache of prompt + new tokens rows.

Configurations, in this order (one model, converted in place between the dense and PrunePath ones):

1. ``dense-eager-sdpa``: the dense oracle, eager ``Llama.decode_step(attn="sdpa")`` (fewer tokens:
   ``--eager-tokens``);
2. ``dense-graph-sdpa``: the same step captured in a CUDA graph (``GraphedDecoder``); SDPA reads the
   whole cache (S_max rows) under the mask;
3. ``dense-graph-kernel``: dense FFNs, attention through ``prunepath_ops.attention.kv_decode_attention``
   (valid rows only), graphed; skipped when the fused op is not built;
4. ``prunepath-30-graph`` / ``prunepath-50-graph``: ``to_prunepath`` (S = 32, E = 448, sigmoid
   gate), routers N(0, 1/d) so router logits are about N(0, 1), tau calibrated per layer on the
   prompt (``convert.calibrate_tau_per_layer``: bisection on each layer's measured active fraction
   during a prefill of the prompt) to 30 % / 50 % of the experts; kernel attention (SDPA when the
   fused op is missing), graphed. Both fractions replay ONE captured graph: tau lives in a device
   buffer, so changing it needs no recapture.

Measurements:

- decode tokens/s: a greedy loop (step, argmax, position += 1, as ``generate`` does) of N tokens
  between two CUDA events, median over ``--reps`` loops; prefill (``model(prompt, 0)``) timed
  separately with the timer of ``topp_route_gpu.make_timer``;
- the active fraction during decode (every layer's ``num_active / E`` over the first
  ``--eager-tokens`` decode tokens, recorded in an eager run: same tokens as the graphed run);
- peak memory: ``torch.cuda.max_memory_allocated`` per configuration (reset before it; weights,
  KV cache, graph pool, activations);
- per-step time split, eager, ``--profile-steps`` steps under ``torch.profiler``: decode step, the
  attention block (QKV/O projections, RoPE, cache write, attention core), the router (router linear
  + ``topp_route``), the FFN expert compute (``sparse_ffn``, or the dense ``LlamaMLP``), and the
  rest (embedding, norms, residuals, LM head); each is the GPU kernel time the profiler attributes
  to a ``record_function`` range around that code (kernels launched inside it, children included);
- checks: a graphed step's logits against the eager step's (relative L2 error), kernel attention
  against SDPA, greedy tokens of the graphed loop against the eager loop;
- the bytes-per-token ideal: weights read per token (attention, FFN or its active experts plus the
  router, LM head, embedding row) plus the KV rows attention reads, over ``--peak-tbps``.

Writes ``<name>.json`` and ``<name>.md`` (command line, GPU, versions, date) to ``--out``.

    bash bench/gpu_build.sh                                      # once per fresh GPU machine
    python3 bench/decode_e2e_gpu.py --out bench/results           # on the H200, ~2-4 minutes
    python3 bench/decode_e2e_gpu.py --device cpu --tiny --out /tmp/x   # CPU smoke test (eager only)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import math
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import environment, header_lines, make_timer, write_results  # noqa: E402

from prunepath_ops import modules as pp_modules  # noqa: E402
from prunepath_ops.convert.calibrate import (  # noqa: E402
    calibrate_tau_per_layer,
    ffn_sparsity,
    make_measure_fn,
    record_num_active,
)
from prunepath_ops.decode_step.ops import cuda_gemv_built  # noqa: E402
from prunepath_ops.models import GraphedDecoder, Llama, LlamaConfig, LlamaMLP, to_prunepath  # noqa: E402
from prunepath_ops.models import llama as llama_mod  # noqa: E402

H200_COPY_TBPS = 4.24
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LLAMA3_8B = dict(vocab=128256, d=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn=14336, head_dim=128,
                 rope_theta=500000.0)  # fmt: skip
TINY = dict(vocab=256, d=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=512, head_dim=16)
SPLIT_KEYS = ("attention", "attention_core", "router", "ffn_experts", "lm_head")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=("cuda", "cpu", "auto"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model, short prompt (CPU smoke test)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 512; tiny 32)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode tokens per graphed loop (default 256)")
    ap.add_argument("--eager-tokens", type=int, default=None, help="decode tokens of eager loops (default 64)")
    ap.add_argument("--reps", type=int, default=3, help="timed graphed loops per configuration (median)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5], help="experts active (PrunePath)")
    ap.add_argument("--expert-width", type=int, default=32)
    ap.add_argument("--router-std", type=float, default=None, help="router weight std (default 1/sqrt(d))")
    ap.add_argument("--calib-tol", type=float, default=0.01, help="calibration tolerance on the active fraction")
    ap.add_argument("--profile-steps", type=int, default=8, help="eager steps under torch.profiler for the split")
    ap.add_argument("--warmup", type=float, default=None, help="prefill timer warmup, ms (default 50; tiny 5)")
    ap.add_argument("--rep", type=float, default=None, help="prefill timer repetitions, ms (default 300; tiny 20)")
    ap.add_argument("--timer", choices=("auto", "do_bench", "events"), default="auto")
    ap.add_argument("--peak-tbps", type=float, default=H200_COPY_TBPS, help="bandwidth of the ideal, TB/s")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    ap.add_argument("--compile", action="store_true",
                    help="graphed configurations capture torch.compile(decode_step, fullgraph=True) (names end in -compiled)")  # fmt: skip
    ap.add_argument("--compile-both", action="store_true",
                    help="every graphed configuration twice, plain and compiled, on one model (one calibration)")  # fmt: skip
    ap.add_argument(
        "--opbyop",
        action="store_true",
        help="also time the graphed steps with Llama.fused_decode False (elementwise work op by op)",
    )
    ap.add_argument(
        "--routerop",
        action="store_true",
        help="also time the graphed PrunePath steps with PrunePathMLP.fused_router False (router GEMV + topp_route)",
    )
    ap.add_argument(
        "--routernorm",
        action="store_true",
        help="also time the graphed PrunePath steps with Llama.fused_router_norm True (the FFN's RMSNorm "
        "inside the router kernel, norm_linear_topp_route)",
    )
    ap.add_argument(
        "--cublasproj",
        action="store_true",
        help="also time the graphed kernel-attention steps with the attention projections through "
        "cuBLAS (Attention.decode_gemv False) instead of decode_linear's CUDA kernel (the default at batch 1)",
    )
    ap.add_argument(
        "--ropeop",
        action="store_true",
        help="also time the graphed kernel-attention steps with RoPE as its own launch (rope_qkv, "
        "Attention.rope_in_attention False) instead of inside kv_decode_attention; rows -ropeop",
    )
    ap.add_argument(
        "--attn-min-chunk",
        type=int,
        default=None,
        help="diagnostic: fewest keys per split of kv_decode_attention's split plan "
        "(prunepath_ops.attention.triton_attention.MIN_CHUNK) for this run",
    )
    ap.add_argument(
        "--attn-split-by-length",
        action="store_true",
        help="kv_decode_attention plans its splits from the lengths on the device "
        "(prunepath_ops.attention.triton_attention.SPLIT_BY_LENGTH) in this run",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory for <name>.json and <name>.md")
    ap.add_argument("--name", default=None, help="output file stem (default decode_e2e_<device>[_tiny])")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device (use --device cpu --tiny for a smoke test)")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.prompt = args.prompt or (32 if args.tiny else 512)
    args.new_tokens = args.new_tokens or (8 if args.tiny else 256)
    args.eager_tokens = min(args.eager_tokens or (8 if args.tiny else 64), args.new_tokens)
    args.warmup = args.warmup if args.warmup is not None else (5.0 if args.tiny else 50.0)
    args.rep = args.rep if args.rep is not None else (20.0 if args.tiny else 300.0)
    args.name = args.name or f"decode_e2e_{args.device}{'_tiny' if args.tiny else ''}"
    # torch.compile'd graphs are a CUDA-only configuration here (CPU runs are eager).
    cuda = args.device == "cuda"
    args.modes = [False, True] if args.compile_both and cuda else [bool(args.compile and cuda)]
    return args


# ----------------------------------------------------------------------------- model


def build_model(args) -> Llama:
    """Random-weight model built directly on the device in the target dtype (no fp32 CPU copy of 8B weights)."""
    shape = TINY if args.tiny else LLAMA3_8B
    cfg = LlamaConfig(**shape, max_seq_len=args.prompt + args.new_tokens)
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[args.dtype])
    try:
        with torch.device(args.device):
            model = Llama(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.setup_cache(1, cfg.max_seq_len)
    return model


def convert(model: Llama, args) -> list:
    """PrunePath FFNs in place (each dense FFN is freed as it is replaced) with N(0, 1/d)-scaled routers."""
    mlps = to_prunepath(model, args.expert_width, tau=1.05, gate="sigmoid")
    d = model.config.d
    std = args.router_std if args.router_std is not None else 1.0 / math.sqrt(d)
    gen = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    with torch.no_grad():
        for m in mlps:
            m.router.weight.normal_(0.0, std, generator=gen)
    _free(args)
    return mlps


def _free(args) -> None:
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()


def _sync(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- decode loop


def decode_loop(step, first: torch.Tensor, start: int, n: int, args) -> tuple[torch.Tensor, float]:
    """``n`` greedy steps from token ``first [1]`` at position ``start``; returns (tokens [n], seconds).

    The same work per token as ``generate``'s loop (step, pick, advance the position on the device).
    """
    tok = first.clone()
    pos = torch.full((1,), start, dtype=torch.int32, device=first.device)  # [B]
    out = torch.empty(n, dtype=torch.long, device=first.device)
    _sync(args)
    if args.device == "cuda":
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
    wall = time.perf_counter()
    for i in range(n):
        logits = step(tok, pos)  # [B, V]
        tok = logits.argmax(dim=-1)
        out[i] = tok[0]
        pos += 1
    if args.device == "cuda":
        t1.record()
        torch.cuda.synchronize()
        return out, t0.elapsed_time(t1) / 1e3
    return out, time.perf_counter() - wall


def prefill(model, prompt, timer) -> tuple[torch.Tensor, float]:
    """The first new token (greedy) and the prefill time in ms (median of the timer)."""
    first = model(prompt, 0, last_only=True)[:, -1].argmax(dim=-1)  # [B]
    med, _, _ = timer(lambda: model(prompt, 0, last_only=True))
    return first, med


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def with_attr(objs, name: str, value, fn):
    """``fn()`` with ``obj.<name> = value`` on every object, each restored afterwards (an A/B row)."""
    saved = [getattr(o, name) for o in objs]
    for o in objs:
        setattr(o, name, value)
    try:
        return fn()
    finally:
        for o, v in zip(objs, saved, strict=True):
            setattr(o, name, v)


# ----------------------------------------------------------------------------- time split


@contextlib.contextmanager
def annotated(model: Llama):
    """``record_function`` ranges around the parts of the decode step that the split reports."""
    rf = torch.profiler.record_function

    def ranged(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            with rf(f"split::{name}"):
                return fn(*a, **kw)

        return wrapper

    patched = []  # (object, attribute, original or None for an instance attribute to delete)
    for layer in model.layers:
        layer.attn.decode = ranged("attention", layer.attn.decode)
        patched.append((layer.attn, "decode", None))
        layer.attn.decode_fused = ranged("attention", layer.attn.decode_fused)
        patched.append((layer.attn, "decode_fused", None))
        if isinstance(layer.ffn, LlamaMLP):
            layer.ffn.forward = ranged("ffn_experts", layer.ffn.forward)
            patched.append((layer.ffn, "forward", None))
        else:  # PrunePathMLP.forward unfused: self.router(x) (the linear), then self._route(logits) (topp_route)
            layer.ffn.router.forward = ranged("router", layer.ffn.router.forward)
            patched.append((layer.ffn.router, "forward", None))
            layer.ffn._route = ranged("router", layer.ffn._route)
            patched.append((layer.ffn, "_route", None))
    model.lm_head.forward = ranged("lm_head", model.lm_head.forward)
    patched.append((model.lm_head, "forward", None))
    originals = [
        (pp_modules, "sparse_ffn"),
        (llama_mod, "attention"),
        (llama_mod, "_decode_attention_op"),
        (pp_modules, "linear_topp_route"),  # the fused router (PrunePathMLP.fused_router, CUDA decode)
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name in originals]
    pp_modules.sparse_ffn = ranged("ffn_experts", saved[0][2])
    llama_mod.attention = ranged("attention_core", saved[1][2])
    pp_modules.linear_topp_route = ranged("router", saved[3][2])
    core_op = saved[2][2]()
    llama_mod._decode_attention_op = lambda: ranged("attention_core", core_op)
    try:
        yield
    finally:
        for obj, name, _ in patched:
            delattr(obj, name)
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def time_split(model, first, start: int, attn: str, args) -> dict:
    """Per-step kernel time (us) of each part of an eager decode step, from torch.profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    step = functools.partial(model.decode_step, attn=attn)
    decode_loop(step, first, start, 2, args)  # warm
    n = args.profile_steps

    def stepped(tok, pos):
        with torch.profiler.record_function("split::step"):
            return step(tok, pos)

    with annotated(model), torch.profiler.profile(activities=activities) as prof:
        _, seconds = decode_loop(stepped, first, start, n, args)
    key = "device_time_total" if args.device == "cuda" else "cpu_time_total"
    totals = dict.fromkeys(("step", *SPLIT_KEYS), 0.0)
    for ev in prof.events():
        if ev.name.startswith("split::") and ev.device_type == torch.autograd.DeviceType.CPU:
            totals[ev.name.removeprefix("split::")] += getattr(ev, key)
    split = {k: v / n for k, v in totals.items()}  # us per step
    kernels: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CPU and not ev.name.startswith("split::"):
            kernels[ev.name] = kernels.get(ev.name, 0.0) + ev.device_time_total / n
    split["top_kernels_us"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:8])
    split["rest"] = split["step"] - split["attention"] - split["router"] - split["ffn_experts"]
    split["eager_wall_us"] = seconds / n * 1e6
    what = "GPU kernel time (device_time_total)" if args.device == "cuda" else "CPU time (cpu_time_total)"
    split["method"] = f"torch.profiler over {n} eager steps; {what} of the work inside record_function ranges, per step"
    return split


# ----------------------------------------------------------------------------- bytes per token


def bytes_per_token(cfg: LlamaConfig, fraction: float, kv_rows: float, elem: int, experts: int) -> dict:
    """Bytes one decode token must read: weights (active experts only when sparse) and the KV rows attended."""
    d, L, D = cfg.d, cfg.n_layers, cfg.head_dim
    attn_w = (2 * d * cfg.n_heads * D + 2 * d * cfg.n_kv_heads * D) * elem * L
    ffn_w = 3 * d * cfg.ffn * elem * L * fraction
    router_w = experts * d * elem * L  # experts = 0: a dense FFN has no router
    head = cfg.vocab * d * elem + d * elem  # LM head, one embedding row
    kv = 2 * kv_rows * cfg.n_kv_heads * D * elem * L
    total = attn_w + ffn_w + router_w + head + kv
    return {"attention_weights": attn_w, "ffn_weights": ffn_w, "router_weights": router_w, "lm_head_embed": head,
            "kv_cache": kv, "total": total}  # fmt: skip


# ----------------------------------------------------------------------------- configurations


def fused_attention_available() -> bool:
    return not llama_mod._decode_attention_op().__module__.startswith("prunepath_ops.reference")


def measure_active(model, mlps, first, start: int, attn: str, args) -> float:
    """Mean fraction of experts active over the layers and the first eager-tokens decode tokens."""
    with record_num_active(mlps) as rec:
        decode_loop(functools.partial(model.decode_step, attn=attn), first, start, args.eager_tokens, args)
    return 1.0 - ffn_sparsity([torch.cat(r) for r in rec], mlps[0].w_down.shape[0])


def run_config(
    name: str, model, prompt, attn: str, graphed: bool, args, timer, decoder=None, extra=None, compiled=False
):
    """Prefill, then timed decode loops; returns (row, the GraphedDecoder or None, the first new token [1])."""
    row = {"config": name, "attn": attn, "graphed": graphed, **(extra or {})}
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    T = prompt.shape[1]
    first, row["prefill_ms"] = prefill(model, prompt, timer)
    row["prefill_tok_s"] = T / (row["prefill_ms"] / 1e3)
    eager_step = functools.partial(model.decode_step, attn=attn)
    if graphed and args.device == "cuda":
        if decoder is None:
            t0 = time.perf_counter()
            decoder = GraphedDecoder(model, attn, compile=compiled)
            row["capture_s"] = time.perf_counter() - t0
        n = args.new_tokens
        # Check: one replayed step against the eager step (same position, same cache row rewritten).
        pos = torch.full((1,), T, dtype=torch.int32, device=prompt.device)
        row["graph_vs_eager_rel_err"] = rel_err(decoder(first, pos).clone(), eager_step(first, pos))
        decode_loop(decoder, first, T, min(8, n), args)  # warm
        runs = [decode_loop(decoder, first, T, n, args) for _ in range(args.reps)]
        seconds = sorted(s for _, s in runs)[len(runs) // 2]
        tokens = runs[0][0]
        eager_tokens, _ = decode_loop(eager_step, first, T, args.eager_tokens, args)
        row["tokens_equal_eager"] = bool(torch.equal(tokens[: args.eager_tokens], eager_tokens))
    else:
        n = args.eager_tokens
        decode_loop(eager_step, first, T, min(4, n), args)  # warm
        tokens, seconds = decode_loop(eager_step, first, T, n, args)
    row["decode_tokens"] = n
    row["decode_tok_s"] = n / seconds
    row["ms_per_token"] = seconds / n * 1e3
    row["peak_mem_GB"] = torch.cuda.max_memory_allocated() / 1e9 if args.device == "cuda" else None
    row["first_tokens"] = tokens[:8].tolist()
    return row, decoder, first


def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['config']}: ERROR {r['error'].strip().splitlines()[-1]}", flush=True)
        return
    mem = f", peak {r['peak_mem_GB']:.2f} GB" if r.get("peak_mem_GB") is not None else ""
    act = f", active {r['active_fraction']:.1%}" if r.get("active_fraction") is not None else ""
    print(f"{r['config']}: decode {r['decode_tok_s']:.1f} tok/s ({r['ms_per_token']:.2f} ms/token, "
          f"{r['decode_tokens']} tokens), prefill {r['prefill_ms']:.1f} ms{act}{mem}", flush=True)  # fmt: skip


def run_all(args, timer) -> tuple[list[dict], dict, LlamaConfig, bool]:
    rows, splits = [], {}
    gen = torch.Generator(device=args.device).manual_seed(args.seed + 2)
    model = build_model(args)
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab, (1, args.prompt), device=args.device, generator=gen)  # [B, T]
    T = args.prompt
    fused = fused_attention_available()
    kernel_ok = fused or args.device != "cuda"  # the reference cannot be captured
    sparse_attn = "kernel" if kernel_ok else "sdpa"

    def attempt(fn, name):
        try:
            return fn()
        except Exception:  # one failing configuration should not hide the others
            rows.append({"config": name, "error": traceback.format_exc(limit=4)})
            _print_row(rows[-1])
            return None

    def dense(name, attn, graphed, split_attn=None, compiled=False):
        row, decoder, first = run_config(name, model, prompt, attn, graphed, args, timer, compiled=compiled)
        if attn == "kernel":  # the two attention paths on one step, same cache and position
            pos = torch.full((1,), T, dtype=torch.int32, device=args.device)
            row["kernel_vs_sdpa_rel_err"] = rel_err(
                model.decode_step(first, pos, attn="kernel"), model.decode_step(first, pos, attn="sdpa")
            )
        rows.append(row)
        _print_row(row)
        del decoder
        if split_attn:
            splits[name] = time_split(model, first, T, split_attn, args)
        _free(args)

    def cublasproj(fn):  # the attention projections through F.linear (cuBLAS) instead of decode_linear
        return with_attr([layer.attn for layer in model.layers], "decode_gemv", False, fn)

    def opbyop(fn):  # the decode step's elementwise work op by op (Llama.fused_decode False), as before
        return with_attr([model], "fused_decode", False, fn)

    def ropeop(fn):  # RoPE as rope_qkv's own launch before the attention op
        return with_attr([layer.attn for layer in model.layers], "rope_in_attention", False, fn)

    with torch.no_grad():
        attempt(lambda: dense("dense-eager-sdpa", "sdpa", False, split_attn="sdpa"), "dense-eager-sdpa")
        for compiled in args.modes:
            suffix = "-compiled" if compiled else ""
            name = "dense-graph-sdpa" + suffix
            if not (
                compiled and kernel_ok
            ):  # compiled, the kernel-attention dense run is the baseline (one compile less)
                attempt(lambda n=name, c=compiled: dense(n, "sdpa", True, compiled=c), name)
            if kernel_ok:
                name = "dense-graph-kernel" + suffix
                split = "kernel" if compiled == args.modes[0] else None
                attempt(lambda n=name, sp=split, c=compiled: dense(n, "kernel", True, split_attn=sp, compiled=c), name)
                if args.opbyop and not compiled:
                    attempt(lambda: opbyop(lambda: dense("dense-graph-kernel-opbyop", "kernel", True)), "opbyop")
                if args.cublasproj and not compiled:
                    attempt(lambda: cublasproj(lambda: dense("dense-graph-kernel-cublasproj", "kernel", True)),
                            "cublasproj")  # fmt: skip
                if args.ropeop and not compiled:
                    attempt(lambda: ropeop(lambda: dense("dense-graph-kernel-ropeop", "kernel", True)), "ropeop")
        mlps = convert(model, args)
        decoders = {}
        for frac in args.fractions:
            name = f"prunepath-{round(frac * 100)}-graph"

            def sparse(frac=frac, name=name):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    measure = make_measure_fn(mlps, lambda: model(prompt, 0, last_only=True), per_layer=True)
                    res = calibrate_tau_per_layer(measure, len(mlps), 1.0 - frac, tol=args.calib_tol)
                for m, r in zip(mlps, res, strict=True):
                    m.tau = r.tau
                first = model(prompt, 0, last_only=True)[:, -1].argmax(dim=-1)
                extra = {
                    "target_fraction": frac,
                    "taus": [r.tau for r in res],
                    "calibrated_fraction": 1.0 - sum(r.sparsity for r in res) / len(res),
                    "calibration_warnings": [str(w.message) for w in caught],
                    "active_fraction": measure_active(model, mlps, first, T, sparse_attn, args),
                }
                for compiled in args.modes:
                    suffix = "-compiled" if compiled else ""
                    x = {**extra, "recaptured": compiled not in decoders}
                    row, decoders[compiled], first = run_config(
                        name + suffix,
                        model,
                        prompt,
                        sparse_attn,
                        True,
                        args,
                        timer,
                        decoders.get(compiled),
                        x,
                        compiled,
                    )
                    rows.append(row)
                    _print_row(row)
                splits[name + ("-compiled" if args.modes[0] else "")] = time_split(model, first, T, sparse_attn, args)
                if args.opbyop and False in args.modes:
                    row, _, _ = opbyop(lambda: run_config(name + "-opbyop", model, prompt, sparse_attn, True, args, timer,
                                                          None, extra, False))  # fmt: skip
                    rows.append(row)
                    _print_row(row)
                if args.cublasproj and False in args.modes:
                    row, _, _ = cublasproj(lambda: run_config(name + "-cublasproj", model, prompt, sparse_attn, True,
                                                            args, timer, None, extra, False))  # fmt: skip
                    rows.append(row)
                    _print_row(row)
                if args.ropeop and False in args.modes:
                    row, _, _ = ropeop(lambda: run_config(name + "-ropeop", model, prompt, sparse_attn, True, args,
                                                          timer, None, extra, False))  # fmt: skip
                    rows.append(row)
                    _print_row(row)
                if args.routernorm and False in args.modes:  # the FFN's norm inside the router kernel
                    row, _, _ = with_attr([model], "fused_router_norm", True, lambda: run_config(
                        name + "-routernorm", model, prompt, sparse_attn, True, args, timer, None, extra, False))  # fmt: skip
                    rows.append(row)
                    _print_row(row)
                if args.routerop and False in args.modes:  # router GEMV + topp_route instead of linear_topp_route
                    row, _, _ = with_attr(mlps, "fused_router", False, lambda: run_config(
                        name + "-routerop", model, prompt, sparse_attn, True, args, timer, None, extra, False))  # fmt: skip
                    rows.append(row)
                    _print_row(row)

            attempt(sparse, name)
        decoders.clear()  # frees the graphs
    return rows, splits, cfg, fused


# ----------------------------------------------------------------------------- report


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _split_plan_text(args, cfg) -> str:
    from prunepath_ops.attention import triton_attention

    plan = triton_attention.launch_config(1, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim, torch.device(args.device))
    return (f"{plan['num_splits']} splits x {plan['chunk']} keys (MIN_CHUNK {triton_attention.MIN_CHUNK}, "
            f"block_n {plan['block_n']})")  # fmt: skip


def report(args, env, rows, splits, cfg, fused, ideal, elapsed) -> str:
    ok = [r for r in rows if "error" not in r]
    by = {r["config"]: r for r in ok}
    lines = [
        *header_lines(f"End-to-end decode on {env.get('gpu') or env['cpu']}", env, args),
        f"- model: {cfg.n_layers} layers, d={cfg.d}, F={cfg.ffn}, GQA {cfg.n_heads}/{cfg.n_kv_heads}, D={cfg.head_dim}, "
        f"V={cfg.vocab}, {args.dtype}, random weights N(0, 0.02); batch 1, prompt {args.prompt} tokens, "
        f"KV cache {cfg.max_seq_len} rows",
        f"- decode: greedy loop of {args.new_tokens} tokens (graphed, median of {args.reps} loops) or "
        f"{args.eager_tokens} tokens (eager: fewer, to bound the run time), timed with "
        f"{'CUDA events' if args.device == 'cuda' else 'time.perf_counter (CPU: no graphs, every loop eager)'}; "
        f"prefill: {env['timer']}",
        "- kernel attention: "
        + (
            "fused prunepath_ops.attention.kv_decode_attention, " + _split_plan_text(args, cfg)
            if fused
            else "NOT BUILT: reference fallback (not capturable); kernel configurations skipped on CUDA, "
            "PrunePath uses SDPA"
        ),
        "- attention projections of the kernel-attention steps at batch 1: "
        + (
            "decode_linear's CUDA GEMV (prunepath::decode_gemv; rows -cublasproj: cuBLAS)"
            if cuda_gemv_built()
            else "cuBLAS (F.linear; the package has no CUDA kernels)"
        ),
        f"- PrunePath: S={args.expert_width}, E={cfg.ffn // args.expert_width}, sigmoid gate, routers N(0, 1/d); "
        "tau per layer calibrated on the prompt's prefill (bisection on the measured active fraction); "
        "active fraction measured on the eager decode tokens; one CUDA graph for all fractions (tau is a buffer)",
        f"- total run time {elapsed:.0f} s",
        "",
        "| config | attention | graphed | active | prefill ms | prefill tok/s | decode tok/s | ms/token "
        "| ideal tok/s | % of ideal | peak GB | graph vs eager | tokens = eager |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in ok:
        ide = ideal.get(r["config"], {}).get("tok_s")
        pct = 100 * r["decode_tok_s"] / ide if ide else None
        act = r.get("active_fraction", 1.0)
        lines.append(
            f"| {r['config']} | {r['attn']} | {'yes' if r['graphed'] and args.device == 'cuda' else 'no'} "
            f"| {act:.1%} | {r['prefill_ms']:.1f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} "
            f"| {r['ms_per_token']:.2f} | {_f(ide, '.0f')} | {_f(pct, '.0f')} | {_f(r.get('peak_mem_GB'), '.2f')} "
            f"| {_f(r.get('graph_vs_eager_rel_err'), '.1e')} | {r.get('tokens_equal_eager', '-')} |"
        )
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | ERROR: {r['error'].strip().splitlines()[-1]} |")
    lines += ["", "## Ratios", ""]
    best_dense = max((r for r in ok if r["config"].startswith("dense")), key=lambda r: r["decode_tok_s"], default=None)
    for r in ok:
        if not r["config"].startswith("prunepath"):
            continue
        # Against the dense oracle run the same way (graphed, same attention, compiled or not).
        suffix = next((x for x in ("-compiled", "-opbyop", "-cublasproj", "-ropeop") if r["config"].endswith(x)), "")
        dense_kernel = "dense-graph-kernel" + suffix
        dense_same = by.get(dense_kernel if fused or args.device != "cuda" else "dense-graph-sdpa" + suffix)
        if dense_same:
            ratio = r["decode_tok_s"] / dense_same["decode_tok_s"]
            default_path = suffix not in ("-opbyop", "-cublasproj", "-ropeop") and not r["config"].endswith("-routerop")
            verdict = " (target >= 1.7x)" if r.get("target_fraction") == 0.3 and default_path else ""
            lines.append(f"- {r['config']} / {dense_same['config']}: **{ratio:.2f}x**{verdict}; ideal "
                         f"{ideal[r['config']]['tok_s'] / ideal[dense_same['config']]['tok_s']:.2f}x (bytes per token)")  # fmt: skip
        if best_dense and best_dense is not dense_same:
            lines.append(f"- {r['config']} / {best_dense['config']} (fastest dense): "
                         f"{r['decode_tok_s'] / best_dense['decode_tok_s']:.2f}x")  # fmt: skip
    for r in ok:  # the decode step's elementwise work fused (the default) against op by op, same run
        if r["config"].endswith("-opbyop") and r["config"].removesuffix("-opbyop") in by:
            fused_row = by[r["config"].removesuffix("-opbyop")]
            lines.append(f"- {fused_row['config']} / {r['config']} (fused residual adds, norms, RoPE): "
                         f"{fused_row['decode_tok_s'] / r['decode_tok_s']:.2f}x")  # fmt: skip
        if r["config"].endswith("-cublasproj") and r["config"].removesuffix("-cublasproj") in by:
            gemv_row, cublas_row = by[r["config"].removesuffix("-cublasproj")], r
            lines.append(f"- {gemv_row['config']} / {cublas_row['config']} (attention projections by decode_linear "
                         f"instead of cuBLAS): {gemv_row['decode_tok_s'] / cublas_row['decode_tok_s']:.2f}x")  # fmt: skip
        if r["config"].endswith("-ropeop") and r["config"].removesuffix("-ropeop") in by:
            base_row = by[r["config"].removesuffix("-ropeop")]
            lines.append(f"- {base_row['config']} / {r['config']} (RoPE inside kv_decode_attention instead of "
                         f"rope_qkv's launch): {base_row['decode_tok_s'] / r['decode_tok_s']:.2f}x")  # fmt: skip
        if r["config"].endswith("-routerop") and r["config"].removesuffix("-routerop") in by:
            fused_row = by[r["config"].removesuffix("-routerop")]
            lines.append(f"- {fused_row['config']} / {r['config']} (fused router, linear_topp_route): "
                         f"{fused_row['decode_tok_s'] / r['decode_tok_s']:.2f}x")  # fmt: skip
        if r["config"].endswith("-routernorm") and r["config"].removesuffix("-routernorm") in by:
            base_row = by[r["config"].removesuffix("-routernorm")]
            lines.append(f"- {r['config']} / {base_row['config']} (the FFN's norm inside the router kernel, "
                         f"norm_linear_topp_route): {r['decode_tok_s'] / base_row['decode_tok_s']:.2f}x")  # fmt: skip
    for name in ("dense-graph-kernel", "dense-graph-kernel-compiled"):
        if "kernel_vs_sdpa_rel_err" in by.get(name, {}):
            lines.append(f"- kernel vs SDPA attention, one dense step's logits ({name}): rel err "
                         f"{by[name]['kernel_vs_sdpa_rel_err']:.1e}")  # fmt: skip
    lines += ["", "## Bytes per token (ideal)", "",
              "| config | attention W MB | FFN W MB | router MB | LM head + embed row MB | KV MB | total MB | ideal tok/s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, b in ideal.items():
        mb = {k: v / 1e6 for k, v in b.items() if k != "tok_s"}
        lines.append(f"| {name} | {mb['attention_weights']:.0f} | {mb['ffn_weights']:.0f} | {mb['router_weights']:.0f} "
                     f"| {mb['lm_head_embed']:.0f} | {mb['kv_cache']:.1f} | {mb['total']:.0f} | {b['tok_s']:.0f} |")  # fmt: skip
    lines.append(f"\nKV: SDPA reads all {cfg.max_seq_len} cache rows, the kernel the valid ones "
                 f"(mean {args.prompt + args.new_tokens / 2:.0f}); ideal tok/s = {args.peak_tbps} TB/s / total.")  # fmt: skip
    if splits:
        method = next(iter(splits.values()))["method"]
        lines += ["", "## Time split per decode step (eager)", "", f"Method: {method}. Attention is the whole block "
                  "(QKV/O projections, RoPE, cache write, core); router = router linear + topp_route; FFN = "
                  "sparse_ffn (PrunePath) or the dense LlamaMLP; rest = step - the three (embedding, norms, "
                  "residuals, LM head).", "",
                  "| config | step us | attention us (core) | router us | FFN experts us | rest us (LM head) "
                  "| eager wall us/step |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, s in splits.items():
            lines.append(f"| {name} | {s['step']:.0f} | {s['attention']:.0f} ({s['attention_core']:.0f}) "
                         f"| {s['router']:.0f} | {s['ffn_experts']:.0f} | {s['rest']:.0f} ({s['lm_head']:.0f}) "
                         f"| {s['eager_wall_us']:.0f} |")  # fmt: skip
        for name, s in splits.items():
            if s["top_kernels_us"]:
                top = "; ".join(f"`{k[:60]}` {v:.0f}" for k, v in s["top_kernels_us"].items())
                lines.append(f"\n{name}, top GPU kernels (us/step): {top}")
    for r in ok:
        if r.get("calibration_warnings"):
            lines.append(f"\n{r['config']} calibration: {'; '.join(r['calibration_warnings'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.attn_min_chunk is not None:
        from prunepath_ops.attention import triton_attention

        triton_attention.MIN_CHUNK = args.attn_min_chunk
    if args.attn_split_by_length:
        from prunepath_ops.attention import triton_attention

        triton_attention.SPLIT_BY_LENGTH = True
    timer_desc, timer = make_timer(args)
    env = environment(args, timer_desc)
    print(f"# decode e2e on {env.get('gpu') or env['cpu']} ({args.device}, {args.dtype})")
    print(f"torch {env['torch']}, CUDA {env['torch_cuda']}, triton {env['triton']}; command: {env['command']}\n",
          flush=True)  # fmt: skip
    start = time.perf_counter()
    rows, splits, cfg, fused = run_all(args, timer)
    elapsed = time.perf_counter() - start

    elem = DTYPES[args.dtype].itemsize
    ideal = {}
    for r in rows:
        if "error" in r:
            continue
        frac = r.get("active_fraction", 1.0)
        kv_rows = cfg.max_seq_len if r["attn"] == "sdpa" else args.prompt + args.new_tokens / 2
        experts = cfg.ffn // args.expert_width if r["config"].startswith("prunepath") else 0
        b = bytes_per_token(cfg, frac, kv_rows, elem, experts)
        b["tok_s"] = args.peak_tbps * 1e12 / b["total"]
        ideal[r["config"]] = b
    text = report(args, env, rows, splits, cfg, fused, ideal, elapsed)
    print()
    print(text)
    payload = {"environment": env, "args": dict(vars(args)), "rows": rows, "splits": splits,
               "ideal_bytes_per_token": ideal, "fused_attention": fused}  # fmt: skip
    write_results(args.out, args.name, text, payload)
    failed = [r for r in rows if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
