"""Router losses (SPEC.md section 5) against hand computations, and the tau schedule."""

from __future__ import annotations

import math

import pytest
import torch

from prunepath_ops.convert import RouterLosses, TauSchedule, router_loss, router_losses

LN3, INF, NAN = math.log(3.0), float("inf"), float("nan")


@pytest.mark.parametrize(
    "logits,mask,expected",
    [
        # typical: p = [1/4, 3/4] and [3/4, 1/4]; H = 0.25 ln 4 + 0.75 ln(4/3) = 0.562335;
        # load = [1/2, 1/2] -> L_bal = 2 * (1/4 + 1/4) = 1; gates (1/2 + 3/4 + 3/4 + 1/2) / 4 = 0.625
        ([[0.0, LN3], [LN3, 0.0]], None, (0.562335, 1.0, 0.625)),
        # edge: one token, load = [1/4, 3/4] -> L_bal = 2 * (1/16 + 9/16) = 1.25
        ([[0.0, LN3]], None, (0.562335, 1.25, 0.625)),
        # edge: a -inf logit: p = [1/2, 0, 1/2], 0 log 0 = 0 -> H = ln 2; L_bal = 3 * (1/4 + 1/4) = 1.5;
        # gates (1/2 + 0 + 1/2) / 3
        ([[0.0, -INF, 0.0]], None, (0.693147, 1.5, 1 / 3)),
        # edge: all -inf: uniform (as topp_route) -> H = ln 4, L_bal = 1, every sigmoid gate 0
        ([[-INF, -INF, -INF, -INF]], None, (1.386294, 1.0, 0.0)),
        # edge: NaN counts as -inf: p = [0, 1] -> H = 0, L_bal = 2; gates (0 + 1/2) / 2
        ([[NAN, 0.0]], None, (0.0, 2.0, 0.25)),
        # edge: +inf: the mass goes to the +inf entry -> H = 0, L_bal = 2, gates (1 + sigmoid(0)) / 2
        ([[INF, 0.0]], None, (0.0, 2.0, 0.75)),
        # typical with padding: the third token is masked out, so the result is the first case's
        ([[0.0, LN3], [LN3, 0.0], [50.0, -50.0]], [True, True, False], (0.562335, 1.0, 0.625)),
        # edge: every token is padding (B = 0): all zero, no NaN
        ([[0.0, LN3]], [False], (0.0, 0.0, 0.0)),
    ],
)
def test_hand_computed(logits, mask, expected):
    g = torch.tensor(logits)
    m = None if mask is None else torch.tensor(mask)
    got = router_losses(g, m)
    assert isinstance(got, RouterLosses)
    for value, want, name in zip(got, expected, ("entropy", "balance", "gate"), strict=True):
        assert value.dtype == torch.float32 and value.dim() == 0
        assert value.item() == pytest.approx(want, abs=1e-5), name


def test_batched_shape_and_mask():
    # Typical: [batch, seq, E] logits with a [batch, seq] mask equal the flattened masked tokens.
    g = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    got = router_losses(g, mask)
    flat = router_losses(g[mask])
    for a, b in zip(got, flat, strict=True):
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
    # And the general formulas, written out independently.
    p = torch.softmax(g[mask].double(), -1)
    B, E = p.shape
    assert got.entropy.item() == pytest.approx(float(-(p * p.log()).sum() / B), rel=1e-5)
    assert got.balance.item() == pytest.approx(float(E * ((p.sum(0) / B) ** 2).sum()), rel=1e-5)
    assert got.gate.item() == pytest.approx(float(torch.sigmoid(g[mask].double()).sum() / (B * E)), rel=1e-5)
    with pytest.raises(ValueError, match="mask"):
        router_losses(g, mask[0])  # edge: mask of the wrong shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # edge: bf16 logits, fp32 losses
def test_gradients_finite_with_inf_and_nan(dtype):
    g = torch.tensor([[0.0, -INF, 1.0], [-INF, -INF, -INF], [NAN, 2.0, -1.0], [INF, 0.0, 0.0]], dtype=dtype)
    g.requires_grad_()
    losses = router_losses(g)
    sum(losses).backward()
    assert torch.isfinite(g.grad).all()
    assert all(torch.isfinite(v) for v in losses)
    # Entropy is lowered by sharpening: the gradient on the top logit of a finite row is negative.
    h = torch.tensor([[2.0, 1.0, 0.0]], requires_grad=True)
    router_losses(h).entropy.backward()
    assert h.grad[0, 0] < 0


def test_balance_minimum_at_uniform_load():
    # L_bal >= 1 with equality iff the mean load is uniform (Cauchy-Schwarz).
    g = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)) * 3
    assert router_losses(g).balance.item() > 1.0
    balanced = torch.cat([g, g.roll(1, dims=1), g.roll(2, dims=1), g.roll(3, dims=1)])
    balanced = torch.cat([balanced, balanced.roll(4, dims=1)])
    assert router_losses(balanced).balance.item() == pytest.approx(1.0, abs=1e-5)


def test_router_loss_averages_layers():
    # Two layers with different E: eta * mean entropy + lam * mean balance + gamma * mean gate.
    a = torch.tensor([[0.0, LN3]])  # H = 0.562335, L_bal = 1.25, L_gate = 0.625
    b = torch.zeros(1, 4)  # H = ln 4, L_bal = 4 * 4 / 16 = 1, L_gate = 0.5
    got = router_loss([a, b], eta=1.0, lam=10.0, gamma=100.0).item()
    want = (0.562335 + 1.386294) / 2 + 10 * (1.25 + 1.0) / 2 + 100 * (0.625 + 0.5) / 2
    assert got == pytest.approx(want, abs=1e-4)
    paper = router_loss([a, b]).item()  # eta = 3e-4, lambda = 1e-3, gamma = 0
    assert paper == pytest.approx(3e-4 * (0.562335 + 1.386294) / 2 + 1e-3 * (1.25 + 1.0) / 2, abs=1e-7)
    with pytest.raises(ValueError):
        router_loss([])  # edge: no layers


@pytest.mark.parametrize(
    "W,total,tau_min,steps,expected",
    [
        # typical: 10 warm-up steps at 1.05, then 100 steps down to 0.55 (0.005 per step)
        (10, 110, 0.55, [0, 9, 10, 11, 60, 109, 110, 1000], [1.05, 1.05, 1.05, 1.045, 0.8, 0.555, 0.55, 0.55]),
        # edge: no warm-up, decay from step 0
        (0, 4, 0.65, [0, 1, 2, 4, 5], [1.05, 0.95, 0.85, 0.65, 0.65]),
        # edge: total == warm-up: the target right after the warm-up
        (3, 3, 0.5, [0, 2, 3, 7], [1.05, 1.05, 0.5, 0.5]),
    ],
)
def test_tau_schedule(W, total, tau_min, steps, expected):
    sched = TauSchedule(warmup_steps=W, total_steps=total, tau_min=tau_min)
    assert [sched(s) for s in steps] == pytest.approx(expected, abs=1e-12)
    values = [sched(s) for s in range(total + 3)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # non-increasing


@pytest.mark.parametrize(
    "kwargs",
    [
        {"warmup_steps": 5, "total_steps": 4, "tau_min": 0.5},  # edge: total < warm-up
        {"warmup_steps": -1, "total_steps": 4, "tau_min": 0.5},  # edge: negative warm-up
        {"warmup_steps": 0, "total_steps": 4, "tau_min": 0.0},  # edge: tau_min 0
        {"warmup_steps": 0, "total_steps": 4, "tau_min": 1.2},  # edge: tau_min above the warm-up tau
    ],
)
def test_tau_schedule_errors(kwargs):
    with pytest.raises(ValueError):
        TauSchedule(**kwargs)
    with pytest.raises(ValueError):
        TauSchedule(0, 1, 0.5)(-1)  # edge: negative step
