"""Training-free least-squares router (MoEfication-style, issue 5) on data with planted structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunepath_ops as pp
from prunepath_ops.convert import expert_activation_mass, fit_router_lstsq


def planted_mlp(gated, E=8, S=8, d=32, seed=0):
    """An FFN whose expert e's neurons all read direction u_e, and tokens that each stress one direction."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d, E, generator=g)).Q.t()  # [E, d] orthonormal topics
    F = E * S
    w_in = 2.0 * u.repeat_interleave(S, 0) + 0.3 * torch.randn(F, d, generator=g)
    mlp = nn.Module()
    if gated:
        mlp.gate_proj, mlp.up_proj = nn.Linear(d, F, bias=False), nn.Linear(d, F, bias=False)
        mlp.down_proj = nn.Linear(F, d, bias=False)
        mlp.gate_proj.weight.data, mlp.up_proj.weight.data = w_in, w_in.clone()
    else:
        mlp.fc1, mlp.fc2, mlp.act = nn.Linear(d, F), nn.Linear(F, d), nn.ReLU()
        mlp.fc1.weight.data, mlp.fc1.bias.data = w_in, torch.full((F,), -0.5)

    def tokens(n, seed):
        gt = torch.Generator().manual_seed(seed)
        topic = torch.randint(E, (n,), generator=gt)
        return u[topic] * (1.5 + torch.rand(n, 1, generator=gt)) + 0.3 * torch.randn(n, d, generator=gt), topic

    return mlp, tokens


@pytest.mark.parametrize(
    "gated,norm,log_mass",
    [
        (False, "l2", False),  # typical plain relu FFN, L2 mass
        (False, "l1", False),  # sum |activations|
        (True, "l2", False),  # gated silu FFN
        (True, "l2", True),  # edge: log-mass target (softmax proportional to the predicted mass)
    ],
)
def test_picks_top_mass_experts(gated, norm, log_mass):
    mlp, tokens = planted_mlp(gated)
    # Group by the planted structure: the identity permutation keeps each topic's S neurons together.
    pmlp = pp.PrunePathMLP.from_dense(mlp, 8, act="relu" if not gated else "silu")
    x_fit, _ = tokens(2048, 1)
    x_test, _ = tokens(512, 2)
    w = fit_router_lstsq(pmlp, x_fit, norm=norm, log_mass=log_mass)
    assert torch.equal(pmlp.router.weight, w)
    true_top = expert_activation_mass(pmlp, x_test, norm=norm).argmax(1)
    hit = (pmlp.router(x_test).argmax(1) == true_top).float().mean().item()
    assert hit > 0.8, f"top-1 agreement {hit:.2f} (chance 1/8)"
    # A scrambled grouping mixes topics inside every expert: its top expert is harder to predict.
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(9))
    scrambled = pp.PrunePathMLP.from_dense(mlp, 8, perm, act="relu" if not gated else "silu")
    fit_router_lstsq(scrambled, x_fit, norm=norm, log_mass=log_mass)
    hit_s = scrambled.router(x_test).argmax(1) == expert_activation_mass(scrambled, x_test, norm=norm).argmax(1)
    assert hit_s.float().mean().item() < hit


def test_mass_matches_dense_activations():
    # The per-expert mass equals the norm of the dense activations gathered by the permutation.
    mlp, tokens = planted_mlp(False)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    pmlp = pp.PrunePathMLP.from_dense(mlp, 8, perm, act="relu")
    x, _ = tokens(16, 0)
    h = torch.relu(mlp.fc1(x)).detach()[:, perm].view(16, 8, 8)  # [N, E, S]
    torch.testing.assert_close(expert_activation_mass(pmlp, x), h.norm(dim=-1))
    torch.testing.assert_close(expert_activation_mass(pmlp, x, norm="l1"), h.abs().sum(-1))


def test_assign_false_and_errors():
    mlp, tokens = planted_mlp(True)
    pmlp = pp.PrunePathMLP.from_dense(mlp, 8)
    x, _ = tokens(64, 0)
    w = fit_router_lstsq(pmlp, x, assign=False)
    assert torch.count_nonzero(pmlp.router.weight) == 0 and torch.count_nonzero(w) > 0  # router untouched
    with pytest.raises(ValueError, match="ridge"):
        fit_router_lstsq(pmlp, x, ridge=-1.0)  # edge: negative ridge
    with pytest.raises(ValueError, match="norm"):
        expert_activation_mass(pmlp, x, norm="max")  # edge: unknown mass
