"""prunepath::align_experts (C++ CPU kernel, CUDA kernel) against the pure-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

import prunepath_ops as pp
from prunepath_ops import reference as R


def random_routing(T, E, K, seed=0, device="cpu"):
    """Distinct experts per token, random num_active, junk (incl. out-of-range ids) beyond it."""
    g = torch.Generator().manual_seed(seed)
    ids = (
        torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
        if T
        else torch.zeros(0, K, dtype=torch.int32)
    )
    n = torch.randint(0, K + 1, (T,), generator=g).int()
    pad = torch.arange(K)[None, :] >= n[:, None]
    junk = torch.randint(-3, 3 * E, ids.shape, generator=g, dtype=torch.int32)
    return torch.where(pad, junk, ids).to(device), n.to(device)


CASES = [
    (0, 4, 4, 4),  # no tokens
    (1, 8, 5, 1),  # one token, block_m = 1
    (7, 4, 4, 4),  # K = E
    (33, 10, 6, 16),  # T just above one 32-token chunk
    (97, 48, 48, 64),  # prime T, SmolLM-like E, large padding
]


@pytest.mark.parametrize("T,E,K,bm", CASES)
def test_cpu_matches_reference(T, E, K, bm):
    ids, n = random_routing(T, E, K)
    got = pp.align_experts(ids, n, E, bm)
    want = R.align_experts(ids, n, E, bm)
    for name, a, b in zip(got._fields, got, want, strict=True):
        assert torch.equal(a, b), name


def test_structure():
    ids, n = random_routing(50, 12, 7, seed=3)
    bm = 8
    a = pp.align_experts(ids, n, 12, bm)
    rows = int(a.expert_offsets[-1])
    assert rows % bm == 0 and int(a.expert_counts.sum()) == int(n.sum())
    for e in range(12):
        lo, c = int(a.expert_offsets[e]), int(a.expert_counts[e])
        seg = a.sorted_pairs[lo : lo + c]
        assert bool((ids.flatten()[seg.long()] == e).all())
        assert bool((seg[1:] > seg[:-1]).all())  # token order within an expert
        assert bool((a.sorted_pairs[lo + c : int(a.expert_offsets[e + 1])] == -1).all())
        assert bool((a.block_expert[lo // bm : int(a.expert_offsets[e + 1]) // bm] == e).all())
    assert bool((a.block_expert[rows // bm :] == -1).all()) and bool((a.sorted_pairs[rows:] == -1).all())


def test_rejects_bad_active_id_on_cpu():
    with pytest.raises(ValueError, match="outside"):
        pp.align_experts(torch.tensor([[0, 9]], dtype=torch.int32), torch.tensor([2], dtype=torch.int32), 4, 2)


def test_opcheck():
    ids, n = random_routing(9, 6, 3)
    torch.library.opcheck(torch.ops.prunepath.align_experts.default, (ids, n, 6, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "T,E,K,bm",
    CASES
    + [
        (4096, 448, 448, 64),  # Llama-3-8B's E, many chunks
        (16, 448, 448, 16),  # one partial chunk
        (1000, 4096, 8, 16),  # large E, few pairs: most experts empty
        (40, 8192, 16, 256),  # the CUDA kernel's largest E (its offsets fill shared memory), a long -1 tail
        (300, 7, 7, 3),  # block_m not a power of two: the tail starts at an odd row
    ],
)
def test_cuda_matches_cpu(T, E, K, bm):
    ids, n = random_routing(T, E, K, seed=T)
    want = pp.align_experts(ids, n, E, bm)
    got = pp.align_experts(ids.cuda(), n.cuda(), E, bm)
    for name, a, b in zip(got._fields, got, want, strict=True):
        assert torch.equal(a.cpu(), b), name
