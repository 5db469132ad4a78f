"""Top-p (cumulative-mass) routing, SPEC.md section 3, step by step.

Legend for shape comments: T tokens, E experts, K output slots per token
(``max_experts`` or E).
"""

from __future__ import annotations

import torch
from torch import Tensor

GATE_MODES = ("sigmoid", "prob", "renorm", "one")


def sanitize_logits(logits: Tensor) -> Tensor:
    """fp32 copy of ``logits`` with NaN replaced by -inf (SPEC.md 3, ours)."""
    g = logits.float()
    return torch.where(torch.isnan(g), torch.full_like(g, float("-inf")), g)


def routing_probabilities(logits: Tensor) -> Tensor:
    """Softmax over experts in fp32, defined for every row.

    Rows that ``torch.softmax`` leaves undefined get a definition: a row whose
    logits are all -inf or NaN is uniform (1/E each), and a row holding +inf
    splits the mass evenly over its +inf entries.

    Parameters
    ----------
    logits : Tensor
        ``[T, E]``, any float dtype.

    Returns
    -------
    Tensor
        ``[T, E]`` float32 probabilities; each row sums to 1.
    """
    g = sanitize_logits(logits)  # [T, E]
    row_max = g.amax(dim=-1, keepdim=True)  # [T, 1]
    all_neg_inf = row_max == float("-inf")
    has_pos_inf = row_max == float("inf")
    zero = torch.zeros_like(g)
    z = torch.where(all_neg_inf, zero, g)
    z = torch.where(has_pos_inf, torch.where(g == float("inf"), zero, torch.full_like(g, float("-inf"))), z)
    return torch.softmax(z, dim=-1)


def topp_gates(logits: Tensor, expert_ids: Tensor, gate: str) -> Tensor:
    """Gates of a given selection, differentiable with respect to ``logits``.

    This is the training path's reference: the selection is not differentiable,
    the gates are (SPEC.md section 5).

    Parameters
    ----------
    logits : Tensor
        ``[T, E]`` router logits.
    expert_ids : Tensor
        ``[T, K]`` int selection, -1 where a slot is unused.
    gate : str
        One of ``GATE_MODES``.

    Returns
    -------
    Tensor
        ``[T, K]`` float32 gates, 0 in unused slots.
    """
    if gate not in GATE_MODES:
        raise ValueError(f"gate must be one of {GATE_MODES}; got {gate!r}")
    kept = expert_ids >= 0  # [T, K]
    idx = expert_ids.clamp(min=0).long()  # [T, K]
    if gate == "sigmoid":
        values = torch.sigmoid(sanitize_logits(logits).gather(1, idx))
    elif gate == "one":
        values = torch.ones(idx.shape, dtype=torch.float32, device=logits.device)
    else:
        values = routing_probabilities(logits).gather(1, idx)
        if gate == "renorm":
            values = values / (values * kept).sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(kept, values, torch.zeros_like(values))


def topp_route(
    logits: Tensor,
    tau: float | Tensor,
    *,
    min_experts: int = 1,
    max_experts: int | None = None,
    gate: str = "sigmoid",
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference top-p routing; same contract as :func:`prunepath_ops.topp_route`.

    Returns
    -------
    expert_ids : Tensor
        ``[T, K]`` int32, descending probability, ties to the lower index, -1 padded.
    gates : Tensor
        ``[T, K]`` float32, 0 padded.
    num_active : Tensor
        ``[T]`` int32.
    """
    T, E = logits.shape
    K = E if max_experts is None else max_experts
    # 1. p = softmax(g) in fp32.
    p = routing_probabilities(logits)  # [T, E]
    # 2. Largest first; the stable sort keeps the lower index first on ties.
    p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)  # [T, E]
    # 3. Inclusive cumulative sum in sorted order, fp32. Summed in float64 and
    # rounded once: the correctly rounded fp32 value every kernel is held to.
    c = torch.cumsum(p_sorted.double(), dim=-1).float()  # [T, E]
    # 4. n = length of the prefix with c < tau, then the clamps.
    if isinstance(tau, Tensor):
        tau_col = tau.to(device=logits.device, dtype=torch.float32).reshape(-1, 1).expand(T, 1)
    else:
        tau_col = torch.full((T, 1), float(tau), dtype=torch.float32, device=logits.device)
    n = (c < tau_col).int().cumprod(dim=-1).sum(dim=-1)  # [T]
    n = torch.where(tau_col[:, 0] >= 1.0, torch.full_like(n, E), n)
    n = n.clamp(min=min_experts).clamp(max=K).int()
    # 5. Gates of the kept prefix; unused slots padded.
    slot = torch.arange(K, device=logits.device)
    kept = slot[None, :] < n[:, None]  # [T, K]
    expert_ids = torch.where(kept, order[:, :K], torch.full_like(order[:, :K], -1)).int()
    if gate == "renorm":
        # The kept mass is c at the last kept slot: the same sum the scan produced.
        kept_mass = c.gather(1, (n.long() - 1).clamp(min=0)[:, None])  # [T, 1]
        gates = torch.where(kept, p_sorted[:, :K] / kept_mass, torch.zeros_like(p_sorted[:, :K]))
    else:
        gates = topp_gates(logits, expert_ids, gate)
    return expert_ids, gates.float(), n


def linear_topp_route(
    x: Tensor,
    weight: Tensor,
    tau: float | Tensor,
    *,
    min_experts: int = 1,
    max_experts: int | None = None,
    gate: str = "sigmoid",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference of :func:`prunepath_ops.linear_topp_route`: the router projection, then routing.

    ``x [T, d]`` and ``weight [E, d]`` in one dtype; the logits ``[T, E]`` are ``F.linear``'s
    output in that dtype, routed by :func:`topp_route`.

    Returns
    -------
    logits, expert_ids, gates, num_active : Tensor
        ``[T, E]`` (dtype of ``x``), ``[T, K]`` int32, ``[T, K]`` float32, ``[T]`` int32.
    """
    logits = torch.nn.functional.linear(x, weight)  # [T, E]
    return (logits, *topp_route(logits, tau, min_experts=min_experts, max_experts=max_experts, gate=gate))


def norm_linear_topp_route(
    x: Tensor,
    residual: Tensor | None,
    norm_weight: Tensor,
    weight: Tensor,
    tau: float | Tensor,
    *,
    eps: float = 1e-5,
    min_experts: int = 1,
    max_experts: int | None = None,
    gate: str = "sigmoid",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reference of :func:`prunepath_ops.norm_linear_topp_route`: ``add_rms_norm``, then :func:`linear_topp_route`.

    Returns
    -------
    y, h, logits, expert_ids, gates, num_active : Tensor
        ``[T, d]``, ``[T, d]`` (dtype of ``x``), then :func:`linear_topp_route`'s four outputs for ``y``.
    """
    from prunepath_ops.reference.decode_step import add_rms_norm

    y, h = add_rms_norm(x, residual, norm_weight, eps)
    route = linear_topp_route(y, weight, tau, min_experts=min_experts, max_experts=max_experts, gate=gate)
    return (y, h, *route)
