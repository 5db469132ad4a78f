"""FFN sparsity (SPEC.md section 4) and tau calibration by bisection (issue 5)."""

from __future__ import annotations

import pytest
import torch

import prunepath_ops as pp
from prunepath_ops.convert import (
    CalibrationError,
    calibrate_tau,
    calibrate_tau_per_layer,
    convert_mlp,
    ffn_sparsity,
    make_measure_fn,
)
from prunepath_ops.models.llama import LlamaMLP


@pytest.mark.parametrize(
    "n,E,mask,expected",
    [
        # typical: 1 - mean(1/4, 3/4, 2/4, 2/4) = 0.5
        ([[1, 3], [2, 2]], 4, None, 0.5),
        # edge: every expert active everywhere -> 0
        ([[4, 4]], 4, None, 0.0),
        # edge: different E per layer: 1 - mean(mean(1/2, 1/2), mean(1/8, 3/8)) = 1 - (0.5 + 0.25) / 2
        ([[1, 1], [1, 3]], [2, 8], None, 0.625),
        # edge: padding: the second token (n = 4) is masked out -> 1 - mean(1/4, 2/4)
        ([[1, 4], [2, 4]], 4, [True, False], 0.625),
    ],
)
def test_ffn_sparsity_by_hand(n, E, mask, expected):
    layers = [torch.tensor(v, dtype=torch.int32) for v in n]
    m = None if mask is None else torch.tensor(mask)
    assert ffn_sparsity(layers, E, m) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "args,match",
    [
        (([], 4), "at least one layer"),  # edge: no layers
        (([torch.tensor([1])], [4, 4]), "expert counts"),  # edge: E list of the wrong length
        (([torch.tensor([1, 2])], 4, torch.tensor([False, False])), "no token"),  # edge: all padding
    ],
)
def test_ffn_sparsity_errors(args, match):
    with pytest.raises(ValueError, match=match):
        ffn_sparsity(*args)


def synthetic_layers(num_layers=3, d=32, F=256, S=16, T=384, seed=0):
    """PrunePathMLPs with random routers of different sharpness, and random tokens per layer."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mlps, xs = [], []
    for layer in range(num_layers):
        mlp, _ = convert_mlp(LlamaMLP(d, F), S, seed=layer)
        with torch.no_grad():
            mlp.router.weight.copy_(torch.randn(F // S, d, generator=g) * (0.1 + 0.15 * layer))
        mlps.append(mlp)
        xs.append(torch.randn(T, d, generator=g))
    return mlps, xs


def measured(mlps, xs, taus):
    """Independent measurement: topp_route on each layer's tokens, then the SPEC 4 formula by hand."""
    fractions = []
    for mlp, x, tau in zip(mlps, xs, taus, strict=True):
        n = pp.topp_route(mlp.router(x).detach(), tau).num_active
        fractions.append(n.double().mean() / mlp.w_down.shape[0])
    return 1.0 - float(torch.stack(fractions).mean())


@pytest.mark.parametrize(
    "target",
    [
        0.5,  # typical: half the experts off
        0.75,  # typical: the paper's high-sparsity point
        0.08,  # edge: nearly dense (tau close to 1)
        0.9,  # edge: close to the maximum 1 - 1/E = 0.9375
    ],
)
def test_calibrate_global_tau(target):
    mlps, xs = synthetic_layers()

    def run():
        for mlp, x in zip(mlps, xs, strict=True):
            mlp(x)

    res = calibrate_tau(make_measure_fn(mlps, run), target)
    assert res.converged and abs(res.sparsity - target) <= 0.01
    assert abs(measured(mlps, xs, [res.tau] * len(mlps)) - target) <= 0.01
    assert res.evaluations <= 32


def test_calibrate_with_padding_mask():
    # Edge: padding tokens (here: the second half, all routed to many experts) must not count.
    mlps, xs = synthetic_layers(num_layers=2, T=256)
    mask = torch.arange(256) < 128

    def run():
        for mlp, x in zip(mlps, xs, strict=True):
            mlp(x)

    res = calibrate_tau(make_measure_fn(mlps, run, mask), 0.6)
    assert abs(measured(mlps, [x[:128] for x in xs], [res.tau] * 2) - 0.6) <= 0.01


@pytest.mark.parametrize(
    "target",
    [
        0.3,  # typical
        0.8,  # typical: high sparsity, each layer a different tau
    ],
)
def test_calibrate_per_layer(target):
    mlps, xs = synthetic_layers()

    def run():
        for mlp, x in zip(mlps, xs, strict=True):
            mlp(x)

    results = calibrate_tau_per_layer(make_measure_fn(mlps, run, per_layer=True), len(mlps), target)
    taus = [r.tau for r in results]
    for i, (mlp, x, r) in enumerate(zip(mlps, xs, results, strict=True)):
        assert r.converged, i
        assert abs(measured([mlp], [x], [r.tau]) - target) <= 0.01, i
    assert abs(measured(mlps, xs, taus) - target) <= 0.01
    assert len(set(taus)) == len(taus)  # routers of different sharpness need different taus


@pytest.mark.parametrize(
    "target,match",
    [
        (0.97, "outside"),  # edge: above s(0) = 1 - 1/16
        (1.0, r"\[0, 1\)"),  # edge: not in [0, 1)
        (-0.1, r"\[0, 1\)"),  # edge: negative
    ],
)
def test_impossible_targets(target, match):
    mlps, xs = synthetic_layers(num_layers=1, T=64)

    def run():
        mlps[0](xs[0])

    with pytest.raises(CalibrationError, match=match):
        calibrate_tau(make_measure_fn(mlps, run), target)
    with pytest.raises(CalibrationError, match=match):
        calibrate_tau_per_layer(make_measure_fn(mlps, run, per_layer=True), 1, target)


def test_narrow_range_is_impossible():
    # Edge: a bracket [lo, hi] whose sparsities do not contain the target.
    with pytest.raises(CalibrationError, match="outside"):
        calibrate_tau(lambda tau: 1.0 - tau, 0.2, lo=0.0, hi=0.5)


def test_gap_below_one_expert_per_token():
    # Edge: any tau < 1 drops at least the last expert of every token (its cumulative sum reaches 1),
    # so s(tau) >= 1/E = 0.0625 for tau < 1 while s(1) = 0: a target of 0.03 is in the gap.
    mlps, xs = synthetic_layers(num_layers=1, T=64)
    with pytest.warns(UserWarning, match="not within"):
        res = calibrate_tau(make_measure_fn(mlps, lambda: mlps[0](xs[0])), 0.03)
    assert not res.converged and res.sparsity in (0.0, pytest.approx(1 / 16))


def test_step_function_jump_warns():
    # Edge: the sparsity jumps from 0.7 to 0.3 at tau = 0.4: 0.5 cannot be hit; closest reported.
    def step(tau):
        return 0.7 if tau < 0.4 else 0.3

    with pytest.warns(UserWarning, match="not within"):
        res = calibrate_tau(step, 0.5)
    assert not res.converged and res.sparsity in (0.3, 0.7)
    assert abs(res.tau - 0.4) < 1e-6  # bisection closed in on the jump


def test_measure_restores_nothing_but_sets_tau():
    # make_measure_fn leaves the modules at the last tau it measured and does not change outputs.
    mlps, xs = synthetic_layers(num_layers=1, T=32)
    fn = make_measure_fn(mlps, lambda: mlps[0](xs[0]))
    s_all, s_one = fn(1.0), fn(0.0)
    assert s_all == 0.0 and s_one == pytest.approx(1 - 1 / 16)
    assert mlps[0].tau == 0.0
