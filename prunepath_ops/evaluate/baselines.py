"""Baselines for PrunePath's tau sweep: fixed top-k routing and static neuron pruning.

- **Top-k** (:func:`topk_routing`): the same router and experts as the PrunePath model, but every
  token keeps exactly its k most probable experts (``tau = 1.05`` keeps all, ``max_experts = k``
  caps them; :func:`~prunepath_ops.topp_route` orders by probability, ties to the lower index).
  The gate mode stays as configured. ``s_FFN = 1 - k / E`` exactly.
- **Static pruning** (:func:`static_pruned_ffns`): the same neurons are removed for every token.
  Neuron-level (not expert-level): each layer's dense FFN (for a :class:`PrunePathMLP`, the dense
  FFN its packed weights compute with gate 1, i.e. the source model) loses the
  ``round(fraction * F)`` neurons of lowest score, physically removed from ``gate/up/down``
  (equivalent to zeroing them, and faster). ``s_FFN`` = fraction of neurons removed. Scores:

  - ``"magnitude"``: ``||Wg_i|| * ||Wu_i|| * ||Wd[:, i]||`` (L2 norms of the neuron's gate and up
    rows and down column), a weight-only bound on the neuron's contribution;
  - ``"wanda"``: Wanda's ``|W| * ||activation||`` for the down projection, summed over the neuron's
    column: ``||h_i||_2 * sum_j |Wd[j, i]|``, with ``h_i = silu(x Wg_i) * (x Wu_i)`` collected on
    calibration tokens (the input of the down projection, as Wanda uses each layer's input).

Legend: T tokens, E experts, S expert width, d hidden, F FFN width.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunepath_ops.modules import PrunePathMLP

STATIC_METHODS = ("magnitude", "wanda")


def _routed(model_or_mlps) -> list[PrunePathMLP]:
    mods = model_or_mlps.modules() if isinstance(model_or_mlps, nn.Module) else model_or_mlps
    return [m for m in mods if isinstance(m, PrunePathMLP)]


def topk_sparsity(num_experts: int, k: int) -> float:
    """``1 - k / E``: the exact ``s_FFN`` of top-k routing."""
    return 1.0 - k / num_experts


@contextmanager
def topk_routing(model_or_mlps: nn.Module | Sequence[PrunePathMLP], k: int) -> Iterator[list[PrunePathMLP]]:
    """Within the block, every :class:`PrunePathMLP` keeps exactly its top ``k`` experts per token.

    Sets ``tau = 1.05``, ``max_experts = k`` and ``min_experts = min(min_experts, k)``; restores
    all three on exit. ``k`` must be in ``[1, E]`` for every layer.

    Examples
    --------
    >>> from prunepath_ops.models import LlamaMLP
    >>> dense = LlamaMLP(8, 64)  # d = 8, F = 64
    >>> mlp = PrunePathMLP.from_dense(dense, 16, tau=0.3)
    >>> with topk_routing([mlp], 3):
    ...     mlp.route(torch.randn(5, 8)).num_active.tolist()
    [3, 3, 3, 3, 3]
    >>> mlp.tau
    0.3
    """
    mlps = _routed(model_or_mlps)
    if not mlps:
        raise ValueError("topk_routing: the model has no PrunePathMLP")
    for m in mlps:
        E = m.w_down.shape[0]
        if not 1 <= k <= E:
            raise ValueError(f"topk_routing: k must be in [1, E={E}]; got {k}")
    saved = [(m.tau, m.min_experts, m.max_experts) for m in mlps]
    try:
        for m in mlps:
            m.tau, m.max_experts, m.min_experts = 1.05, int(k), min(m.min_experts, int(k))
        yield mlps
    finally:
        for m, (tau, lo, hi) in zip(mlps, saved, strict=True):
            m.tau, m.min_experts, m.max_experts = tau, lo, hi


class StaticPrunedMLP(nn.Module):
    """A gated SiLU FFN with a fixed subset of its neurons (the same for every token).

    Parameters
    ----------
    w_gate, w_up : Tensor
        ``[F_kept, d]``.
    w_down : Tensor
        ``[d, F_kept]``.
    total : int
        F, the width before pruning; ``sparsity = 1 - F_kept / F``.
    """

    def __init__(self, w_gate: Tensor, w_up: Tensor, w_down: Tensor, total: int) -> None:
        super().__init__()
        self.register_buffer("w_gate", w_gate)
        self.register_buffer("w_up", w_up)
        self.register_buffer("w_down", w_down)
        self.total = int(total)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.w_gate.shape[0] / self.total

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.silu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up), self.w_down)

    def extra_repr(self) -> str:
        return f"kept={self.w_gate.shape[0]}/{self.total}, sparsity={self.sparsity:.3f}"


def dense_weights(ffn: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """``(Wg [F, d], Wu [F, d], Wd [d, F])`` of a Llama ``gate/up/down_proj`` FFN or a gated SiLU PrunePathMLP.

    A PrunePathMLP gives its packed neuron order and gate 1 (the dense FFN it was converted from,
    up to the neuron permutation, which changes nothing here).
    """
    if isinstance(ffn, PrunePathMLP):
        if not ffn.gated or ffn.act != "silu" or ffn.b_in is not None or ffn.b_out is not None:
            raise TypeError("static pruning: only bias-free gated SiLU FFNs are supported")
        E, S, d = ffn.w_down.shape
        return (
            ffn.w_in[:, :S].reshape(E * S, d).detach(),
            ffn.w_in[:, S:].reshape(E * S, d).detach(),
            ffn.w_down.reshape(E * S, d).t().detach(),
        )
    if all(hasattr(ffn, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return ffn.gate_proj.weight.detach(), ffn.up_proj.weight.detach(), ffn.down_proj.weight.detach()
    if isinstance(ffn, StaticPrunedMLP):
        return ffn.w_gate, ffn.w_up, ffn.w_down
    raise TypeError(f"static pruning: unsupported FFN {type(ffn).__name__} (need gate/up/down_proj or PrunePathMLP)")


def full_dense_ffns(model: nn.Module) -> list[StaticPrunedMLP]:
    """Every layer's FFN as a full dense FFN (nothing removed; a PrunePathMLP with every expert and gate 1)."""
    out = []
    for f in model.ffns():
        g, u, dn = dense_weights(f)
        out.append(StaticPrunedMLP(g, u, dn, g.shape[0]))
    return out


@torch.no_grad()
def activation_norms(model: nn.Module, calib_tokens: Tensor, *, window: int = 512, max_tokens: int = 4096) -> list:
    """``||h_i||_2`` over calibration tokens for every neuron of every layer, ``[F]`` float32 each.

    ``h = silu(x Wg^T) * (x Wu^T)`` at each layer's FFN input ``x``, with the model run **dense**
    (every FFN temporarily replaced by its full dense version, so the statistics are the source
    model's). ``calib_tokens [N]`` are cut into chunks of ``window`` (at most ``max_tokens``).
    """
    dense = full_dense_ffns(model)
    sums = [torch.zeros(g.shape[0], dtype=torch.float64, device=g.device) for g in (m.w_gate for m in dense)]

    def hook(i):
        def fn(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            h = F.silu(F.linear(x, module.w_gate)) * F.linear(x, module.w_up)  # [T, F]
            sums[i] += h.double().pow(2).sum(0)

        return fn

    tokens = torch.as_tensor(calib_tokens).reshape(-1).long()[:max_tokens]
    device = next(model.parameters()).device
    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(dense)]
    if hasattr(model, "clear_cache"):
        model.clear_cache()
    try:
        with swapped_ffns(model, dense):
            for start in range(0, len(tokens), window):
                chunk = tokens[start : start + window]
                if len(chunk):
                    model(chunk[None].to(device))
    finally:
        for h in handles:
            h.remove()
    return [s.sqrt().float() for s in sums]


def neuron_scores(model: nn.Module, method: str = "wanda", calib_tokens: Tensor | None = None, **kwargs) -> list:
    """One ``[F]`` importance score per layer (higher = keep); see the module docstring for the formulas."""
    if method not in STATIC_METHODS:
        raise ValueError(f"neuron_scores: method must be one of {STATIC_METHODS}; got {method!r}")
    weights = [dense_weights(f) for f in model.ffns()]
    if method == "magnitude":
        return [(g.float().norm(dim=1) * u.float().norm(dim=1) * dn.float().norm(dim=0)) for g, u, dn in weights]
    if calib_tokens is None:
        raise ValueError("neuron_scores: method 'wanda' needs calib_tokens")
    norms = activation_norms(model, calib_tokens, **kwargs)
    return [hn * dn.float().abs().sum(0) for hn, (_, _, dn) in zip(norms, weights, strict=True)]


def static_pruned_ffns(model: nn.Module, scores: Sequence[Tensor], fraction: float) -> list[StaticPrunedMLP]:
    """Per layer, a :class:`StaticPrunedMLP` without the ``round(fraction * F)`` lowest-scoring neurons.

    ``fraction`` in ``[0, 1)``; at least one neuron is kept. Kept neurons stay in their order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"static pruning: fraction must be in [0, 1); got {fraction}")
    out = []
    for ffn, score in zip(model.ffns(), scores, strict=True):
        g, u, dn = dense_weights(ffn)
        Fw = g.shape[0]
        remove = min(int(round(fraction * Fw)), Fw - 1)
        order = torch.argsort(score.to(g.device), descending=True, stable=True)
        keep = order[: Fw - remove].sort().values
        out.append(StaticPrunedMLP(g[keep].clone(), u[keep].clone(), dn[:, keep].clone(), Fw))
    return out


@contextmanager
def swapped_ffns(model: nn.Module, ffns: Sequence[nn.Module]) -> Iterator[nn.Module]:
    """Within the block, ``model``'s layers use ``ffns`` (one per layer); the originals come back on exit."""
    layers = list(model.layers)
    if len(ffns) != len(layers):
        raise ValueError(f"swapped_ffns: {len(layers)} layers but {len(ffns)} FFNs")
    saved = [layer.ffn for layer in layers]
    try:
        for layer, f in zip(layers, ffns, strict=True):
            layer.ffn = f
        yield model
    finally:
        for layer, f in zip(layers, saved, strict=True):
            layer.ffn = f
