"""Command line: ``prunepath <command>`` (also ``python -m prunepath_ops <command>``).

Commands: ``demo`` (seconds, offline: one random FFN routed at several tau; ``demo --full``: the
issue-5 pipeline on SmolLM2), ``convert``, ``train``, ``calibrate``, ``eval``, ``generate``, ``bench``
and ``info``. Every command has ``--help``; ``--fast`` uses a tiny random model and a built-in text
(CI, seconds). Errors print one line ``prunepath <command>: error: ...`` and exit with status 1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

import prunepath_ops as pp
from prunepath_ops import reference
from prunepath_ops.models.llama import LlamaMLP


def _show_routing(logits: torch.Tensor, tau: float) -> None:
    route = pp.topp_route(logits, tau, gate="prob")
    print(f"\ntopp_route(logits [{logits.shape[0]}, {logits.shape[1]}], tau={tau}, gate='prob'):")
    p = reference.routing_probabilities(logits)
    for t in range(logits.shape[0]):
        n = int(route.num_active[t])
        ids = route.expert_ids[t, :n].tolist()
        mass = float(p[t, route.expert_ids[t, :n].long()].sum()) if n else 0.0
        print(
            f"  token {t}: {n} expert(s) {ids}  kept mass {mass:.3f}  gates {[round(g, 3) for g in route.gates[t, :n].tolist()]}"
        )


def _fit_router(packed: pp.PackedExperts, x_cal: torch.Tensor) -> torch.Tensor:
    """A training-free router (MoEfication style): least squares from x to log ||FFN_e(x)||."""
    S = packed.expert_width
    g = torch.einsum("td,esd->tes", x_cal, packed.w_in)  # [T, E, 2S]
    h = torch.nn.functional.silu(g[..., :S]) * g[..., S:]  # [T, E, S]
    norms = torch.einsum("tes,esd->ted", h, packed.w_down).norm(dim=-1)  # [T, E]
    return torch.linalg.lstsq(x_cal, torch.log(norms + 1e-6)).solution.T.contiguous()  # [E, d]


def demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    print(f"prunepath_ops {pp.__version__}, torch {torch.__version__}, backends {pp.backends()}")
    d, F, S, T = args.hidden, args.ffn, args.expert_width, args.tokens
    E = F // S
    dense = LlamaMLP(d, F).eval()
    mlp = pp.PrunePathMLP.from_dense(dense, expert_width=S, gate="one").eval()
    with torch.no_grad():
        mlp.router.weight.copy_(_fit_router(mlp.packed, torch.randn(4 * d, d)))
    x = torch.randn(T, d)
    with torch.no_grad():
        mlp(x[:1])  # first call: kernel and op warm-up stay out of the timings
        logits = mlp.router(x)
        _show_routing(logits[:4], 0.5)
        y_dense = dense(x)
        print(f"\nSwiGLU FFN d={d}, F={F} -> E={E} experts of S={S} neurons; {T} tokens; gate='one'")
        print(f"{'tau':>6} {'experts/token':>14} {'s_FFN':>7} {'rel. error vs dense':>20} {'ms/call':>8}")
        for tau in args.taus:
            mlp.tau = tau
            start = time.perf_counter()
            y = mlp(x)
            ms = (time.perf_counter() - start) * 1e3
            n = mlp.route(x).num_active.float()
            err = float((y - y_dense).norm() / y_dense.norm())
            print(f"{tau:>6.2f} {float(n.mean()):>14.1f} {1 - float(n.mean()) / E:>7.2f} {err:>20.2e} {ms:>8.2f}")
    print(
        "\nWith tau >= 1 and gate 'one' the sparse FFN equals the dense one; lowering tau skips experts. "
        "The router here is fitted without training (least squares on each expert's output norm) on a random "
        "FFN; trained routers on real models keep far more quality per skipped expert (SPEC.md section 5)."
    )
    return 0


# -- shared helpers of the model commands ----------------------------------------------------
FAST_SOURCE = "fast:tiny"
FAST_WINDOW, FAST_STRIDE = 64, 32


class CLIError(Exception):
    """An expected failure: printed as one line, exit status 1."""


def _check_tau(tau: float, what: str = "--tau") -> float:
    if not (math.isfinite(tau) and 0.0 <= tau <= 1.05):
        raise CLIError(f"bad {what} {tau}: tau must be a finite number in [0, 1.05] (tau >= 1 keeps every expert)")
    return float(tau)


def _fast_model():
    from prunepath_ops.models import Llama, LlamaConfig

    torch.manual_seed(0)
    return Llama(LlamaConfig.tiny(max_seq_len=128)).eval()


class _ByteTokenizer:
    """The tokenizer of the --fast mode: one token per byte (ASCII)."""

    def __call__(self, text: str) -> list[int]:
        from prunepath_ops.evaluate.data import byte_tokens

        return byte_tokens(text)

    def decode(self, ids) -> str:
        from prunepath_ops.evaluate.data import byte_detokenize

        return byte_detokenize(ids)


def _device(args: argparse.Namespace) -> torch.device:
    """``--device``: ``auto`` (the default) is the first CUDA GPU when torch sees one, else the CPU."""
    name = getattr(args, "device", None) or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"bad --device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"bad --device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: torch {torch.__version__} sees no CUDA GPU (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _load_dense(model_path: str | None, fast: bool, device: torch.device | str = "cpu"):
    """``(model, tokenizer, source)`` for the dense model: tiny random with --fast, else a GGUF file or an HF dir."""
    model, tok, source = _load_dense_cpu(model_path, fast)
    return model.to(device), tok, source


def _load_dense_cpu(model_path: str | None, fast: bool):
    if fast or model_path == FAST_SOURCE:
        return _fast_model(), _ByteTokenizer(), FAST_SOURCE
    from prunepath_ops.models import default_model_path, from_gguf, from_hf, load_tokenizer

    try:
        path = model_path or default_model_path()
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    if not os.path.exists(path):
        raise CLIError(f"model file not found: {path}")
    try:
        if os.path.isdir(path):
            from transformers import AutoTokenizer

            return from_hf(path), AutoTokenizer.from_pretrained(path), os.path.abspath(path)
        return from_gguf(path), load_tokenizer(path), os.path.abspath(path)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CLIError(f"cannot load model {path}: {type(e).__name__}: {msg[:300]}") from None


def _load_prunepath(checkpoint: str, model_path: str | None, fast: bool, device: torch.device | str = "cpu"):
    """``(model, tokenizer, meta)``: the dense source model with the checkpoint's PrunePath FFNs applied."""
    from prunepath_ops.convert import CheckpointError, apply_checkpoint, load_checkpoint

    if not os.path.isdir(checkpoint):
        raise CLIError(f"checkpoint directory not found: {checkpoint} (write one with `prunepath convert`)")
    try:
        loaded = load_checkpoint(checkpoint)
    except (FileNotFoundError, CheckpointError) as e:
        raise CLIError(str(e)) from None
    source = model_path or loaded.config.get("source_model")
    model, tok, _ = _load_dense_cpu(source, fast or source == FAST_SOURCE)
    try:
        apply_checkpoint(model, loaded)
    except (AttributeError, ValueError, KeyError) as e:
        raise CLIError(f"checkpoint {checkpoint} does not fit model {source}: {e}") from None
    return model.to(device).eval(), tok, loaded


def _text_path(args) -> str | None:
    from prunepath_ops.evaluate.data import default_text_path

    if getattr(args, "fast", False) and not args.text:
        return None
    if args.text:
        if not os.path.isfile(args.text):
            raise CLIError(f"text file not found: {args.text}")
        return args.text
    return default_text_path()


def _tokens(args, tok, split: tuple[float, float]) -> torch.Tensor:
    """Tokens of the ``split`` fraction of the text's lines (the built-in text with --fast or when none is found)."""
    from prunepath_ops.evaluate.data import BUILTIN_TEXT, _split_lines, encode, text_tokens

    path = _text_path(args)
    if path is None:
        return encode(tok, _split_lines(BUILTIN_TEXT.replace(". ", ".\n"), split))
    return text_tokens(path, tok, split)


def _save(model, out: str, meta_config: dict, permutations=None, *, with_backbone: bool = False) -> None:
    """Write the checkpoint; ``with_backbone``: also the non-FFN parameters (fine-tuned, or loaded so)."""
    from prunepath_ops.convert import backbone_parameters, save_checkpoint

    backbone = backbone_parameters(model) if with_backbone else None
    save_checkpoint(out, model, meta_config, permutations, backbone=backbone)


def _routed(model) -> list:
    return [m for m in model.modules() if isinstance(m, pp.PrunePathMLP)]


def _ckpt_config(loaded) -> dict:
    cfg = dict(loaded.config.get("config") or {})
    cfg.setdefault("source_model", loaded.config.get("source_model"))
    return cfg


# -- convert -----------------------------------------------------------------------------------
def convert(args: argparse.Namespace) -> int:
    from prunepath_ops.convert import convert_model, fit_router_lstsq
    from prunepath_ops.models import LlamaMLP

    model, tok, source = _load_dense(args.model, args.fast, _device(args))
    S = args.expert_width or (16 if source == FAST_SOURCE else 32)
    if model.config.ffn % S:
        raise CLIError(f"--expert-width {S} does not divide the FFN width {model.config.ffn}")
    start = time.perf_counter()
    perms = convert_model(
        model, S, args.seed, find=lambda n, m: isinstance(m, LlamaMLP), progress=not args.no_progress,
        gate=args.gate, tau=1.05,
    )  # fmt: skip
    if args.router == "lstsq":
        calib = _tokens(args, tok, (0.0, 0.8))[: args.calib_tokens]
        inputs = _ffn_inputs(model, calib)
        for m, x in zip(_routed(model), inputs, strict=True):
            fit_router_lstsq(m, x, log_mass=True)
    _save(model, args.out, {"source_model": source, "router": args.router, "expert_width": S}, perms)
    E = model.config.ffn // S
    print(f"converted {len(perms)} FFNs of {source} into {E} experts of {S} neurons ({args.router} router, "
          f"gate {args.gate}) in {time.perf_counter() - start:.1f} s -> {args.out}")  # fmt: skip
    return 0


@torch.no_grad()
def _ffn_inputs(model, tokens: torch.Tensor, window: int | None = None) -> list[torch.Tensor]:
    """Each FFN's input hidden states on ``tokens`` (dense forward: tau >= 1, gates as configured)."""
    window = min(window or 512, model.config.max_seq_len)
    mods = _routed(model)
    xs: list[list[torch.Tensor]] = [[] for _ in mods]
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, i=i: xs[i].append(a[0].reshape(-1, a[0].shape[-1]).detach()))
        for i, m in enumerate(mods)
    ]
    saved = [m.tau for m in mods]
    try:
        for m in mods:
            m.tau = 1.05
        model.clear_cache()
        for s in range(0, len(tokens), window):
            chunk = tokens[s : s + window]
            if len(chunk):
                model(chunk[None].to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        for m, t in zip(mods, saved, strict=True):
            m.tau = t
    return [torch.cat(x) for x in xs]


# -- train -------------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> int:
    try:
        from prunepath_ops.train import TrainConfig, train_routers
    except ImportError as e:
        raise CLIError(f"training is not available in this build (prunepath_ops.train: {e})") from None
    _check_tau(args.tau_min, "--tau-min")
    model, tok, loaded = _load_prunepath(args.checkpoint, args.model, args.fast, _device(args))
    if args.gate != "keep":
        for m in _routed(model):
            m.gate = args.gate
    _apply_expert_bounds(model, args)  # trained under the bounds, and saved with them
    if args.straight_through:
        if any(m.gate != "one" for m in _routed(model)):
            raise CLIError("--straight-through needs gate 'one' (add --gate one)")
        for m in _routed(model):
            m.straight_through = True  # training only: not saved, values unchanged
    tokens = _tokens(args, tok, (0.0, 0.8))
    seq_len = min(args.seq_len, model.config.max_seq_len)
    val = None
    if args.eval_every < 0:
        raise CLIError(f"--eval-every must be >= 0; got {args.eval_every}")
    if args.eval_every:
        if not 0.0 < args.val_fraction < 1.0:
            raise CLIError(f"--val-fraction must be in (0, 1); got {args.val_fraction}")
        n_val = int(len(tokens) * args.val_fraction)
        if n_val < seq_len + 1 or len(tokens) - n_val < seq_len + 1:
            raise CLIError(f"--val-fraction {args.val_fraction} leaves too few tokens for --seq-len {seq_len} "
                           f"({len(tokens)} training tokens in all)")  # fmt: skip
        tokens, val = tokens[:-n_val], tokens[-n_val:]  # the tail of the training split, never the eval text
    try:
        val_sparsities = tuple(_floats(args.val_sparsities))
    except ValueError:
        raise CLIError(f"--val-sparsities must be a comma list of numbers; got {args.val_sparsities!r}") from None
    if not all(0.0 <= x < 1.0 for x in val_sparsities):
        raise CLIError(f"--val-sparsities must be s_FFN targets in [0, 1); got {args.val_sparsities}")
    if not (args.eta >= 0 and args.lam >= 0):  # also rejects NaN
        raise CLIError(f"--eta and --lam must be non-negative numbers; got {args.eta} and {args.lam}")
    if not 0.0 <= args.distill <= 1.0:
        raise CLIError(f"--distill must be in [0, 1]; got {args.distill}")
    if args.grad_accum < 1:
        raise CLIError(f"--grad-accum must be >= 1; got {args.grad_accum}")
    cfg = TrainConfig(
        steps=args.steps, seq_len=seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr_router=args.lr_router, lr_backbone=args.lr_backbone, train_backbone=args.train_backbone,
        tau_min=args.tau_min, seed=args.seed, progress=not args.no_progress, eta=args.eta, lam=args.lam,
        distill=args.distill, tau_sampling=args.tau_sampling, eval_every=args.eval_every,
        val_sparsities=val_sparsities,
    )  # fmt: skip
    start = time.perf_counter()
    stats = train_routers(model, tokens, cfg, val_tokens=val)
    out = args.out or args.checkpoint
    _save(model, out, {**_ckpt_config(loaded), "trained_steps": args.steps, "tau_min": args.tau_min},
          loaded.permutations, with_backbone=args.train_backbone or loaded.backbone is not None)  # fmt: skip
    if stats is not None:  # the per-step losses, tau and s_FFN, for plots and post-mortems
        import json

        with open(os.path.join(out, "train_history.json"), "w") as f:
            json.dump(stats.as_dict(), f)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s -> {out}")
    if stats is not None and stats.last is not None:
        r = stats.last
        print(f"  last step: ce {r.ce:.4f}" + (f", kl {r.kl:.4f}" if args.distill else "")
              + f", tau {r.tau:.3f}, s_FFN {r.sparsity:.3f}; {stats.seconds_per_step:.3f} s/step,"
              f" {stats.tokens_per_step} tokens/step; history in {out}/train_history.json")  # fmt: skip
        if stats.best_step is not None:
            best = min(ce for _, ce in stats.validation)
            print(f"  validation: best mean CE {best:.4f} after {stats.best_step} steps (restored; "
                  f"{len(stats.validation)} validations on {len(val)} held-out tokens)")  # fmt: skip
    return 0


def _apply_expert_bounds(model, args: argparse.Namespace) -> None:
    """``--min-experts`` / ``--max-experts`` onto every routed FFN (None: keep the checkpoint's)."""
    if args.min_experts is not None:
        routed = _routed(model)
        E = min((m.w_down.shape[0] for m in routed), default=0)
        if not routed or not 1 <= args.min_experts <= E:
            raise CLIError(f"bad --min-experts {args.min_experts}: it must be in [1, E={E}] (and needs a checkpoint)")
        for m in routed:
            m.min_experts = args.min_experts
    if args.max_experts is not None:
        routed = _routed(model)
        E = min((m.w_down.shape[0] for m in routed), default=0)
        floor = max((m.min_experts for m in routed), default=1)
        if not routed or not max(1, floor) <= args.max_experts <= E:
            raise CLIError(
                f"bad --max-experts {args.max_experts}: it must be in [max(1, min_experts={floor}), E={E}]"
                " (and needs a checkpoint)"
            )
        for m in routed:
            m.max_experts = args.max_experts


def _expert_bounds_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--min-experts",
        type=int,
        help=f"{what} keep at least this many experts per token (topp_route's floor; default: the checkpoint's)",
    )
    p.add_argument(
        "--max-experts",
        type=int,
        help=f"{what} keep at most this many experts per token (topp_route's cap; default: the checkpoint's)",
    )


# -- calibrate ---------------------------------------------------------------------------------
def calibrate(args: argparse.Namespace) -> int:
    from prunepath_ops.convert import CalibrationError, calibrate_tau, calibrate_tau_per_layer, make_measure_fn

    if not (math.isfinite(args.target) and 0.0 <= args.target < 1.0):
        raise CLIError(f"impossible target sparsity {args.target}: it must be in [0, 1)")
    model, tok, loaded = _load_prunepath(args.checkpoint, args.model, args.fast, _device(args))
    tokens = _tokens(args, tok, (0.0, 0.8))[: args.tokens].to(next(model.parameters()).device)
    window = min(512, model.config.max_seq_len)
    chunks = [tokens[s : s + window] for s in range(0, len(tokens) - 1, window) if len(tokens[s : s + window]) > 1]
    mods = _routed(model)
    model.clear_cache()

    def run():
        for c in chunks:
            model(c[None])

    try:
        if args.per_layer:
            res = calibrate_tau_per_layer(make_measure_fn(mods, run, per_layer=True), len(mods), args.target,
                                          tol=args.tol)  # fmt: skip
            taus = [r.tau for r in res]
            achieved = sum(r.sparsity for r in res) / len(res)
        else:
            r = calibrate_tau(make_measure_fn(mods, run), args.target, tol=args.tol)
            taus, achieved = [r.tau] * len(mods), r.sparsity
    except CalibrationError as e:
        raise CLIError(f"impossible target sparsity {args.target}: {e}") from None
    for m, t in zip(mods, taus, strict=True):
        m.tau = t
    out = args.out or args.checkpoint
    _save(model, out, {**_ckpt_config(loaded), "calibrated_target": args.target}, loaded.permutations,
          with_backbone=loaded.backbone is not None)  # fmt: skip
    shown = f"tau = {taus[0]:.4f}" if not args.per_layer else f"taus {min(taus):.4f} .. {max(taus):.4f}"
    print(f"target s_FFN {args.target:.3f}: {shown}, measured s_FFN {achieved:.3f} on {len(tokens)} tokens -> {out}")
    return 0


# -- eval --------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()] if text else []


def evaluate(args: argparse.Namespace) -> int:
    from prunepath_ops.evaluate import format_table, plot, sweep, write_table

    taus = [_check_tau(t) for t in _floats(args.taus)]
    fracs = _floats(args.static_fractions)
    for f in fracs:
        if not 0.0 <= f < 1.0:
            raise CLIError(f"bad static fraction {f}: it must be in [0, 1)")
    if args.checkpoint:
        model, tok, _ = _load_prunepath(args.checkpoint, args.model, args.fast, _device(args))
    else:
        model, tok, _ = _load_dense(args.model, args.fast, _device(args))
        taus = []
    fast = getattr(model.config, "vocab", 0) == 128 and args.fast
    window = args.window or (FAST_WINDOW if fast else 512)
    stride = args.stride or (FAST_STRIDE if fast else 256)
    if window > model.config.max_seq_len:
        raise CLIError(f"--window {window} exceeds the model's context {model.config.max_seq_len}")
    tokens = _tokens(args, tok, (0.8, 1.0))
    calib = _tokens(args, tok, (0.0, 0.8))[: args.calib_tokens]
    ks = [int(k) for k in _floats(args.ks)] if args.ks else None
    if ks is not None:
        E = min(m.w_down.shape[0] for m in _routed(model)) if _routed(model) else 0
        bad = [k for k in ks if not 1 <= k <= E]
        if bad:
            raise CLIError(f"bad --ks {bad}: k must be in [1, E={E}]")
    _apply_expert_bounds(model, args)
    methods = [m for m in args.static_methods.split(",") if m]
    rows = sweep(
        model, tokens, taus=taus, ks=ks if args.checkpoint else [], static_fractions=fracs, static_methods=methods,
        calib_tokens=calib, window=window, stride=stride, batch_size=args.batch_size, max_tokens=args.max_tokens,
        progress=not args.no_progress, log=print,
    )  # fmt: skip
    os.makedirs(args.out_dir, exist_ok=True)
    md, csv_path, png = (os.path.join(args.out_dir, f) for f in ("sweep.md", "sweep.csv", "sweep.png"))
    write_table(rows, md, csv_path)
    print()
    print(format_table(rows))
    try:
        plot(rows, png, title=f"Perplexity vs s_FFN ({rows[0].tokens} tokens, window {window}/{stride})")
        print(f"wrote {md}, {csv_path}, {png}")
    except ImportError:
        print(f"wrote {md}, {csv_path} (no plot: pip install matplotlib)")
    return 0


# -- generate ----------------------------------------------------------------------------------
def generate_cmd(args: argparse.Namespace) -> int:
    from prunepath_ops.evaluate.data import encode
    from prunepath_ops.models import generate, set_tau

    tau = _check_tau(args.tau)
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    if args.checkpoint:
        model, tok, _ = _load_prunepath(args.checkpoint, args.model, args.fast, _device(args))
        set_tau(model, tau)
    else:
        model, tok, _ = _load_dense(args.model, args.fast, _device(args))
    device = next(model.parameters()).device
    prompt = encode(tok, args.prompt).to(device)
    if len(prompt) == 0:
        raise CLIError("the prompt is empty")
    if len(prompt) + args.max_new_tokens > model.config.max_seq_len:
        raise CLIError(f"prompt + --max-new-tokens exceed the model's context {model.config.max_seq_len}")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    mods = _routed(model)
    from prunepath_ops.convert import ffn_sparsity, record_num_active

    start = time.perf_counter()
    with record_num_active(mods) as rec:
        out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, generator=gen,
                       eos_token_id=getattr(tok, "eos_token_id", None))  # fmt: skip
    secs = time.perf_counter() - start
    new = out[len(prompt) :].tolist()
    s = ffn_sparsity([torch.cat(r) for r in rec], [m.w_down.shape[0] for m in mods]) if mods else 0.0
    print(args.prompt + tok.decode(new))
    print(f"[{len(new)} tokens in {secs:.2f} s, tau {tau if mods else 'dense'}, s_FFN {s:.3f}]", file=sys.stderr)
    return 0


# -- bench -------------------------------------------------------------------------------------
def bench(args: argparse.Namespace) -> int:
    if args.pytest:
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        bench_dir = os.path.join(root, "bench")
        if not os.path.isdir(bench_dir):
            raise CLIError(f"benchmark suite not found: {bench_dir} (it ships with the source tree)")
        cmd = [sys.executable, "-m", "pytest", bench_dir, "--benchmark-only", "-q", *args.pytest_args]
        return subprocess.call(cmd, cwd=bench_dir)
    d, F, S, T = (64, 256, 16, 8) if args.fast else (args.hidden, args.ffn, args.expert_width, args.tokens)
    if F % S:
        raise CLIError(f"--ffn ({F}) must be a multiple of --expert-width ({S})")
    torch.manual_seed(0)
    dense = LlamaMLP(d, F).eval()
    mlp = pp.PrunePathMLP.from_dense(dense, expert_width=S, gate="one").eval()
    x = torch.randn(T, d)
    with torch.no_grad():
        mlp.router.weight.copy_(_fit_router(mlp.packed, torch.randn(4 * d, d)))

        def timeit(fn) -> float:
            fn()
            reps, start = 0, time.perf_counter()
            while reps < 3 or time.perf_counter() - start < args.seconds:
                fn()
                reps += 1
            return (time.perf_counter() - start) / reps * 1e3

        E = F // S
        print(f"FFN d={d}, F={F}, E={E} experts of {S}; {T} tokens; {torch.get_num_threads()} threads")
        t_dense = timeit(lambda: dense(x))
        print(f"{'':>10} {'s_FFN':>6} {'ms/call':>9} {'speed-up':>9}")
        print(f"{'dense':>10} {0.0:>6.2f} {t_dense:>9.3f} {1.0:>9.2f}")
        for tau in (1.05, 0.9, 0.7, 0.5):
            mlp.tau = tau
            n = mlp.route(x).num_active.float().mean()
            t = timeit(lambda: mlp(x))
            print(f"{f'tau={tau:g}':>10} {1 - float(n) / E:>6.2f} {t:>9.3f} {t_dense / t:>9.2f}")
    return 0


# -- demo --full ---------------------------------------------------------------------------------
def _step(argv: list[str]) -> None:
    rc = main(argv)
    if rc:
        raise CLIError(f"step `prunepath {' '.join(argv)}` failed (exit status {rc})")


def demo_full(args: argparse.Namespace) -> int:
    """The issue-5 pipeline: convert, train briefly, sweep tau (+ baselines), table, plot, a sample."""
    import tempfile

    t0 = time.perf_counter()
    out_dir = args.out_dir
    ckpt = os.path.join(out_dir, "checkpoint") if out_dir else tempfile.mkdtemp(prefix="prunepath_demo_")
    out_dir = out_dir or "prunepath_demo"
    common = ["--fast"] if args.fast else []
    common_np = common + (["--no-progress"] if args.no_progress else [])
    text = ["--text", args.text] if args.text else []
    print(f"== convert ({'tiny random model' if args.fast else 'SmolLM2-135M-Instruct'})")
    _step(["convert", *common_np, *text, "--out", ckpt, "--calib-tokens", str(args.calib_tokens)])
    print(f"   [{time.perf_counter() - t0:.0f} s]")
    try:
        import prunepath_ops.train  # noqa: F401

        # Straight-through gates: with gate `one` the plain gates are constant, so only the entropy
        # and balance terms would reach the routers; 30 such steps left the least-squares routers
        # worse, 30 straight-through steps (the task loss reaches them) better
        # (bench/results/quality/demo_router_training.md).
        print(f"== train ({args.train_steps} steps, routers only, straight-through gates)")
        _step(["train", *common_np, *text, "--checkpoint", ckpt, "--steps", str(args.train_steps),
              "--seq-len", str(args.seq_len), "--batch-size", "2", "--straight-through"])  # fmt: skip
    except ImportError:
        print("== train skipped: prunepath_ops.train is not in this build (least-squares routers are used)")
    print(f"   [{time.perf_counter() - t0:.0f} s]")
    print("== eval: tau sweep, top-k and static (Wanda) baselines")
    max_tokens = str(args.eval_tokens)
    _step(["eval", *common_np, *text, "--checkpoint", ckpt, "--out-dir", out_dir, "--max-tokens", max_tokens,
          "--taus", args.taus, "--static-fractions", "0.25,0.5", "--calib-tokens", str(args.calib_tokens),
          "--batch-size", "4"] + (["--ks", "4,2"] if args.fast else ["--ks", "24,12"]))  # fmt: skip
    print(f"   [{time.perf_counter() - t0:.0f} s]")
    print(f"== generate at tau {args.sample_tau}")
    _step(["generate", *common, "--checkpoint", ckpt, "--tau", str(args.sample_tau), "--prompt", args.prompt,
          "--max-new-tokens", "24" if not args.fast else "16"])  # fmt: skip
    print(f"demo done in {time.perf_counter() - t0:.0f} s; checkpoint {ckpt}, results in {out_dir}")
    return 0


def info(_: argparse.Namespace) -> int:
    print(f"prunepath_ops {pp.__version__} (torch {torch.__version__})")
    for name, ok in pp.backends().items():
        print(f"  {name}: {ok}")
    return 0


# -- argument parsing ----------------------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser, checkpoint: str | None = None) -> None:
    p.add_argument("--model", help="GGUF file or Hugging Face directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--fast", action="store_true", help="tiny random model and built-in text (CI; seconds)")
    p.add_argument(
        "--text", help="text file (default ../shared/data/wikitext-2/valid.txt, or one found on the machine)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--device",
        default="auto",
        help="where the model runs: auto (a CUDA GPU when there is one, else cpu), cpu, cuda[:N]",
    )
    if checkpoint == "required":
        p.add_argument("--checkpoint", required=True, help="PrunePath checkpoint directory (from `prunepath convert`)")
    elif checkpoint == "optional":
        p.add_argument("--checkpoint", help="PrunePath checkpoint directory (default: the dense model only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunepath", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="route a random FFN at several tau (seconds); --full: the SmolLM2 pipeline")
    p_demo.add_argument("--hidden", type=int, default=256, help="hidden size d (default 256)")
    p_demo.add_argument(
        "--ffn", type=int, default=1024, help="FFN width F, a multiple of --expert-width (default 1024)"
    )
    p_demo.add_argument("--expert-width", type=int, default=32, help="neurons per expert S (default 32)")
    p_demo.add_argument("--tokens", type=int, default=64, help="tokens per call (default 64)")
    p_demo.add_argument("--taus", type=float, nargs="+", default=[1.05, 0.9, 0.7, 0.5, 0.3], help="tau values to sweep")
    p_demo.add_argument("--seed", type=int, default=0)
    g = p_demo.add_argument_group("--full (convert, train, sweep, plot, generate on SmolLM2; about 10 minutes)")
    g.add_argument("--full", action="store_true", help="run the issue-5 pipeline instead of the FFN demo")
    g.add_argument("--fast", action="store_true", help="with --full: tiny random model (seconds)")
    g.add_argument("--text", help="text file (default ../shared/data/wikitext-2/valid.txt or one found)")
    g.add_argument("--out-dir", help="where the checkpoint, table and plot go (default ./prunepath_demo)")
    g.add_argument("--train-steps", type=int, default=30, help="router training steps (default 30)")
    g.add_argument("--seq-len", type=int, default=128, help="training sequence length (default 128)")
    g.add_argument("--eval-tokens", type=int, default=2560, help="evaluation tokens (default 2560)")
    g.add_argument("--calib-tokens", type=int, default=4096, help="router-fit / Wanda tokens (default 4096)")
    g.add_argument("--sweep-taus", dest="sweep_taus", default="1.05,0.95,0.9,0.8", help="comma-separated taus")
    g.add_argument("--sample-tau", type=float, default=0.9, help="tau of the generated sample (default 0.9)")
    g.add_argument("--prompt", default="The capital of France is", help="prompt of the sample")
    g.add_argument("--no-progress", action="store_true")
    p_demo.set_defaults(func=_demo)

    p = sub.add_parser("convert", help="dense model -> PrunePath checkpoint (k-means experts, least-squares router)")
    _model_args(p)
    p.add_argument(
        "--out", default="prunepath_checkpoint", help="checkpoint directory (default ./prunepath_checkpoint)"
    )
    p.add_argument("--expert-width", type=int, help="neurons per expert S (default 32; 16 with --fast)")
    p.add_argument(
        "--router",
        choices=("lstsq", "zero"),
        default="lstsq",
        help="lstsq: fit each router to log expert mass on the first 80%% of the text (default); zero",
    )
    p.add_argument(
        "--gate",
        choices=("one", "sigmoid", "prob", "renorm"),
        default="one",
        help="gate mode (default one: tau >= 1 is the dense model; the paper trains sigmoid)",
    )
    p.add_argument("--calib-tokens", type=int, default=4096, help="tokens for the router fit (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.set_defaults(func=convert)

    p = sub.add_parser("train", help="train the routers of a checkpoint on the first 80%% of the text")
    _model_args(p, "required")
    p.add_argument("--out", help="output checkpoint directory (default: overwrite --checkpoint)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--lr-router", type=float, default=1e-3, help="router learning rate (default 1e-3)")
    p.add_argument("--lr-backbone", type=float, default=1e-4, help="backbone learning rate (default 1e-4)")
    p.add_argument("--tau-min", type=float, default=0.5, help="final tau of the schedule (default 0.5)")
    p.add_argument(
        "--tau-sampling",
        choices=("linear", "uniform"),
        default="linear",
        help="after the warm-up: linear schedule down to --tau-min (default), or tau drawn from [tau-min, 1] per step",
    )
    p.add_argument(
        "--train-backbone", action="store_true", help="also fine-tune the backbone (saved with the checkpoint)"
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="validate every N steps on the tail of the training text and keep the best weights (default 0: off)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="with --eval-every: fraction of the training tokens held out for validation (default 0.1)",
    )
    p.add_argument(
        "--val-sparsities",
        default="",
        help="with --eval-every: validate at the tau that reaches each of these s_FFN on the validation "
        "tokens (comma list, e.g. 0.5) instead of at fixed tau 0.7, 0.85, 1.05",
    )
    p.add_argument(
        "--distill",
        type=float,
        default=0.0,
        help="weight alpha of KL(dense teacher || model) in the task loss, (1 - alpha) CE + alpha KL (default 0)",
    )
    p.add_argument(
        "--straight-through",
        action="store_true",
        help="with gate 'one': gates of value 1 that pass the experts' probability gradient to the routers",
    )
    p.add_argument(
        "--gate",
        choices=("keep", "one", "sigmoid", "prob", "renorm"),
        default="keep",
        help="gate mode to train with (default: the checkpoint's)",
    )
    _expert_bounds_args(p, "tokens")
    p.add_argument(
        "--eta", type=float, default=3e-4, help="weight of the routing-entropy loss (default 3e-4, the paper's)"
    )
    p.add_argument(
        "--lam", type=float, default=1e-3, help="weight of the load-balance loss (default 1e-3, the paper's)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=train)

    p = sub.add_parser("calibrate", help="find the tau that gives a target s_FFN; write it into the checkpoint")
    _model_args(p, "required")
    p.add_argument("--target", type=float, required=True, help="target FFN sparsity s_FFN in [0, 1)")
    p.add_argument("--per-layer", action="store_true", help="one tau per layer, each layer at the target")
    p.add_argument("--tokens", type=int, default=2048, help="calibration tokens, first 80%% of the text")
    p.add_argument("--tol", type=float, default=0.01, help="accepted |s_FFN - target| (default 0.01)")
    p.add_argument("--out", help="output checkpoint directory (default: overwrite --checkpoint)")
    p.set_defaults(func=calibrate)

    p = sub.add_parser("eval", help="perplexity vs s_FFN: tau sweep, top-k and static baselines -> table and PNG")
    _model_args(p, "optional")
    p.add_argument("--taus", default="1.05,0.99,0.95,0.9,0.8,0.7", help="comma-separated taus")
    p.add_argument("--ks", help="comma-separated top-k values (default: E/2, E/3, E/4, E/8)")
    p.add_argument("--static-fractions", default="0.25,0.5,0.75", help="fractions of neurons removed (static)")
    p.add_argument("--static-methods", default="wanda", help="comma-separated: wanda, magnitude")
    p.add_argument("--window", type=int, help="sliding window (default 512; 64 with --fast)")
    p.add_argument("--stride", type=int, help="stride (default 256; 32 with --fast)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward (default 4)")
    p.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens of the last 20%% of the text")
    p.add_argument("--calib-tokens", type=int, default=4096, help="Wanda calibration tokens (first 80%%)")
    _expert_bounds_args(p, "PrunePath points")
    p.add_argument(
        "--out-dir", default="prunepath_eval", help="sweep.md, sweep.csv, sweep.png (default ./prunepath_eval)"
    )
    p.set_defaults(func=evaluate)

    p = sub.add_parser("generate", help="generate text at a chosen tau")
    _model_args(p, "optional")
    p.add_argument("--prompt", default="The capital of France is", help="the prompt")
    p.add_argument("--tau", type=float, default=0.9, help="top-p threshold in [0, 1.05] (default 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=generate_cmd)

    p = sub.add_parser("bench", help="time a dense vs routed FFN at several tau (or run the pytest-benchmark suite)")
    p.add_argument("--fast", action="store_true", help="tiny shapes (CI)")
    p.add_argument("--hidden", type=int, default=576, help="d (default 576, SmolLM2)")
    p.add_argument("--ffn", type=int, default=1536, help="F (default 1536, SmolLM2)")
    p.add_argument("--expert-width", type=int, default=32)
    p.add_argument("--tokens", type=int, default=1, help="tokens per call (default 1: decode)")
    p.add_argument("--seconds", type=float, default=0.5, help="time per measurement (default 0.5)")
    p.add_argument("--pytest", action="store_true", help="run bench/ with pytest-benchmark instead")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    p.set_defaults(func=bench)

    sub.add_parser("info", help="print the backends this build has").set_defaults(func=info)
    return parser


def _demo(args: argparse.Namespace) -> int:
    if args.full:
        args.taus = args.sweep_taus
        return demo_full(args)
    if args.ffn % args.expert_width:
        raise CLIError(f"--ffn ({args.ffn}) must be a multiple of --expert-width ({args.expert_width})")
    return demo(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if getattr(args, "fast", False):  # tiny shapes: threads only add synchronisation (and spin on a busy machine)
        torch.set_num_threads(1)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"prunepath {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"prunepath {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
