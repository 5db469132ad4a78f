"""Balanced k-means (issue 5, SPEC.md section 1): exact cluster sizes, determinism, planted clusters."""

from __future__ import annotations

import time

import pytest
import torch

from prunepath_ops.convert import balanced_assign, balanced_kmeans


def planted(E, S, D, noise, seed=0):
    """E well-separated directions, S noisy copies of each, rows shuffled; returns (weight, true cluster)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(E, D, generator=g)
    w = centres.repeat_interleave(S, 0) + noise * torch.randn(E * S, D, generator=g)
    shuffle = torch.randperm(E * S, generator=g)
    return w[shuffle], (torch.arange(E * S) // S)[shuffle]


def check_partition(res, F, S):
    E = F // S
    assert sorted(res.permutation.tolist()) == list(range(F))
    assert torch.bincount(res.assignment, minlength=E).tolist() == [S] * E
    blocks = res.permutation.view(E, S)
    # Expert e is exactly the neurons assigned to cluster e, ascending inside the expert.
    assert torch.equal(res.assignment[blocks], torch.arange(E)[:, None].expand(E, S))
    assert torch.equal(blocks, blocks.sort(dim=1).values)
    # Clusters are numbered by their smallest member.
    assert torch.equal(blocks[:, 0], blocks[:, 0].sort().values)


@pytest.mark.parametrize(
    "F,D,S",
    [
        (64, 8, 16),  # edge: few clusters
        (96, 5, 32),  # edge: D < S, many ties in similarity
        (32, 4, 32),  # edge: E = 1, a single cluster
        (24, 6, 1),  # edge: S = 1, every neuron its own expert
        (512, 32, 16),  # typical: 32 clusters
    ],
)
@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_exact_sizes_and_layout(F, D, S, init):
    w = torch.randn(F, D, generator=torch.Generator().manual_seed(F + D))
    res = balanced_kmeans(w, S, seed=1, init=init)
    check_partition(res, F, S)
    assert torch.allclose(res.centroids.norm(dim=1), torch.ones(F // S), atol=1e-5)


@pytest.mark.parametrize("noise", [0.1, 0.5])  # edge: 0.5 makes the clusters overlap noticeably
@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_recovers_planted_clusters(noise, init):
    E, S = 12, 16
    w, truth = planted(E, S, 64, noise)
    res = balanced_kmeans(w, S, seed=0, init=init, max_iter=50)
    check_partition(res, E * S, S)
    # Every expert holds the S copies of one centre.
    for e in range(E):
        assert truth[res.permutation[e * S : (e + 1) * S]].unique().numel() == 1, f"expert {e} mixes clusters"


def test_beats_random_partition():
    # Typical: on unstructured data the objective must still beat an arbitrary balanced split.
    w = torch.randn(256, 16, generator=torch.Generator().manual_seed(3))
    res = balanced_kmeans(w, 16, seed=0)
    x = w / w.norm(dim=1, keepdim=True)
    c = x.view(16, 16, -1).sum(1)
    arbitrary = float((x.view(16, 16, -1) * (c / c.norm(dim=1, keepdim=True))[:, None]).sum(-1).mean())
    assert res.objective > arbitrary + 0.05


def test_deterministic_and_seed_dependent():
    w = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    a, b = balanced_kmeans(w, 16, seed=7), balanced_kmeans(w, 16, seed=7)
    assert torch.equal(a.permutation, b.permutation) and torch.equal(a.assignment, b.assignment)
    g = torch.Generator().manual_seed(7)
    c = balanced_kmeans(w, 16, generator=g)  # an explicit generator seeded alike gives the same result
    assert torch.equal(a.permutation, c.permutation)
    assert not torch.equal(a.permutation, balanced_kmeans(w, 16, seed=8).permutation)


def test_dead_neurons():
    # Edge: zero rows (dead neurons) must not produce NaN and still get placed.
    w = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    w[::5] = 0
    res = balanced_kmeans(w, 16, seed=0)
    check_partition(res, 64, 16)
    assert res.objective == res.objective


def test_input_dtype_and_grad():
    # Edge: half-precision weights that require grad are accepted (computed in fp32, detached).
    w = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)).half().requires_grad_()
    res = balanced_kmeans(w, 16, seed=0)
    check_partition(res, 64, 16)
    assert res.permutation.dtype == torch.int64


@pytest.mark.parametrize(
    "sim,capacity,expected",
    [
        # typical: every row prefers column 0; rows 0 and 1 are the most similar and fill it,
        # rows 2 and 3 overflow into column 1
        ([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.1, 0.0]], 2, [0, 0, 1, 1]),
        # edge: every row prefers column 0; the two most similar rows win it, the rest overflow
        ([[0.5, 0.0], [0.9, 0.0], [0.7, 0.1], [0.6, 0.2]], 2, [1, 0, 0, 1]),
        # edge: all equal similarities: ties go to the lower row and the lower column
        ([[0.0, 0.0, 0.0]] * 3, 1, [0, 1, 2]),
    ],
)
def test_balanced_assign_by_hand(sim, capacity, expected):
    assert balanced_assign(torch.tensor(sim), capacity).tolist() == expected


def test_balanced_assign_capacity_all_prefer_one():
    # Edge: 40 rows all preferring column 0 with capacity 8: exactly 8 per column, the 8 best in column 0.
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(40, 5, generator=g) * 0.1
    sim[:, 0] += 1 + torch.rand(40, generator=g)
    assign = balanced_assign(sim, 8)
    assert torch.bincount(assign, minlength=5).tolist() == [8] * 5
    assert set(torch.nonzero(assign == 0)[:, 0].tolist()) == set(sim[:, 0].topk(8).indices.tolist())


@pytest.mark.parametrize(
    "shape,S,match",
    [
        ((30, 4), 8, "must divide"),  # edge: S does not divide F
        ((32,), 8, r"\[F, D\]"),  # edge: 1-D input
    ],
)
def test_errors(shape, S, match):
    with pytest.raises(ValueError, match=match):
        balanced_kmeans(torch.randn(shape), S)


def test_smollm_shape_is_fast():
    # SmolLM2-135M: F = 1536 neurons of d = 576, S = 32 -> 48 experts, seconds on the CPU.
    w = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    res = balanced_kmeans(w, 32, seed=0)
    elapsed = time.perf_counter() - t0
    check_partition(res, 1536, 32)
    assert elapsed < 20, f"balanced k-means on 1536 x 576 took {elapsed:.1f} s"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_partition_on_planted_data():
    w, truth = planted(8, 32, 64, 0.1)
    cpu = balanced_kmeans(w, 32, seed=0)
    gpu = balanced_kmeans(w.cuda(), 32, seed=0)
    assert gpu.permutation.is_cuda
    assert torch.equal(cpu.permutation, gpu.permutation.cpu())
