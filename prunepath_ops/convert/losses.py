"""Router auxiliary losses and the tau schedule of PrunePath training (SPEC.md section 5).

Legend: B non-padding tokens, E experts. Every loss is computed in float32 from
the router logits of one layer; the caller averages over layers (or uses
:func:`router_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class RouterLosses(NamedTuple):
    """The three auxiliary losses of one layer (0-dim float32 tensors)."""

    entropy: Tensor
    balance: Tensor
    gate: Tensor


def _safe_logits(logits: Tensor) -> Tensor:
    """fp32 logits whose softmax is the one :func:`prunepath_ops.topp_route` uses.

    NaN counts as -inf; a row of only -inf/NaN is uniform; a row holding +inf
    shares its mass over the +inf entries. Written with ``where`` on the input
    so that gradients stay finite (0 on the replaced entries).
    """
    g = logits.float()
    g = torch.where(torch.isnan(g), torch.full_like(g, float("-inf")), g)
    row_max = g.detach().amax(dim=-1, keepdim=True)
    g = torch.where(row_max == float("-inf"), torch.zeros_like(g), g)
    pos = g == float("inf")
    return torch.where(row_max == float("inf"), torch.where(pos, 0.0, float("-inf")), g)


def _flatten(logits: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``[..., E]`` logits and ``[...]`` mask -> ``[N, E]`` logits and ``[N]`` float32 weights."""
    E = logits.shape[-1]
    g = logits.reshape(-1, E)
    if mask is None:
        w = torch.ones(g.shape[0], dtype=torch.float32, device=g.device)
    else:
        if tuple(mask.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"router losses: mask must be {list(logits.shape[:-1])}; got {list(mask.shape)}")
        w = mask.reshape(-1).to(device=g.device, dtype=torch.float32)
    return g, w


def router_losses(logits: Tensor, mask: Tensor | None = None) -> RouterLosses:
    """L_ent, L_bal and L_gate of one layer over its B non-padding tokens.

    - ``L_ent  = -(1/B) sum_i sum_e p_ie log p_ie`` (with ``0 log 0 = 0``),
    - ``L_bal  = E * sum_e ((1/B) sum_i p_ie)^2``,
    - ``L_gate = (1/(B*E)) sum_i sum_e sigmoid(g_ie)``,

    with ``p = softmax(g)`` in float32.

    Parameters
    ----------
    logits : Tensor
        ``[..., E]`` router logits, any float dtype; -inf and NaN (= -inf) allowed.
    mask : Tensor, optional
        ``[...]`` bool (or 0/1), True on the tokens that count (not padding).
        Default: every token.

    Returns
    -------
    RouterLosses
        0-dim float32 tensors, differentiable w.r.t. ``logits``. With no token
        (B = 0) all three are 0.

    Examples
    --------
    >>> losses = router_losses(torch.zeros(3, 4))  # uniform routing
    >>> round(losses.entropy.item(), 4), losses.balance.item(), losses.gate.item()
    (1.3863, 1.0, 0.5)
    """
    g, w = _flatten(logits, mask)
    E = g.shape[-1]
    B = w.sum().clamp_min(1.0)  # B = 0 gives 0 / 1 = 0, not NaN
    z = _safe_logits(g)
    p = torch.softmax(z, dim=-1)  # [N, E]
    logp = torch.log_softmax(z, dim=-1)
    # 0 log 0 = 0: replace log p where p == 0 before the product (also keeps the gradient finite).
    logp = torch.where(p > 0, logp, torch.zeros_like(logp))
    entropy = -((p * logp).sum(-1) * w).sum() / B
    load = (p * w[:, None]).sum(0) / B  # [E] mean probability per expert
    balance = E * (load**2).sum()
    gate_logits = torch.where(torch.isnan(g.float()), float("-inf"), g.float())
    gate = (torch.sigmoid(gate_logits).sum(-1) * w).sum() / (B * E)
    return RouterLosses(entropy, balance, gate)


def router_loss(
    logits_per_layer: Sequence[Tensor],
    mask: Tensor | None = None,
    *,
    eta: float = 3e-4,
    lam: float = 1e-3,
    gamma: float = 0.0,
) -> Tensor:
    """``eta * L_ent + lam * L_bal + gamma * L_gate``, each averaged over layers (add it to L_task).

    Parameters
    ----------
    logits_per_layer : sequence of Tensor
        One ``[..., E_l]`` logits tensor per layer (E may differ between layers).
    mask : Tensor, optional
        ``[...]`` non-padding mask shared by the layers.
    eta, lam, gamma : float
        The paper's defaults: ``eta = 3e-4``, ``lambda = 1e-3``; ``gamma`` (L_gate) off.

    Returns
    -------
    Tensor
        0-dim float32.

    Examples
    --------
    >>> round(router_loss([torch.zeros(2, 4)] * 3, eta=1.0, lam=0.0).item(), 4)  # log 4
    1.3863
    """
    if not logits_per_layer:
        raise ValueError("router_loss: needs at least one layer")
    parts = [router_losses(g, mask) for g in logits_per_layer]
    n = len(parts)
    return sum(eta * p.entropy + lam * p.balance + gamma * p.gate for p in parts) / n


@dataclass(frozen=True)
class TauSchedule:
    """Warm-up with every expert active, then a linear decay of tau (SPEC.md section 5).

    ``tau(step) = tau_warmup`` for ``step < warmup_steps``, then linear from
    ``tau_warmup`` at ``warmup_steps`` to ``tau_min`` at ``total_steps``, and
    ``tau_min`` afterwards.

    Parameters
    ----------
    warmup_steps : int
        W >= 0.
    total_steps : int
        >= W; with ``total_steps == W`` tau drops to ``tau_min`` right after warm-up.
    tau_min : float
        Target threshold, in ``(0, tau_warmup]``.
    tau_warmup : float
        Warm-up threshold (the paper: 1.05, i.e. every expert, gates still applied).

    Examples
    --------
    >>> s = TauSchedule(warmup_steps=10, total_steps=110, tau_min=0.55)
    >>> s(0), s(9), s(10), round(s(60), 4), s(110), s(500)
    (1.05, 1.05, 1.05, 0.8, 0.55, 0.55)
    """

    warmup_steps: int
    total_steps: int
    tau_min: float
    tau_warmup: float = 1.05

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.total_steps < self.warmup_steps:
            raise ValueError(
                f"TauSchedule: need 0 <= warmup_steps <= total_steps; got {self.warmup_steps}, {self.total_steps}"
            )
        if not 0.0 < self.tau_min <= self.tau_warmup:
            raise ValueError(f"TauSchedule: need 0 < tau_min <= tau_warmup; got {self.tau_min}, {self.tau_warmup}")

    def __call__(self, step: int) -> float:
        """Tau at optimisation step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"TauSchedule: step must be >= 0; got {step}")
        if step < self.warmup_steps:
            return self.tau_warmup
        span = self.total_steps - self.warmup_steps
        frac = 1.0 if span == 0 else min(1.0, (step - self.warmup_steps) / span)
        return self.tau_warmup + (self.tau_min - self.tau_warmup) * frac
