"""Router training with the paper's recipe (SPEC.md section 5, issue 5).

``L = CE + eta * L_ent + lambda * L_bal (+ gamma * L_gate)`` (the auxiliary losses averaged over
layers), a warm-up at ``tau = 1.05`` (every expert active, gates applied) then a linear ``tau``
schedule down to ``tau_min``; AdamW on the routers and, optionally, on the backbone; gradient
accumulation and clipping; a tqdm bar with the losses and the current FFN sparsity.

The task loss reaches the routers through the gates of the selected experts: during training the
FFNs run :func:`prunepath_ops.modules.masked_expert_ffn` (see :func:`differentiable_ffns`), the
auxiliary losses read the router logits captured by forward hooks (:func:`record_router_logits`).

Legend: B sequences per micro-batch, A micro-batches per step (``grad_accum``), L ``seq_len``,
V vocab, T = B * L tokens, E experts.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunepath_ops.convert.calibrate import calibrate_tau
from prunepath_ops.convert.losses import TauSchedule, router_losses
from prunepath_ops.modules import PrunePathMLP
from prunepath_ops.routing import topp_route


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_routers` (defaults: the paper's code where it has one).

    Attributes
    ----------
    steps : int
        Optimiser steps.
    seq_len : int
        L, tokens per training window (each window reads L + 1 tokens: inputs and next-token targets).
    batch_size : int
        B, windows per micro-batch.
    grad_accum : int
        A, micro-batches accumulated per optimiser step (a step sees ``B * A`` windows).
    lr_router, lr_backbone : float
        AdamW learning rates (the paper: 1e-3 and 1e-4); constant, no decay.
    train_backbone : bool
        Also train every other weight (attention, norms, embeddings, LM head and the packed FFN
        weights). Default False: the backbone is frozen and only the routers learn.
    tau_min : float
        Final top-p threshold of the linear schedule.
    warmup_frac : float
        Fraction of the steps spent at ``tau = 1.05`` (every expert active, gates applied).
    eta, lam, gamma : float
        Weights of L_ent, L_bal and L_gate (the paper: 3e-4, 1e-3, gate loss off).
    seed : int
        Seeds the window sampler; with the same model, data and seed a CPU run is bitwise repeatable.
    progress : bool
        Show a tqdm bar.
    log_every : int
        Refresh the bar's losses every this many steps.
    max_grad_norm : float or None
        Clip the global gradient norm (routers and backbone together); None or <= 0: no clipping.
    weight_decay : float
        AdamW weight decay (both groups). Default 0.
    distill : float
        alpha in ``[0, 1]``: the task loss becomes ``(1 - alpha) * CE + alpha * KL(teacher || model)``
        over the next-token distributions, the teacher being a frozen copy of the model as it is
        when training starts with every expert active and gates 1 (for a fresh conversion: the
        dense source model). Default 0 (plain CE, the paper's recipe). Distillation gives every
        token a full target distribution instead of one label, which matters when the training text
        is small and the backbone is fine-tuned.
    tau_sampling : {"linear", "uniform"}
        After the warm-up, ``"linear"`` follows :meth:`tau_schedule` down to ``tau_min``;
        ``"uniform"`` draws each step's ``tau`` uniformly from ``[tau_min, 1]`` (seeded), so that one
        checkpoint is trained for the whole range of sparsities it will be used at.
    eval_every : int
        With ``val_tokens`` given to :func:`train_routers`: every this many steps (and after the
        last) measure the validation cross-entropy, averaged over ``val_taus``, keep a copy of the
        trained tensors when it is the best so far, and restore the best copy at the end (early
        stopping without stopping: a small training text overfits, see
        ``bench/results/quality/quality_report_gpu.md``). 0 (default): no validation.
    val_taus : tuple of float
        The thresholds the validation runs at (default 0.7, 0.85, 1.05: sparse to dense).
    val_sparsities : tuple of float
        Instead of ``val_taus``: validate at the global ``tau`` that reaches each of these ``s_FFN``
        on the validation tokens (bisection, :func:`~prunepath_ops.convert.calibrate_tau`, within
        0.01), i.e. at fixed sparsity. A fixed ``tau`` rewards a backbone that adapts to the text
        before the routers learn to spend the budget (the session-16 quality runs stopped at step
        150 of 1,000 that way); a fixed sparsity compares what the report compares. Costs about
        eight validation passes per target.
    val_windows : int
        At most this many windows of ``seq_len`` tokens per validation.
    """

    steps: int
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr_router: float = 1e-3
    lr_backbone: float = 1e-4
    train_backbone: bool = False
    tau_min: float = 0.5
    warmup_frac: float = 0.1
    eta: float = 3e-4
    lam: float = 1e-3
    gamma: float = 0.0
    seed: int = 0
    progress: bool = True
    log_every: int = 10
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    distill: float = 0.0
    tau_sampling: str = "linear"
    eval_every: int = 0
    val_taus: tuple[float, ...] = (0.7, 0.85, 1.05)
    val_sparsities: tuple[float, ...] = ()
    val_windows: int = 64

    def __post_init__(self) -> None:
        if int(self.eval_every) < 0 or int(self.val_windows) < 1:
            raise ValueError(f"TrainConfig: eval_every must be >= 0 and val_windows >= 1; got {self.eval_every}, "
                             f"{self.val_windows}")  # fmt: skip
        if not self.val_taus or not all(0.0 <= t <= 1.05 for t in self.val_taus):
            raise ValueError(f"TrainConfig: val_taus must be thresholds in [0, 1.05]; got {self.val_taus}")
        if not all(0.0 <= x < 1.0 for x in self.val_sparsities):
            raise ValueError(f"TrainConfig: val_sparsities must be s_FFN targets in [0, 1); got {self.val_sparsities}")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"TrainConfig: distill must be in [0, 1]; got {self.distill}")
        if self.tau_sampling not in ("linear", "uniform"):
            raise ValueError(f"TrainConfig: tau_sampling must be 'linear' or 'uniform'; got {self.tau_sampling!r}")
        for name in ("steps", "seq_len", "batch_size", "grad_accum", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1; got {getattr(self, name)}")
        if not 0.0 <= self.warmup_frac <= 1.0:
            raise ValueError(f"TrainConfig: warmup_frac must be in [0, 1]; got {self.warmup_frac}")
        if not 0.0 < self.tau_min <= 1.05:
            raise ValueError(f"TrainConfig: tau_min must be in (0, 1.05]; got {self.tau_min}")

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_frac * self.steps))

    def tau_schedule(self) -> TauSchedule:
        """Warm-up at 1.05 for ``warmup_steps``, then linear so that the last step runs at ``tau_min``."""
        w = self.warmup_steps
        return TauSchedule(warmup_steps=w, total_steps=max(self.steps - 1, w), tau_min=self.tau_min)


@dataclass
class StepRecord:
    """What one optimiser step saw (losses averaged over its micro-batches; the aux losses over layers)."""

    step: int
    loss: float  # (1 - distill) * ce + distill * kl + eta * ent + lam * bal + gamma * gate
    ce: float
    ent: float
    bal: float
    gate: float
    tau: float
    sparsity: float  # s_FFN = 1 - mean over tokens and layers of num_active / E
    grad_norm: float  # before clipping
    kl: float = 0.0  # KL(teacher || model) per token, with TrainConfig.distill > 0


@dataclass
class TrainStats:
    """Per-step history of :func:`train_routers` and its wall time."""

    config: TrainConfig
    history: list[StepRecord] = field(default_factory=list)
    seconds: float = 0.0
    tokens_per_step: int = 0
    validation: list[tuple[int, float]] = field(default_factory=list)  # (steps done, mean val CE)
    best_step: int | None = None  # steps done at the restored validation best (None: no validation)

    @property
    def last(self) -> StepRecord | None:
        return self.history[-1] if self.history else None

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(len(self.history), 1)

    def column(self, name: str) -> list[float]:
        """One field of every step, e.g. ``stats.column("ce")``."""
        return [getattr(r, name) for r in self.history]

    def as_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "seconds": self.seconds,
            "tokens_per_step": self.tokens_per_step,
            "history": [asdict(r) for r in self.history],
            "validation": [list(v) for v in self.validation],
            "best_step": self.best_step,
        }


# -- helpers ----------------------------------------------------------------------------------
def prunepath_mlps(model: nn.Module) -> list[PrunePathMLP]:
    """Every :class:`PrunePathMLP` of ``model`` in module order (layer order for a Llama)."""
    return [m for m in model.modules() if isinstance(m, PrunePathMLP)]


@contextlib.contextmanager
def differentiable_ffns(model: nn.Module | Sequence[PrunePathMLP], enabled: bool | str = True) -> Iterator[None]:
    """Run the :class:`PrunePathMLP` s of ``model`` on their differentiable (masked dense) path inside the block.

    Restores each module's previous ``differentiable`` setting on exit.
    """
    mlps = prunepath_mlps(model) if isinstance(model, nn.Module) else list(model)
    saved = [getattr(m, "differentiable", False) for m in mlps]
    try:
        for m in mlps:
            m.differentiable = enabled
        yield
    finally:
        for m, s in zip(mlps, saved, strict=True):
            m.differentiable = s


@contextlib.contextmanager
def record_router_logits(mlps: Sequence[PrunePathMLP]) -> Iterator[list[list[Tensor]]]:
    """Capture the router logits ``[T, E]`` of every forward (forward hooks on each ``mlp.router``).

    Yields ``records`` with ``records[l]`` the list of logits tensors of ``mlps[l]``, in call order,
    still attached to the autograd graph. Clear the inner lists between forwards.
    """
    records: list[list[Tensor]] = [[] for _ in mlps]

    def hook(index: int):
        def fn(_module, _args, output):
            records[index].append(output)

        return fn

    handles = [m.router.register_forward_hook(hook(i)) for i, m in enumerate(mlps)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _without_kv_cache(model: nn.Module) -> Iterator[None]:
    """Training runs cache-free full forwards: detach any static KV cache for the duration."""
    layers = getattr(model, "layers", None) or []
    attns = [layer.attn for layer in layers if hasattr(getattr(layer, "attn", None), "kv_cache")]
    saved = [a.kv_cache for a in attns]
    try:
        for a in attns:
            a.kv_cache = None
        yield
    finally:
        for a, kv in zip(attns, saved, strict=True):
            a.kv_cache = kv


def _backbone_tensors(model: nn.Module, mlps: Sequence[PrunePathMLP]) -> list[Tensor]:
    """Every trainable tensor that is not a router: the parameters plus the packed FFN buffers (deduplicated)."""
    router_ids = {id(m.router.weight) for m in mlps}
    seen: set[int] = set(router_ids)
    out: list[Tensor] = []
    candidates = list(model.parameters())
    for m in mlps:
        candidates += [t for t in (m.w_in, m.w_down, m.b_in, m.b_out) if t is not None]
    for t in candidates:
        if id(t) not in seen and t.is_floating_point():
            seen.add(id(t))
            out.append(t)
    return out


def dense_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` with every expert active and gates 1 (:attr:`TrainConfig.distill`).

    Its :class:`PrunePathMLP` s run the masked dense path, so a teacher forward costs one dense
    forward. For a fresh conversion (permutation identity) it computes the dense source model.
    """
    teacher = copy.deepcopy(model)
    for m in prunepath_mlps(teacher):
        m.tau, m.gate, m.min_experts, m.max_experts = 1.05, "one", 1, None
        m.straight_through = False
        m.differentiable = True
    for t in teacher.parameters():
        t.requires_grad_(False)
    return teacher.eval()


def sample_windows(tokens: Tensor, count: int, length: int, generator: torch.Generator) -> Tensor:
    """``count`` random contiguous windows ``[count, length]`` of a 1-D token stream (uniform start offsets)."""
    n = tokens.numel()
    if n < length:
        raise ValueError(f"train_routers: the token stream has {n} tokens, fewer than seq_len + 1 = {length}")
    starts = torch.randint(0, n - length + 1, (count,), generator=generator)  # [count]
    return tokens[starts[:, None] + torch.arange(length)[None, :]]  # [count, length]


# -- the training loop --------------------------------------------------------------------------
def train_routers(
    model: nn.Module,
    train_tokens: Tensor,
    config: TrainConfig,
    *,
    callback: Callable[[StepRecord], bool | None] | None = None,
    val_tokens: Tensor | None = None,
) -> TrainStats:
    """Train the routers (and optionally the backbone) of a PrunePath model on next-token prediction.

    Each step: ``tau`` from :meth:`TrainConfig.tau_schedule` is set on every :class:`PrunePathMLP`;
    ``B * A`` windows of ``L + 1`` tokens are drawn from ``train_tokens`` (seeded); every micro-batch
    of B windows gives ``CE + eta * L_ent + lam * L_bal + gamma * L_gate`` (the auxiliary losses of
    :func:`~prunepath_ops.convert.router_losses` over its ``B * L`` tokens, averaged over layers),
    backpropagated with weight ``1 / A``; the gradient norm is clipped and AdamW steps.

    Parameters
    ----------
    model : nn.Module
        A :class:`prunepath_ops.models.Llama` (or any module called as ``model(tokens [B, L]) ->
        logits [B, L, V]``) whose FFNs are :class:`PrunePathMLP` (after ``to_prunepath`` or
        ``convert_model``). Trained in place, on its own device and dtype.
    train_tokens : Tensor
        1-D int token stream (at least ``seq_len + 1`` tokens), on any device.
    config : TrainConfig
    callback : callable, optional
        ``callback(record)`` after every step; a truthy return value stops training.
    val_tokens : Tensor, optional
        1-D held-out token stream for ``config.eval_every`` (take it from the training text's
        split, never from the text the model is evaluated on).

    Returns
    -------
    TrainStats
        The per-step :class:`StepRecord` history and the wall time.

    Notes
    -----
    - The backbone is frozen (``requires_grad = False``) unless ``config.train_backbone``; every
      ``requires_grad`` flag, the modules' ``train``/``eval`` modes, their ``differentiable``
      settings and any KV cache are restored on return. ``tau`` is left at the last step's value
      (``tau_min``).
    - L_ent and L_gate are means over tokens, so accumulating A micro-batches of B windows gives
      the same gradient as one batch of ``A * B``; L_bal (the square of a mean) is computed per
      micro-batch, so with ``lam > 0`` the two differ slightly.
    - During training the FFNs compute every neuron (masked by the gates), so a step costs about
      a dense forward and backward whatever ``tau`` is.
    """
    cfg = config
    mlps = prunepath_mlps(model)
    if not mlps:
        raise ValueError("train_routers: the model has no PrunePathMLP (convert it with to_prunepath / convert_model)")
    if train_tokens.dim() != 1 or train_tokens.is_floating_point():
        raise ValueError(f"train_routers: train_tokens must be a 1-D int tensor; got {train_tokens.dtype} "
                         f"{list(train_tokens.shape)}")  # fmt: skip
    tokens = train_tokens.detach().to("cpu", torch.long)
    device = mlps[0].router.weight.device
    generator = torch.Generator().manual_seed(cfg.seed)
    schedule = cfg.tau_schedule()
    A, B, L = cfg.grad_accum, cfg.batch_size, cfg.seq_len

    routers = [m.router.weight for m in mlps]
    backbone = _backbone_tensors(model, mlps)
    flags = [(t, t.requires_grad) for t in routers + backbone]
    modes = [(m, m.training) for m in model.modules()]
    stats = TrainStats(cfg, tokens_per_step=A * B * L)
    validate = cfg.eval_every > 0 and val_tokens is not None
    best: tuple[float, list[Tensor]] | None = None
    teacher = dense_teacher(model) if cfg.distill > 0 else None  # before the hooks: a copy would carry them
    try:
        for t in routers:
            t.requires_grad_(True)
        for t in backbone:
            t.requires_grad_(cfg.train_backbone)
        groups = [{"params": routers, "lr": cfg.lr_router}]
        if cfg.train_backbone:
            groups.append({"params": backbone, "lr": cfg.lr_backbone})
        trained = [t for g in groups for t in g["params"]]
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        model.train()
        start = time.perf_counter()
        with (
            differentiable_ffns(mlps),
            record_router_logits(mlps) as records,
            _without_kv_cache(model),
            _progress(cfg) as bar,
        ):
            for step in range(cfg.steps):
                tau = schedule(step)
                if cfg.tau_sampling == "uniform" and step >= cfg.warmup_steps:
                    tau = cfg.tau_min + (1.0 - cfg.tau_min) * float(torch.rand((), generator=generator))
                for m in mlps:
                    m.tau = tau
                windows = sample_windows(tokens, A * B, L + 1, generator)  # [A*B, L+1]
                optimizer.zero_grad(set_to_none=True)
                sums = torch.zeros(6, dtype=torch.float64)  # ce, ent, bal, gate, sparsity, kl
                for a in range(A):
                    batch = windows[a * B : (a + 1) * B].to(device)  # [B, L+1]
                    for r in records:
                        r.clear()
                    logits = model(batch[:, :-1])  # [B, L, V]
                    flat = logits.float().reshape(-1, logits.shape[-1])  # [T, V]
                    ce = F.cross_entropy(flat, batch[:, 1:].reshape(-1))
                    ent, bal, gate, sparsity = _router_terms(mlps, records, tau)
                    kl = torch.zeros((), device=ce.device)
                    if teacher is not None:
                        with torch.no_grad():
                            target = F.log_softmax(teacher(batch[:, :-1]).float().reshape(flat.shape), dim=-1)
                        kl = F.kl_div(F.log_softmax(flat, dim=-1), target, log_target=True, reduction="batchmean")
                    task = (1.0 - cfg.distill) * ce + cfg.distill * kl
                    loss = task + cfg.eta * ent + cfg.lam * bal + cfg.gamma * gate
                    (loss / A).backward()
                    parts = torch.stack([ce.detach(), ent.detach(), bal.detach(), gate.detach(), sparsity, kl.detach()])
                    sums += parts.double().cpu()
                for r in records:
                    r.clear()  # release the graphs' tensors
                grad_norm = _clip(trained, cfg.max_grad_norm)
                optimizer.step()
                ce_, ent_, bal_, gate_, sp_, kl_ = (sums / A).tolist()
                task_ = (1.0 - cfg.distill) * ce_ + cfg.distill * kl_
                record = StepRecord(
                    step=step, loss=task_ + cfg.eta * ent_ + cfg.lam * bal_ + cfg.gamma * gate_, ce=ce_, ent=ent_,
                    bal=bal_, gate=gate_, tau=tau, sparsity=sp_, grad_norm=grad_norm, kl=kl_,
                )  # fmt: skip
                stats.history.append(record)
                stats.seconds = time.perf_counter() - start
                if bar is not None:
                    bar.update(1)
                    if step % cfg.log_every == 0 or step == cfg.steps - 1:
                        bar.set_postfix_str(_format(record, cfg.gamma), refresh=False)
                stop = callback is not None and bool(callback(record))
                done = step + 1
                if validate and (done % cfg.eval_every == 0 or done == cfg.steps or stop):
                    ce_val = _validation_ce(model, mlps, val_tokens, cfg)
                    stats.validation.append((done, ce_val))
                    if best is None or ce_val < best[0]:
                        best = (ce_val, [t.detach().to("cpu", copy=True) for t in trained])
                        stats.best_step = done
                if stop:
                    break
        if best is not None:
            with torch.no_grad():
                for t, saved in zip(trained, best[1], strict=True):
                    t.copy_(saved)
    finally:
        for t, flag in flags:
            t.requires_grad_(flag)
            t.grad = None
        for m, mode in modes:
            m.training = mode
    return stats


@torch.no_grad()
def evaluate(
    model: nn.Module, tokens: Tensor, seq_len: int = 256, *, batch_size: int = 4, max_windows: int | None = None
) -> dict[str, float]:
    """Next-token cross-entropy, perplexity and s_FFN of ``model`` on consecutive windows of ``tokens``.

    The stream is cut into non-overlapping windows of ``seq_len + 1`` tokens (the last token of a
    window is the first of the next), at most ``max_windows`` of them, run at each module's current
    ``tau`` on the inference path (:func:`prunepath_ops.sparse_ffn`). A model without
    :class:`PrunePathMLP` reports sparsity 0.

    Returns
    -------
    dict
        ``{"ce", "ppl", "sparsity", "tokens", "windows"}``.
    """
    mlps = prunepath_mlps(model)
    flat = tokens.detach().reshape(-1).to("cpu", torch.long)
    n_win = (flat.numel() - 1) // seq_len
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    if n_win < 1:
        raise ValueError(f"evaluate: need at least seq_len + 1 = {seq_len + 1} tokens; got {flat.numel()}")
    windows = flat[torch.arange(n_win)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]]  # [W, L+1]
    device = next(model.parameters()).device
    nll, count, active = 0.0, 0, []
    with record_router_logits(mlps) as records, _without_kv_cache(model):
        for i in range(0, n_win, batch_size):
            batch = windows[i : i + batch_size].to(device)
            for r in records:
                r.clear()
            logits = model(batch[:, :-1])
            nll += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                         reduction="sum"))  # fmt: skip
            count += batch[:, 1:].numel()
            if mlps:
                for m, rec in zip(mlps, records, strict=True):
                    g = rec[-1]
                    n = topp_route(g, m.tau, min_experts=m.min_experts, max_experts=m.max_experts, gate=m.gate)[2]
                    active.append(float(n.float().mean()) / g.shape[-1] * g.shape[0])
        for r in records:
            r.clear()
    ce = nll / count
    # Each batch contributes one mean per layer weighted by its T tokens; normalise by layers * tokens.
    sparsity = 1.0 - sum(active) / (len(mlps) * count) if mlps else 0.0
    return {"ce": ce, "ppl": math.exp(ce), "sparsity": sparsity, "tokens": count, "windows": n_win}


def _validation_ce(model: nn.Module, mlps: Sequence[PrunePathMLP], tokens: Tensor, cfg: TrainConfig) -> float:
    """Mean next-token cross-entropy on ``tokens`` over ``cfg.val_taus``, or at the ``tau`` of each of
    ``cfg.val_sparsities`` (each module's tau restored)."""
    saved = [m.tau for m in mlps]
    results: dict[float, dict] = {}

    def run(tau: float) -> dict:
        if tau not in results:
            for m in mlps:
                m.tau = tau
            results[tau] = evaluate(model, tokens, cfg.seq_len, batch_size=cfg.batch_size, max_windows=cfg.val_windows)
        return results[tau]

    try:
        if cfg.val_sparsities:
            with warnings.catch_warnings():  # a jump over the target: the closest tau is what we want
                warnings.simplefilter("ignore")
                taus = [calibrate_tau(lambda t: run(t)["sparsity"], s).tau for s in cfg.val_sparsities]
        else:
            taus = list(cfg.val_taus)
        ces = [run(t)["ce"] for t in taus]
        return sum(ces) / len(ces)
    finally:
        for m, t in zip(mlps, saved, strict=True):
            m.tau = t


def _router_terms(
    mlps: Sequence[PrunePathMLP], records: list[list[Tensor]], tau: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """L_ent, L_bal, L_gate averaged over layers, and s_FFN (detached) of the last forward."""
    ent, bal, gate, active = [], [], [], []
    for m, rec in zip(mlps, records, strict=True):
        if len(rec) != 1:
            raise RuntimeError(f"train_routers: expected one router call per layer and forward; got {len(rec)}")
        g = rec[0]  # [T, E]
        losses = router_losses(g)
        ent.append(losses.entropy)
        bal.append(losses.balance)
        gate.append(losses.gate)
        with torch.no_grad():
            n = topp_route(g.detach(), tau, min_experts=m.min_experts, max_experts=m.max_experts, gate=m.gate)[2]
            active.append(n.float().mean() / g.shape[-1])
    sparsity = 1.0 - torch.stack(active).mean()
    return torch.stack(ent).mean(), torch.stack(bal).mean(), torch.stack(gate).mean(), sparsity


def _clip(tensors: Sequence[Tensor], max_norm: float | None) -> float:
    grads = [t for t in tensors if t.grad is not None]
    if not grads:
        return 0.0
    if max_norm is None or max_norm <= 0:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.grad.float()) for t in grads]))
        return float(norm)
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))


def _format(r: StepRecord, gamma: float) -> str:
    text = (
        f"loss={r.loss:.4f} ce={r.ce:.4f}" + (f" kl={r.kl:.4f}" if r.kl else "") + f" ent={r.ent:.3f} bal={r.bal:.3f}"
    )
    if gamma:
        text += f" gate={r.gate:.3f}"
    return text + f" tau={r.tau:.3f} s_ffn={r.sparsity:.3f}"


@contextlib.contextmanager
def _progress(cfg: TrainConfig):
    if not cfg.progress:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, desc="router training", unit="step")
    try:
        yield bar
    finally:
        bar.close()


def is_finite(record: StepRecord) -> bool:
    """Every float of a :class:`StepRecord` is finite."""
    return all(math.isfinite(v) for v in asdict(record).values())
