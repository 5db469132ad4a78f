"""Decode attention over a KV cache (issue 4) against two oracles: the loop reference and SDPA over the valid prefix.

Legend: B sequences, Hq query heads, Hkv kv heads, D head dim, S_max cache rows, L keys attended.

CPU: the vectorised composite (backend "cpu") and the Triton kernels under TRITON_INTERPRET=1
(fp32/fp16, B <= 3, S_max <= 64, D in {16, 64}). GPU: everything, bf16, Llama-like shapes, bitwise
determinism and CUDA-graph replay with new lengths.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from prunepath_ops import reference as R
from prunepath_ops.attention import kv_decode_attention
from prunepath_ops.attention.kernels import length_split_plan as device_length_split_plan
from prunepath_ops.attention.kernels import sequence_chunk as device_sequence_chunk
from prunepath_ops.attention.triton_attention import MIN_CHUNK, SHORT_CACHE, sequence_split, split_plan
from prunepath_ops.testing import assert_close

HAS_CUDA = torch.cuda.is_available()
TRITON_OK = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
BACKENDS = ["cpu", pytest.param("triton", marks=needs_triton)]
POISON = float("nan")  # cache rows that are not attended hold NaN: reading one would show


def device_for(backend: str) -> str:
    """Triton runs on the GPU when there is one, else on CPU tensors under the interpreter."""
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


def attended(lens: list[int], S_max: int, with_new: bool) -> list[int]:
    """Keys each sequence attends to: the documented clamp rule."""
    if with_new:
        return [min(max(n, 0), S_max) + (0 <= n < S_max) for n in lens]
    return [min(max(n, 0), S_max) for n in lens]


def make_case(lens, Hq, Hkv, D, S_max, dtype, device, with_new, seed=0):
    """(q, k_cache, v_cache, cache_seqlens, k_new, v_new); every row from cache_seqlens[b] on is NaN.

    The row the append overwrites is NaN too: a kernel reading it before (or instead of) the write shows.
    """
    g = torch.Generator().manual_seed(seed)
    B = len(lens)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)

    q, k, v = rnd(B, Hq, D), rnd(B, S_max, Hkv, D), rnd(B, S_max, Hkv, D)
    for b, n in enumerate(attended(lens, S_max, False)):
        k[b, n:] = POISON
        v[b, n:] = POISON
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    kn, vn = (rnd(B, Hkv, D), rnd(B, Hkv, D)) if with_new else (None, None)
    return q, k, v, seqlens, kn, vn


def sdpa_oracle(q, k_cache, v_cache, L, scale):
    """``[B, Hq, D]`` float64: SDPA (is_causal=False) over exactly the first L_b rows, zeros for L_b = 0."""
    B, Hq, D = q.shape
    group = Hq // k_cache.shape[2]
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b, n in enumerate(L):
        if n == 0:
            continue
        k = k_cache[b, :n].cpu().double().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
        v = v_cache[b, :n].cpu().double().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
        qb = q[b].cpu().double()[:, None, :]  # [Hq, 1, D]
        out[b] = F.scaled_dot_product_attention(qb, k, v, is_causal=False, scale=scale)[:, 0]
    return out


def run_and_check(backend, lens, Hq, Hkv, D, S_max, dtype, with_new, scale=None, seed=0):
    """Run the op; check it against the reference, SDPA, and the caches written in place (exactly)."""
    device = device_for(backend)
    q, k, v, seqlens, kn, vn = make_case(lens, Hq, Hkv, D, S_max, dtype, device, with_new, seed)
    k_ref, v_ref = k.cpu().clone(), v.cpu().clone()
    cpu = (t.cpu() if t is not None else None for t in (q, seqlens, kn, vn))
    q_c, lens_c, kn_c, vn_c = cpu
    expected = R.kv_decode_attention(q_c, k_ref, v_ref, lens_c, kn_c, vn_c, softmax_scale=scale)  # appends too
    out = kv_decode_attention(q, k, v, seqlens, kn, vn, softmax_scale=scale, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert_close(out.cpu().float(), expected.float(), dtype)
    L = attended(lens, S_max, with_new)
    sdpa = sdpa_oracle(q, k_ref, v_ref, L, scale if scale is not None else 1 / math.sqrt(D))
    assert_close(out.cpu().double(), sdpa, dtype)
    # The appended rows and only them changed (NaN-poisoned rows compare equal to themselves).
    torch.testing.assert_close(k.cpu(), k_ref, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v.cpu(), v_ref, atol=0, rtol=0, equal_nan=True)
    for b, n in enumerate(L):
        if n == 0:
            assert bool((out[b] == 0).all()), "a sequence without keys must give exact zeros"
    return out


CASES = [
    ([0, 1, 37], 4, 1, 16, 48),  # an empty sequence, a single key, 37 not a multiple of the tile; GQA 4
    ([5, 64, 63], 8, 8, 16, 64),  # GQA 1 (MHA); a full cache (L = S_max) and S_max - 1
    ([60, 2, 9], 8, 1, 64, 64),  # GQA 8, D = 64; one long sequence next to two short ones
    ([17, 33], 8, 2, 64, 40),  # B = 2, lengths just past tile and split boundaries
    ([3, 90, 200], 32, 8, 128, 256),  # D = 128, Llama-like heads (CPU composite only under the interpreter)
]


def _skip_slow_interpreter(backend, D, S_max):
    if backend == "triton" and not HAS_CUDA and (D > 64 or S_max > 64):
        pytest.skip("the interpreter takes D <= 64, S_max <= 64 (the GPU runs this case)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_new", [False, True], ids=["no-append", "append"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lens,Hq,Hkv,D,S_max", CASES)
def test_matches_reference_and_sdpa(backend, lens, Hq, Hkv, D, S_max, dtype, with_new):
    if with_new and max(lens) >= S_max:
        lens = [min(n, S_max - 1) for n in lens]  # the append needs a free row
    _skip_slow_interpreter(backend, D, S_max)
    run_and_check(backend, lens, Hq, Hkv, D, S_max, dtype, with_new)


@pytest.mark.parametrize("backend", BACKENDS)
# flatter and sharper than 1/sqrt(D); scores in the hundreds, where exp overflows without a running max
@pytest.mark.parametrize("scale", [0.05, 1.7, 40.0])
def test_softmax_scale(backend, scale):
    run_and_check(backend, [7, 40, 1], 8, 2, 16, 48, torch.float32, True, scale=scale)


@needs_triton
# one kernel (no combine); two chunks of half a sequence's keys in whole tiles; one 16-key tile per chunk
@pytest.mark.parametrize("num_splits", [1, 2, 4])
@pytest.mark.parametrize(
    "lens,with_new",
    [
        ([0, 16, 64], False),  # empty, exactly one 16-key tile, the full cache
        ([16, 31, 63], True),  # new row opens a 16-key chunk (its old range is empty), ends one, is the last row
        ([32, 0, 47], True),  # new row at a 32-key chunk boundary; an empty cache that gets one key
    ],
)
def test_split_boundaries(num_splits, lens, with_new):
    from prunepath_ops.attention.triton_attention import kv_decode_attention_triton

    device = device_for("triton")
    S_max, Hq, Hkv, D = 64, 4, 2, 16
    q, k, v, seqlens, kn, vn = make_case(lens, Hq, Hkv, D, S_max, torch.float32, device, with_new, seed=3)
    k_ref, v_ref = k.cpu().clone(), v.cpu().clone()
    cpu = [t.cpu() if t is not None else None for t in (q, seqlens, kn, vn)]
    expected = R.kv_decode_attention(cpu[0], k_ref, v_ref, cpu[1], cpu[2], cpu[3])
    out = kv_decode_attention_triton(q, k, v, seqlens, kn, vn, None, block_n=16, num_splits=num_splits)
    assert_close(out.cpu(), expected)
    torch.testing.assert_close(k.cpu(), k_ref, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v.cpu(), v_ref, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_new", [False, True], ids=["no-append", "append"])
def test_lengths_out_of_range_are_clamped_in_bounds(backend, with_new):
    """n < 0 attends to nothing, n > S_max to the whole cache; the append happens only for 0 <= n < S_max.

    The caches are a slice of a larger buffer whose extra rows hold a sentinel: a read past S_max
    would change the output, a write past it the sentinel.
    """
    device = device_for(backend)
    S_max, Hq, Hkv, D, extra = 32, 4, 2, 16, 8
    lens = [-3, S_max + 5, S_max] if with_new else [-1, S_max + 5, 9]
    g = torch.Generator().manual_seed(5)
    big_k = torch.randn(3, S_max + extra, Hkv, D, generator=g).to(device)
    big_v = torch.randn(3, S_max + extra, Hkv, D, generator=g).to(device)
    big_k[:, S_max:], big_v[:, S_max:] = 1e4, 1e4
    k, v = big_k[:, :S_max], big_v[:, :S_max]  # strided in B: the kernels take the strides
    before_k, before_v = big_k.clone(), big_v.clone()
    q = torch.randn(3, Hq, D, generator=g).to(device)
    kn, vn = (torch.randn(3, Hkv, D, generator=g).to(device) for _ in range(2))
    kn, vn = (kn, vn) if with_new else (None, None)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    out = kv_decode_attention(q, k, v, seqlens, kn, vn, backend=backend)
    torch.testing.assert_close(big_k, before_k, atol=0, rtol=0)  # no sequence appended, nothing else moved
    torch.testing.assert_close(big_v, before_v, atol=0, rtol=0)
    cpu_new = (kn.cpu(), vn.cpu()) if with_new else (None, None)
    k_ref, v_ref = k.cpu().clone(), v.cpu().clone()
    expected = R.kv_decode_attention(q.cpu(), k_ref, v_ref, seqlens.cpu(), *cpu_new)  # the same clamp rule
    assert_close(out.cpu(), expected)
    torch.testing.assert_close(k_ref, k.cpu(), atol=0, rtol=0)  # the reference wrote nothing either
    assert bool((out[0] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    device = device_for(backend)
    q, k, v, seqlens, _, _ = make_case([50, 3, 64], 8, 2, 16, 64, torch.float16, device, False)
    first = kv_decode_attention(q, k, v, seqlens, backend=backend)
    assert torch.equal(kv_decode_attention(q, k, v, seqlens, backend=backend), first)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_query_stays_in_its_head(backend):
    device = device_for(backend)
    q, k, v, seqlens, _, _ = make_case([20, 9], 4, 2, 16, 32, torch.float32, device, False)
    q[1, 2, 5] = float("nan")
    out = kv_decode_attention(q, k, v, seqlens, backend=backend)
    assert bool(out[1, 2].isnan().all())
    out[1, 2] = 0.0
    assert bool(torch.isfinite(out).all())  # the other heads of the group, and the other sequence


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    q, k, v, seqlens, kn, vn = make_case([], 4, 2, 16, 8, torch.float32, device_for(backend), True)
    assert kv_decode_attention(q, k, v, seqlens, kn, vn, backend=backend).shape == (0, 4, 16)


@settings(max_examples=30, deadline=None)
@given(
    lens=st.lists(st.integers(0, 24), min_size=1, max_size=4),
    group=st.sampled_from([1, 2, 4, 8]),
    Hkv=st.integers(1, 3),
    D=st.sampled_from([16, 32]),
    with_new=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cpu_composite_random_shapes(lens, group, Hkv, D, with_new, seed):
    S_max = 25  # lengths up to S_max - 1, so every append has a row
    run_and_check("cpu", lens, group * Hkv, Hkv, D, S_max, torch.float32, with_new, seed=seed)


# ---- the static split plan -------------------------------------------------------------------------


@pytest.fixture
def by_length(request, monkeypatch):
    """Parametrised ``SPLIT_BY_LENGTH`` for this test: True by the lengths, False by S_max, None the default."""
    from prunepath_ops.attention import triton_attention

    monkeypatch.setattr(triton_attention, "SPLIT_BY_LENGTH", request.param)
    return request.param


def plan_of(lens, Hkv, S_max, device, with_new):
    """The length plan the kernels compute for these lengths: ``[(n_split_b, chunk_b)]``."""
    from prunepath_ops.attention.triton_attention import launch_config, length_split_plan

    cfg = launch_config(len(lens), Hkv, S_max, 16, torch.device(device), split_by_length=True)
    args = (cfg["fill"], cfg["min_chunk"], cfg["num_splits"], cfg["block_n"])
    return length_split_plan(lens, Hkv, S_max, *args, has_new=with_new)


@needs_triton
@pytest.mark.parametrize("by_length", [True], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("with_new", [False, True], ids=["no-append", "append"])
@pytest.mark.parametrize(
    "lens,Hkv,S_max,regime",
    [
        ([40, 3, 3, 3], 2, 48, "mixed"),  # one long sequence cut into splits, the short ones written directly
        ([17] * 9, 4, 32, "direct"),  # the batch alone fills the (interpreter's 4-SM) GPU: no merge at all
        ([47, 40], 1, 48, "split"),  # a small batch: every sequence split
        ([0, 1, 47, 3, -4, 200], 1, 48, "mixed"),  # empty, one key, S_max - 1, out of range below and above
        ([64, 63, 0], 1, 64, "mixed"),  # a full cache (no append) and S_max - 1
        ([0, 0], 2, 32, "direct"),  # nothing to attend anywhere: zeros, written by split 0
        ([20, 0, 7], 8, 32, "direct"),  # cdiv(fill, Hkv) = 1: no sequence can split, no combine launch
    ],
)
def test_split_by_length_matches_reference(lens, Hkv, S_max, regime, with_new, dtype, by_length):
    """The device-side length plan: reference, SDPA, the appended rows, zeros for empty sequences."""
    device = device_for("triton")
    plan = plan_of(lens, Hkv, S_max, device, with_new)
    if device == "cpu":  # the regime named is the interpreter's (4 SMs); on the GPU the batch is small
        splits = {ns > 1 for ns, _ in plan}
        assert splits == {"mixed": {True, False}, "direct": {False}, "split": {True}}[regime], plan
    run_and_check("triton", lens, 2 * Hkv, Hkv, 16, S_max, dtype, with_new)


@triton.jit
def _device_plan_kernel(
    seqlens_ptr, out_ptr, B, S_max, Hkv, fill, min_chunk, max_splits,
    HAS_NEW: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Writes the kernels' length plan: n_split at [0, B), chunk at [BLOCK_B, BLOCK_B + B)."""
    _, n_split, chunk, _ = device_length_split_plan(
        seqlens_ptr, B, 1, S_max, Hkv, fill, min_chunk, max_splits, HAS_NEW, BLOCK_B, BLOCK_N
    )
    offs = tl.arange(0, BLOCK_B)
    tl.store(out_ptr + offs, n_split, mask=offs < B)
    tl.store(out_ptr + BLOCK_B + offs, chunk.to(tl.int32), mask=offs < B)


@needs_triton
# one split per block: every block after the first rescales the running sums; two per block; all in one block
@pytest.mark.parametrize("block_s", [1, 2, 4])
# 1/sqrt(D): blocks of similar mass; 40: scores in the hundreds, the maximum moves by far between blocks
@pytest.mark.parametrize("scale", [None, 40.0])
def test_combine_merges_splits_in_blocks(block_s, scale):
    from prunepath_ops.attention.triton_attention import kv_decode_attention_triton

    device = device_for("triton")
    lens = [64, 49, 16, 0]  # 4, 4, 1 and 0 splits of 16 keys to merge
    q, k, v, seqlens, kn, vn = make_case(lens, 4, 2, 16, 64, torch.float32, device, False, seed=13)
    expected = R.kv_decode_attention(q.cpu(), k.cpu(), v.cpu(), seqlens.cpu(), softmax_scale=scale)
    out = kv_decode_attention_triton(q, k, v, seqlens, None, None, scale, block_n=16, num_splits=4, block_s=block_s)
    assert_close(out.cpu(), expected)
    assert torch.equal(out, kv_decode_attention_triton(q, k, v, seqlens, None, None, scale, block_n=16, num_splits=4,
                                                       block_s=block_s))  # fmt: skip


@needs_triton
@pytest.mark.parametrize("with_new", [False, True], ids=["no-append", "append"])
@pytest.mark.parametrize(
    "lens",
    [
        [5, 0, 23],  # short sequences: one or two 16-key tiles each, and an empty one
        [40, 17, 1],  # a chunk boundary one key past a tile (17 = 16 + 1)
    ],
)
def test_static_cut_follows_each_sequence_not_the_cache(lens, with_new):
    """The same keys in a 64-row and a 256-row cache, four splits forced: the same cut, so the same bits.

    A cut of S_max (the rule before) would put each of these sequences in split 0 of the longer cache
    (64-key chunks) but spread the longer ones over 2-3 splits of the shorter cache (16-key chunks).
    """
    from prunepath_ops.attention.triton_attention import kv_decode_attention_triton

    device = device_for("triton")
    Hq, Hkv, D = 4, 2, 16
    q, k, v, seqlens, kn, vn = make_case(lens, Hq, Hkv, D, 64, torch.float32, device, with_new, seed=11)
    k_long, v_long = (torch.cat([t, torch.full_like(t[:, :1], POISON).expand(-1, 192, -1, -1)], 1) for t in (k, v))
    short = kv_decode_attention_triton(q, k, v, seqlens, kn, vn, None, block_n=16, num_splits=4)
    long = kv_decode_attention_triton(q, k_long, v_long, seqlens, kn, vn, None, block_n=16, num_splits=4)
    torch.testing.assert_close(long, short, atol=0, rtol=0)
    torch.testing.assert_close(k_long[:, :64], k, atol=0, rtol=0, equal_nan=True)  # the same append in both
    expected = R.kv_decode_attention(q.cpu(), k.cpu(), v.cpu(), seqlens.cpu(), *(t.cpu() if t is not None else None
                                                                             for t in (kn, vn)))  # fmt: skip
    assert_close(short.cpu(), expected)


@triton.jit
def _device_sequence_chunk_kernel(lens_ptr, out_ptr, n, num_splits, min_chunk, BLOCK: tl.constexpr,
                                  BLOCK_N: tl.constexpr):  # fmt: skip
    offs = tl.arange(0, BLOCK)
    L = tl.load(lens_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + offs, device_sequence_chunk(L, num_splits, min_chunk, BLOCK_N), mask=offs < n)


@needs_triton
def test_device_sequence_chunk_equals_the_host_mirror():
    g = torch.Generator().manual_seed(9)
    device = device_for("triton")
    for num_splits, min_chunk, block_n in [(33, 64, 64), (12, 64, 64), (5, 16, 16), (1, 64, 64), (7, 1, 1)]:
        lens = torch.randint(0, 20000, (64,), generator=g)
        lens[:4] = torch.tensor([0, 1, num_splits * block_n, num_splits * block_n + 1])  # edges of the rounding
        out = torch.zeros(64, dtype=torch.int32, device=device)
        _device_sequence_chunk_kernel[(1,)](lens.to(torch.int32).to(device), out, 64, num_splits, min_chunk, 64,
                                            block_n)  # fmt: skip
        host = [sequence_split(int(n), num_splits, min_chunk, block_n)[1] for n in lens]
        assert out.cpu().tolist() == host, (num_splits, min_chunk, block_n)


@settings(max_examples=300, deadline=None)
@given(
    length=st.integers(0, 70000),
    num_splits=st.integers(1, 65535),
    block_n=st.sampled_from([16, 32, 64, 128]),
    min_tiles=st.integers(1, 8),
)
def test_sequence_split_fits_the_grid(length, num_splits, block_n, min_tiles):
    used, chunk = sequence_split(length, num_splits, min_tiles * block_n, block_n)
    assert chunk % block_n == 0 and chunk >= min_tiles * block_n
    assert used <= num_splits  # the partial buffer holds num_splits per (sequence, head)
    assert used * chunk >= length > (used - 1) * chunk  # every key in exactly one used split
    if length >= num_splits * min_tiles * block_n:  # long enough: every split used but the rounding's last
        assert used >= num_splits - (num_splits * block_n - 1) // chunk


@needs_triton
@pytest.mark.parametrize("with_new", [False, True], ids=["no-append", "append"])  # padding lanes must not count
def test_device_length_plan_equals_the_host_mirror(with_new):
    from prunepath_ops.attention.triton_attention import length_split_plan

    g = torch.Generator().manual_seed(5)
    device = device_for("triton")
    # The H200's plan (fill 264, 64-key tiles) on long caches; one-key tiles, where a key more moves the plan.
    for fill, tile, S_max, B_max in [(264, 64, 2900, 40)] * 8 + [(8, 1, 64, 4)] * 8:
        B = int(torch.randint(1, B_max, (1,), generator=g))  # not a power of two: padding lanes in the block
        lens = torch.randint(-3, S_max + 10, (B,), generator=g).tolist()
        Hkv = int(torch.randint(1, 9, (1,), generator=g))
        parts, block_b = math.ceil(fill / Hkv), max(16, 1 << (B - 1).bit_length())
        out = torch.zeros(2 * block_b, dtype=torch.int32, device=device)
        seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
        _device_plan_kernel[(1,)](seqlens, out, B, S_max, Hkv, fill, tile, parts, with_new, block_b, tile)
        got = list(zip(out[:B].tolist(), out[block_b : block_b + B].tolist(), strict=True))
        assert got == length_split_plan(lens, Hkv, S_max, fill, tile, parts, tile, with_new), (lens, Hkv)


@needs_triton
@pytest.mark.parametrize("with_new", [False, True], ids=["no-append", "append"])
@pytest.mark.parametrize(
    "lens,Hkv,S_max",
    [
        ([40, 3, 3, 3], 2, 48),  # a long sequence's splits and short ones: items of unequal size
        ([0, 47, 1, 200, 16], 1, 48),  # empty, out of range: items that write zeros or nothing
    ],
)
def test_length_plan_programs_loop_over_items(lens, Hkv, S_max, with_new):
    """Fewer programs than work items (each loops over several): the same bits as one program per item."""
    from prunepath_ops.attention.triton_attention import kv_decode_attention_triton, launch_config

    device = device_for("triton")
    items = launch_config(len(lens), Hkv, S_max, 16, torch.device(device), split_by_length=True)["items"]
    outs = []
    for programs in (items, 1, 2, 3):  # one per item; one program for all; rounds of 2 and 3 (an uneven last round)
        q, k, v, seqlens, kn, vn = make_case(lens, 2 * Hkv, Hkv, 16, S_max, torch.float32, device, with_new, 3)
        outs.append((kv_decode_attention_triton(q, k, v, seqlens, kn, vn, None, split_by_length=True,
                                                programs=programs), k, v))  # fmt: skip
    for out, k, v in outs[1:]:
        assert torch.equal(out, outs[0][0])
        for got, first in ((k, outs[0][1]), (v, outs[0][2])):  # the rows past the lengths are NaN
            torch.testing.assert_close(got, first, atol=0, rtol=0, equal_nan=True)


@settings(max_examples=300, deadline=None)
@given(
    lens=st.lists(st.integers(-3, 5000), min_size=1, max_size=64),
    Hkv=st.integers(1, 16),
    fill=st.integers(1, 600),
    block_n=st.sampled_from([16, 32, 64]),
    min_tiles=st.integers(1, 4),
    with_new=st.booleans(),
)
def test_length_split_plan_fits_the_grid(lens, Hkv, fill, block_n, min_tiles, with_new):
    """The launcher's grid (B + cdiv(fill, Hkv) items) and partials (cdiv(fill, Hkv)) hold every plan."""
    from prunepath_ops.attention.triton_attention import length_split_plan

    S_max, parts = 4096, math.ceil(fill / Hkv)
    plan = length_split_plan(lens, Hkv, S_max, fill, min_tiles * block_n, parts, block_n, with_new)
    assert sum(ns for ns, _ in plan) <= len(lens) + parts
    for (ns, chunk), L in zip(plan, attended(lens, S_max, with_new), strict=True):
        assert 1 <= ns <= parts and chunk % block_n == 0 and chunk >= block_n
        assert ns * chunk >= L and (ns == 1 or (ns - 1) * chunk < L)  # every key in one split, none empty


def test_length_split_plan_h200_regimes():
    """What the plan does with the benchmark's batches on 132 SMs (fill 264, Hkv 8, 64-key tiles)."""
    from prunepath_ops.attention.triton_attention import length_split_plan

    def plan(lens, S_max):
        return length_split_plan(lens, 8, S_max, 264, MIN_CHUNK, 33, 64)

    assert plan([4096] * 32, 4352) == [(1, 4096)] * 32  # the batch fills the GPU: no partials, no merge
    assert plan([16384] * 32, 16640) == [(1, 16384)] * 32
    assert plan([16384], 16640) == [(32, 512)]  # one long sequence: as many programs as the static plan
    ragged = plan([16384] + [1000] * 31, 16640)
    assert ragged[0][0] >= 8 and all(ns == 1 for ns, _ in ragged[1:])  # the long one spread, not alone


@pytest.mark.parametrize(
    "B,kwargs,expected",
    [
        (4, {}, True),  # the plan: B + cdiv(fill, Hkv) items per kv head
        (4, {"num_splits": 2}, False),  # a forced split count wins (sweeps)
        (1025, {}, False),  # past MAX_LENGTH_PLAN_BATCH every program would read too many lengths
    ],
)
def test_launch_config_length_plan(B, kwargs, expected):
    from prunepath_ops.attention.triton_attention import (
        MAX_LENGTH_PLAN_BATCH,
        launch_config,
        num_sms,
        programs_per_head,
    )

    assert MAX_LENGTH_PLAN_BATCH == 1024
    cpu = torch.device("cpu")
    cfg = launch_config(B, 2, 64, 16, cpu, split_by_length=True, **kwargs)
    assert cfg["by_length"] is expected
    if expected:
        parts = math.ceil(2 * num_sms(cpu) / 2)  # PROGRAMS_PER_SM x SMs over Hkv = 2
        assert (cfg["items"], cfg["num_splits"]) == (B + parts, parts)
        assert programs_per_head(cfg["items"], 10**6, 2) == B + parts  # room for every item
        # A GPU that holds fewer programs at once: the grid shrinks to them, the plan does not change.
        assert programs_per_head(cfg["items"], 6, 2) == 3
    assert launch_config(B, 2, 64, 16, cpu, split_by_length=False, **kwargs)["by_length"] is False


@pytest.mark.parametrize(
    "B,S_max,setting,expected",
    [
        (4, 2048, None, False),  # the default at LONG_CACHE: still by S_max
        (4, 2049, None, True),  # past LONG_CACHE: by the lengths
        (1, 16640, None, False),  # one sequence: the static plan at any length
        (4, 4352, False, False),  # SPLIT_BY_LENGTH False: never
        (1, 64, True, True),  # SPLIT_BY_LENGTH True: even one sequence in a short cache
    ],
)
def test_split_by_length_default_follows_batch_and_cache(B, S_max, setting, expected, monkeypatch):
    from prunepath_ops.attention import triton_attention

    assert triton_attention.LONG_CACHE == 2048
    monkeypatch.setattr(triton_attention, "SPLIT_BY_LENGTH", setting)
    assert triton_attention.launch_config(B, 8, S_max, 128, torch.device("cpu"))["by_length"] is expected


@pytest.mark.parametrize(
    "B,Hkv,S_max",
    [
        (1, 8, 16640),  # one 16k sequence must still fill the GPU
        (8, 8, 4352),
        (32, 8, 16640),  # the ragged benchmark batch: its long sequence must not run on 8 programs
        (32, 8, 4352),
        (32, 8, 1280),  # the batch fills the GPU and the cache is short: one split
        (256, 8, 300),  # the batch alone fills the GPU
        (16, 8, 2048),  # 128 programs do not fill 132 SMs: split
        (1, 8, 768),  # the end-to-end benchmark's short cache at batch 1: cut to one tile per split
    ],
)
def test_split_plan_fills_h200(B, Hkv, S_max):
    ns, chunk = split_plan(B, Hkv, S_max, 132, 64)
    assert chunk % 64 == 0 and ns * chunk >= S_max > (ns - 1) * chunk  # every row in exactly one split
    if B * Hkv >= 132 and S_max <= SHORT_CACHE:
        assert ns == 1
        return
    assert chunk >= min(MIN_CHUNK, S_max) or ns == 1
    assert chunk <= 512  # a long sequence is spread over many programs
    assert B * Hkv * ns >= min(264, B * Hkv * math.ceil(S_max / MIN_CHUNK))


@settings(max_examples=200, deadline=None)
@given(
    B=st.integers(1, 300),
    Hkv=st.integers(1, 16),
    S_max=st.integers(1, 70000),
    sms=st.integers(1, 200),
    block_n=st.sampled_from([16, 32, 64, 128]),
    forced=st.one_of(st.none(), st.integers(1, 5000)),
)
def test_split_plan_covers_the_cache(B, Hkv, S_max, sms, block_n, forced):
    ns, chunk = split_plan(B, Hkv, S_max, sms, block_n, forced)
    assert chunk % block_n == 0 and 1 <= ns <= 65535
    assert ns * chunk >= S_max > (ns - 1) * chunk


# ---- errors ----------------------------------------------------------------------------------------


def _good():
    q, k, v, seqlens, kn, vn = make_case([3, 5], 4, 2, 16, 8, torch.float32, "cpu", True)
    return {"q": q, "k_cache": k, "v_cache": v, "cache_seqlens": seqlens, "k_new": kn, "v_new": vn}


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: {"q": a["q"][0]}, ValueError, r"q must be 3-D \[B, Hq, D\]"),
        (lambda a: {"q": a["q"].long()}, TypeError, "q must be float32, float16 or bfloat16"),
        (lambda a: {"q": torch.randn(2, 4, 24)}, ValueError, "head dim D must be one of"),
        (lambda a: {"q": torch.randn(2, 16, 4).transpose(1, 2)}, ValueError, "q must be contiguous in its last dim"),
        (lambda a: {"k_cache": a["k_cache"][0]}, ValueError, r"k_cache must be 4-D \[B, S_max, Hkv, D\]"),
        (lambda a: {"v_cache": a["v_cache"].half()}, TypeError, "v_cache must have the dtype of q"),
        (lambda a: {"v_cache": a["v_cache"][:, :4]}, ValueError, "k_cache and v_cache must have the same shape"),
        (
            lambda a: {"k_cache": a["k_cache"][:1], "v_cache": a["v_cache"][:1]},
            ValueError,
            r"k_cache must have shape \[B=2",
        ),
        (
            lambda a: {"k_cache": torch.randn(2, 8, 3, 16), "v_cache": torch.randn(2, 8, 3, 16)},
            ValueError,
            "Hq = 4 query heads must be a positive multiple of Hkv = 3",
        ),
        (
            lambda a: {"k_cache": torch.randn(2, 8, 16, 2).transpose(2, 3)},
            ValueError,
            "k_cache must be contiguous in its last dim",
        ),
        (lambda a: {"cache_seqlens": a["cache_seqlens"].long()}, TypeError, "cache_seqlens must be int32"),
        (lambda a: {"cache_seqlens": a["cache_seqlens"][:1]}, ValueError, r"cache_seqlens must have shape \[B\]"),
        (lambda a: {"v_new": None}, ValueError, "k_new was given without v_new"),
        (lambda a: {"k_new": None}, ValueError, "v_new was given without k_new"),
        (lambda a: {"k_new": a["k_new"][:, :1]}, ValueError, r"k_new must have shape \[B, Hkv, D\]"),
        (lambda a: {"v_new": a["v_new"].double()}, TypeError, "v_new must have the dtype of q"),
        (lambda a: {"rotary_cos": torch.ones(2, 16)}, ValueError, "rotary_cos was given without rotary_sin"),
        (lambda a: {"rotary_sin": torch.ones(2, 16)}, ValueError, "rotary_sin was given without rotary_cos"),
        (
            lambda a: {"rotary_cos": torch.ones(2, 8), "rotary_sin": torch.ones(2, 8)},
            ValueError,
            r"rotary_cos must have shape \[B, D\] = \[2, 16\]",
        ),
        (
            lambda a: {"rotary_cos": torch.ones(2, 16), "rotary_sin": torch.ones(2, 16).half()},
            TypeError,
            "rotary_sin must have the dtype of q",
        ),
        (
            lambda a: {"rotary_cos": torch.ones(16, 2).t(), "rotary_sin": torch.ones(2, 16)},
            ValueError,
            "rotary_cos must be contiguous in its last dim",
        ),
        (
            lambda a: {"rotary_cos": torch.ones(2, 16, 1), "rotary_sin": torch.ones(2, 16)},
            ValueError,
            r"rotary_cos must be 2-D \[B, D\]",
        ),
    ],
)
def test_bad_input_raises_before_any_write(change, exc, match):
    args = _good()
    k_cache, v_cache = args["k_cache"], args["v_cache"]
    k_before, v_before = k_cache.clone(), v_cache.clone()
    args.update(change(args))
    with pytest.raises(exc, match=match):
        kv_decode_attention(**args)
    torch.testing.assert_close(k_cache, k_before, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_before, atol=0, rtol=0, equal_nan=True)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        kv_decode_attention(**_good(), backend="cuda")


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        kv_decode_attention(**_good(), backend="triton")


@needs_cuda
def test_cpu_backend_rejects_cuda_tensors():
    args = {k: t.cuda() for k, t in _good().items()}
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        kv_decode_attention(**args, backend="cpu")


@needs_cuda
def test_mixed_devices():
    args = _good()
    args["k_cache"] = args["k_cache"].cuda()
    with pytest.raises(ValueError, match="k_cache is on cuda"):
        kv_decode_attention(**args)


# ---- torch.library / torch.compile ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_new", [False, True], ids=["no-append", "append"])
@pytest.mark.parametrize("rotary", [False, True], ids=["no-rope", "rope"])
def test_opcheck(backend, with_new, rotary):
    device = device_for(backend)
    q, k, v, seqlens, kn, vn = make_case([3, 0, 12], 4, 2, 16, 16, torch.float32, device, with_new)
    k, v = k.nan_to_num(), v.nan_to_num()  # opcheck compares outputs with equal_nan off
    cos, sin = rope_rows(seqlens, 16, q.dtype) if rotary else (None, None)
    torch.library.opcheck(
        torch.ops.prunepath.kv_decode_attention.default, (q, k, v, seqlens, kn, vn, None, cos, sin, backend)
    )


def rope_rows(seqlens: Tensor, D: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(cos, signed sin) [B, D]`` of each sequence's position (clamped into the table), as the model gathers them."""
    from prunepath_ops.models.llama import rope_tables

    cos, sin = rope_tables(D, 4096, 10000.0)  # [4096, D]
    pos = seqlens.long().clamp(0, 4095).cpu()
    return cos[pos].to(dtype).to(seqlens.device), sin[pos].to(dtype).to(seqlens.device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "lens,with_new",
    [
        ([7, 0, 63], True),  # append: the rotated key lands in the cache; an empty cache; the last row
        ([64, 1, 30], False),  # no append: only q rotates; a full cache
        ([-2, 70, 16], True),  # lengths outside [0, S_max]: no row written, q still rotated
    ],
)
def test_rotary_equals_rope_then_attention(backend, dtype, lens, with_new):
    """RoPE inside the op gives the bits of ``rope_qkv`` then the op, cache included."""
    check_rotary(backend, dtype, lens, with_new, Hq=4, Hkv=2, D=16, S_max=64)


@needs_cuda
@pytest.mark.parametrize(
    "lens,S_max",
    [
        ([600], 768),  # the end-to-end benchmark's decode step: one sequence, 12 splits of 64
        ([16383, 5, 0, 2047], 16640),  # a long and short ones (B > 1, long cache: the length plan)
    ],
)
def test_gpu_rotary_equals_rope_then_attention(lens, S_max):
    check_rotary("triton", torch.bfloat16, lens, True, Hq=32, Hkv=8, D=128, S_max=S_max)


def check_rotary(backend, dtype, lens, with_new, Hq, Hkv, D, S_max):
    """``kv_decode_attention(..., rotary_cos, rotary_sin)`` against ``rope_qkv`` then the op (bits, cache
    included; rope_qkv on the same backend: Triton's kernel, or the reference the CPU composite also
    uses) and against the reference with the same rotary arguments."""
    from prunepath_ops.decode_step import rope_qkv

    device = device_for(backend)
    q, k, v, seqlens, kn, vn = make_case(lens, Hq, Hkv, D, S_max, dtype, device, with_new, seed=21)
    cos, sin = rope_rows(seqlens, D, dtype)
    ref = R.kv_decode_attention(*(t.cpu().clone() if t is not None else None for t in (q, k, v, seqlens, kn, vn)),
                                rotary_cos=cos.cpu(), rotary_sin=sin.cpu())  # fmt: skip
    B = len(lens)
    kn_, vn_ = (kn, vn) if with_new else (torch.zeros(B, Hkv, D, dtype=dtype, device=device),) * 2
    heads = rope_qkv(torch.cat((q, kn_, vn_), dim=1).flatten(1), cos, sin, Hq, Hkv, backend=backend)
    q_rot, k_rot = heads[:, :Hq], heads[:, Hq : Hq + Hkv]
    k2, v2 = k.clone(), v.clone()
    expected = kv_decode_attention(q_rot, k2, v2, seqlens, k_rot if with_new else None, vn if with_new else None,
                                   backend=backend)  # fmt: skip
    out = kv_decode_attention(q, k, v, seqlens, kn, vn, rotary_cos=cos, rotary_sin=sin, backend=backend)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(k, k2, atol=0, rtol=0, equal_nan=True)  # the same rotated row appended
    torch.testing.assert_close(v, v2, atol=0, rtol=0, equal_nan=True)
    assert_close(out.cpu().float(), ref.float(), dtype)  # and the readable semantics


def test_schema_declares_the_cache_mutation():
    schema = torch.ops.prunepath.kv_decode_attention.default._schema
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"k_cache", "v_cache"}, str(schema)  # Tensor(a1!) k_cache, Tensor(a2!) v_cache


def test_compile_fullgraph_with_append():
    torch._dynamo.reset()
    q, k, v, seqlens, kn, vn = make_case([4, 11], 8, 2, 16, 16, torch.float32, "cpu", True)
    k, v = k.nan_to_num(), v.nan_to_num()
    k2, v2 = k.clone(), v.clone()

    def step(q, k_cache, v_cache, lens, k_new, v_new):
        return kv_decode_attention(q * 2.0, k_cache, v_cache, lens, k_new, v_new).sum(dim=1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, seqlens, kn, vn)
    expected = step(q, k2, v2, seqlens, kn, vn)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(k, k2, atol=0, rtol=0)  # the append survived functionalisation
    torch.testing.assert_close(v, v2, atol=0, rtol=0)
    assert bool((k[0, 4] == kn[0]).all())


# ---- GPU only: bf16, Llama-like shapes, determinism, CUDA graphs -----------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_new", [False, True], ids=["no-append", "append"])
@pytest.mark.parametrize(
    "lens,Hq,Hkv,D,S_max",
    [
        ([4000, 0, 1, 129, 2500, 777], 32, 8, 128, 4096),  # ragged with empty and single-key sequences
        ([16383, 5, 300, 64], 32, 8, 128, 16640),  # one 16k sequence next to short ones
        ([1000, 1], 32, 4, 64, 1024),  # D = 64, GQA 8
        ([513, 2047, 2048], 16, 16, 128, 2048),  # GQA 1; S_max - 1 and a full cache (no append)
        ([3000], 64, 8, 256, 3072),  # D = 256
        ([70, 900], 8, 2, 16, 1024),  # D = 16
        ([0, 0], 8, 1, 128, 512),  # nothing to attend anywhere
    ],
)
def test_gpu_against_reference_and_sdpa(lens, Hq, Hkv, D, S_max, dtype, with_new):
    """Clamp rule, zeros for L_b = 0, NaN rows never read."""
    run_and_check("triton", lens, Hq, Hkv, D, S_max, dtype, with_new)


@needs_cuda
@pytest.mark.parametrize("num_splits", [1, 3, 64])  # direct write, few splits, more splits than a sequence needs
def test_gpu_forced_splits(num_splits):
    from prunepath_ops.attention.triton_attention import kv_decode_attention_triton

    q, k, v, seqlens, kn, vn = make_case([4000, 1, 64, 0], 32, 8, 128, 4096, torch.bfloat16, "cuda", True)
    k_ref, v_ref = k.cpu().clone(), v.cpu().clone()
    expected = R.kv_decode_attention(q.cpu(), k_ref, v_ref, seqlens.cpu(), kn.cpu(), vn.cpu())
    out = kv_decode_attention_triton(q, k, v, seqlens, kn, vn, None, num_splits=num_splits)
    assert_close(out.cpu().float(), expected.float(), torch.bfloat16)
    torch.testing.assert_close(k.cpu(), k_ref, atol=0, rtol=0, equal_nan=True)


@needs_cuda
@pytest.mark.parametrize("by_length", [True], indirect=True)
@pytest.mark.parametrize("with_new", [False, True], ids=["no-append", "append"])
@pytest.mark.parametrize(
    "lens,S_max",
    [
        ([2048] * 33, 2304),  # the batch fills 132 SMs: every sequence in one split, written directly
        ([16383, 5, 300, 64, 2047, 0], 16640),  # one 16k sequence cut into many, the short ones direct
        ([4000, 0, 1, 129, 2500, 777], 4096),  # a small ragged batch: split, with empty and one-key sequences
    ],
)
def test_gpu_split_by_length(lens, S_max, with_new, by_length):
    run_and_check("triton", lens, 32, 8, 128, S_max, torch.bfloat16, with_new)


@needs_cuda
@pytest.mark.parametrize("by_length", [True], indirect=True)
def test_gpu_resident_programs_come_from_the_compiled_kernel(by_length):
    """The length plan's grid: whole programs per SM from the compiled kernel, never more than one wave."""
    from prunepath_ops.attention import triton_attention

    run_and_check("triton", [3000, 5, 100], 32, 8, 128, 4096, torch.bfloat16, False)
    sms = triton_attention.num_sms(torch.device("cuda"))
    assert triton_attention._RESIDENT and all(r % sms == 0 and r >= sms for r in triton_attention._RESIDENT.values())


@needs_cuda
# the static plan; the length plan; the default (by the lengths at this S_max, launched without PDL)
@pytest.mark.parametrize("by_length", [False, True, None], indirect=True)
def test_gpu_bitwise_deterministic(by_length):
    q, k, v, seqlens, _, _ = make_case([16000, 3, 9000, 512] * 4, 32, 8, 128, 16384, torch.bfloat16, "cuda", False)
    first = kv_decode_attention(q, k, v, seqlens)
    for _ in range(5):
        assert torch.equal(kv_decode_attention(q, k, v, seqlens), first)


@needs_cuda
@pytest.mark.parametrize("by_length", [False, True], indirect=True)  # with the length plan, the splits change too
@pytest.mark.parametrize("with_new", [False, True], ids=["no-append", "append"])
def test_gpu_cuda_graph_replay_with_new_lengths(with_new, by_length):
    """Capture once, change cache_seqlens in place, replay: the graph must read the new lengths."""
    S_max, Hq, Hkv, D = 2048, 32, 8, 128
    q, k, v, seqlens, kn, vn = make_case([100, 0, 2000, 513], Hq, Hkv, D, S_max, torch.bfloat16, "cuda", with_new)
    k, v = k.nan_to_num(), v.nan_to_num()
    k0, v0 = k.clone(), v.clone()
    kv_decode_attention(q, k, v, seqlens, kn, vn)  # compiles the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kv_decode_attention(q, k, v, seqlens, kn, vn)
    for lens in ([1500, 7, 1, 2047], [0, 2046, 64, 1]):
        k.copy_(k0)
        v.copy_(v0)
        seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        k_ref, v_ref = k0.cpu().clone(), v0.cpu().clone()
        cpu_new = (kn.cpu(), vn.cpu()) if with_new else (None, None)
        expected = R.kv_decode_attention(q.cpu(), k_ref, v_ref, seqlens.cpu(), *cpu_new)
        assert_close(out.cpu().float(), expected.float(), torch.bfloat16)
        torch.testing.assert_close(k.cpu(), k_ref, atol=0, rtol=0)
        torch.testing.assert_close(v.cpu(), v_ref, atol=0, rtol=0)
