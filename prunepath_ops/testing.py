"""Shared helpers for the test suite and benchmarks (one module, not copies).

Public so that downstream projects testing their own use of the ops can reuse
the same tolerances and comparison rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunepath_ops import reference

#: Devices the current process can test on.
DEVICES: tuple[str, ...] = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)

#: (atol, rtol) for outputs computed in a given input dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1.3e-6 * 4),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 1.6e-2),
}

#: Cumulative sums this close to tau may round to either side of it.
TAU_BAND = 1e-6


def assert_close(
    actual: Tensor, expected: Tensor, dtype: torch.dtype | None = None, msg: str = "", *, equal_nan: bool = False
) -> None:
    """``torch.testing.assert_close`` with this project's per-dtype tolerances (NaN equal to NaN if ``equal_nan``)."""
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol, equal_nan=equal_nan, msg=lambda m: f"{msg}\n{m}" if msg else m
    )


def random_logits(
    T: int, E: int, dtype: torch.dtype = torch.float32, device: str = "cpu", *, scale: float = 2.0, seed: int = 0
) -> Tensor:
    """``[T, E]`` normal logits times ``scale``, drawn from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(T, E, generator=gen) * scale).to(dtype=dtype, device=device)


@dataclass
class RouteComparison:
    """What :func:`assert_route_matches_reference` saw."""

    rows: int
    near_tau_rows: int  # rows where some cumulative sum lies within TAU_BAND of tau
    near_tie_rows: int  # rows whose kept prefix holds distinct probabilities within 1e-6 relative


def assert_route_matches_reference(
    route: tuple[Tensor, Tensor, Tensor],
    logits: Tensor,
    tau: float | Tensor,
    *,
    min_experts: int = 1,
    max_experts: int | None = None,
    gate: str = "sigmoid",
) -> RouteComparison:
    """Check a ``topp_route`` result against :func:`prunepath_ops.reference.topp_route`.

    ``num_active`` and ``expert_ids`` must match exactly, except that (a) where a
    reference cumulative sum lies within ``TAU_BAND`` of tau, ``num_active`` may
    differ by one, and (b) experts whose probabilities differ by less than 1e-6
    relative may swap places (two correct fp32 softmaxes can order them either
    way). Even then every kept slot must hold an expert whose reference
    probability is that slot's sorted probability up to 1e-6 relative. Gates
    must equal the reference gates of the kernel's own selection to fp32
    rounding. Padding must be exactly -1 / 0.
    """
    ids, gates, n = (x.cpu() for x in route)
    ref_ids, _, ref_n = (
        x.cpu() for x in reference.topp_route(logits, tau, min_experts=min_experts, max_experts=max_experts, gate=gate)
    )
    T, E = logits.shape
    K = E if max_experts is None else max_experts
    assert ids.shape == (T, K) and ids.dtype == torch.int32, (ids.shape, ids.dtype)
    assert gates.shape == (T, K) and gates.dtype == torch.float32, (gates.shape, gates.dtype)
    assert n.shape == (T,) and n.dtype == torch.int32, (n.shape, n.dtype)
    if T == 0:
        return RouteComparison(0, 0, 0)

    p = reference.routing_probabilities(logits.cpu())  # [T, E]
    p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)
    c = torch.cumsum(p_sorted.double(), dim=-1).float()
    tau_col = (
        tau.cpu().float().reshape(-1, 1).expand(T, 1) if isinstance(tau, Tensor) else torch.full((T, 1), float(tau))
    )
    near_tau = ((c - tau_col).abs() <= TAU_BAND).any(dim=-1) & (tau_col[:, 0] < 1)
    gap = p_sorted[:, :-1] - p_sorted[:, 1:]
    # Different logits whose probabilities (nearly) coincide: equal logits tie
    # exactly in every implementation and must keep index order, but two
    # different logits can round to the same fp32 probability in one softmax
    # and not in another.
    g_sorted = reference.routing.sanitize_logits(logits.cpu()).gather(1, order)
    near_tie_pos = (gap <= 1e-6 * p_sorted[:, :-1]) & (g_sorted[:, :-1] != g_sorted[:, 1:])  # [T, E-1]
    reach = torch.maximum(n, ref_n).long().clamp(max=E - 1)  # only the kept prefix and its boundary show
    pos = torch.arange(E - 1)
    near_tie = (near_tie_pos & (pos[None, :] < reach[:, None])).any(dim=-1)

    slot = torch.arange(K)
    kept = slot[None, :] < n[:, None]
    assert bool(((n - ref_n).abs() <= near_tau.int()).all()), (
        f"num_active differs on rows {torch.nonzero((n != ref_n) & ~near_tau).flatten().tolist()[:10]}"
    )
    assert bool((ids[~kept] == -1).all()) and bool((gates[~kept] == 0).all()), "padding must be -1 / 0"
    exact_rows = ~(near_tau | near_tie)
    bad = (ids != ref_ids).any(dim=-1) & exact_rows
    assert not bool(bad.any()), f"expert_ids differ on unambiguous rows {torch.nonzero(bad).flatten().tolist()[:10]}"
    # Every kept slot holds an expert of (nearly) the right probability.
    p_of_ids = p.gather(1, ids.clamp(min=0).long())[:, :K]
    close = (p_of_ids - p_sorted[:, :K]).abs() <= 1e-6 * p_sorted[:, :K] + 1e-30
    assert bool(close[kept].all()), "a kept slot holds an expert out of probability order"
    assert bool((ids[kept] < E).all()) and bool((ids[kept] >= 0).all())
    ids_by_value = ids.sort(dim=-1).values
    repeated = (ids_by_value[:, 1:] == ids_by_value[:, :-1]) & (ids_by_value[:, 1:] >= 0)
    assert not bool(repeated.any()), "an expert is selected twice"
    # Gates: the reference gates of this very selection.
    expected_gates = reference.topp_gates(logits.cpu(), ids, gate)
    torch.testing.assert_close(gates, expected_gates, atol=2e-6, rtol=4e-6)
    return RouteComparison(T, int(near_tau.sum()), int(near_tie.sum()))


class PlainMLP(nn.Module):
    """A BERT/OPT-style dense FFN ``fc2(act(fc1(x)))`` with biases, for conversion and checkpoint tests.

    Gated (Llama-style) test FFNs use :class:`prunepath_ops.models.llama.LlamaMLP`.
    """

    def __init__(self, d: int, F: int, act: nn.Module | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, F), nn.Linear(F, d)
        self.act = act if act is not None else nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


def random_llama(config, seed: int = 0, std: float = 0.1, dtype: torch.dtype = torch.float32, device="cpu"):
    """A :class:`prunepath_ops.models.Llama` in eval mode with seeded random weights.

    Norm weights are uniform in (0.8, 1.2), every other weight normal with ``std`` (larger than a
    trained model's, so that logits are peaked and greedy decoding is not decided by rounding).
    """
    from prunepath_ops.models import Llama

    gen = torch.Generator().manual_seed(seed)
    model = Llama(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) * 0.4 + 0.8)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.to(device=device, dtype=dtype)
