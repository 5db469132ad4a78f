"""Routed expert FFN (issue 3) against two oracles: the expert-loop reference and the masked dense FFN.

CPU: the C++ kernel op ``prunepath::expert_ffn`` (backend "cpu"), the sparse PyTorch composite
(backend "torch"), and the Triton kernels under TRITON_INTERPRET=1 (fp32/fp16, tiny shapes). GPU: everything, bf16 and Llama-like shapes included, and bitwise determinism.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import prunepath_ops as pp
from prunepath_ops import reference as R

HAS_CUDA = torch.cuda.is_available()
TRITON_OK = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 6e-2)}
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def make_ffn(d, F, S, *, gated=True, act="silu", bias=False, dtype=torch.float32, device="cpu", seed=0):
    """Dense weights (nn.Linear layout), a random permutation and the packed experts."""
    g = torch.Generator().manual_seed(seed)
    w = {
        "w_in": torch.randn(F, d, generator=g) / d**0.5,
        "w_out": torch.randn(d, F, generator=g) / F**0.5,
        "w_up": torch.randn(F, d, generator=g) / d**0.5 if gated else None,
        "b_in": torch.randn(F, generator=g) * 0.1 if bias else None,
        "b_out": torch.randn(d, generator=g) * 0.1 if bias else None,
    }
    w = {k: None if v is None else v.to(dtype=dtype, device=device) for k, v in w.items()}
    perm = torch.randperm(F, generator=g).to(device)
    packed = pp.pack_experts(
        w["w_in"], w["w_out"], S, w_up=w["w_up"], b_in=w["b_in"], b_out=w["b_out"], permutation=perm, act=act
    )
    return w, perm, packed


def poison_padding(route, K, E, seed=1):
    """Fill slots beyond num_active with out-of-range ids and NaN gates: they must never be read."""
    ids, gates, n = (t.clone() for t in route)
    pad = torch.arange(K, device=ids.device)[None, :] >= n[:, None]
    g = torch.Generator().manual_seed(seed)
    junk = torch.randint(-5, 3 * E, ids.shape, generator=g, dtype=torch.int32).to(ids.device)
    return ids.masked_fill(pad, 0) + junk * pad, gates.masked_fill(pad, float("nan")), n


def oracles(x, w, perm, packed, route, S, act):
    """(expert-loop reference, masked dense FFN) outputs."""
    ref = R.sparse_ffn(
        x, *route, packed.w_in, packed.w_down, b_in=packed.b_in, b_out=packed.b_out, gated=packed.gated, act=act
    )
    mask = R.masked_dense_ffn(
        x, w["w_in"][perm], w["w_out"][:, perm], *route, S,
        w_up=None if w["w_up"] is None else w["w_up"][perm], b_in=None if w["b_in"] is None else w["b_in"][perm],
        b_out=w["b_out"], act=act,
    )  # fmt: skip
    return ref, mask


def check(out, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)


BACKENDS = [
    ("cpu", "auto"),
    ("torch", "auto"),
    pytest.param("triton", "decode", marks=needs_triton),
    pytest.param("triton", "prefill", marks=needs_triton),
]


def device_for(backend):
    """Triton runs on the GPU when there is one, else on CPU tensors under the interpreter."""
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


@pytest.mark.parametrize("backend,path", BACKENDS)
@pytest.mark.parametrize(
    "T,d,F,S,tau,gated,act,bias",
    [
        (0, 32, 64, 16, 0.7, True, "silu", False),  # no tokens
        (1, 32, 64, 16, 0.7, True, "silu", False),  # a single token (decode)
        (13, 40, 96, 16, 0.6, True, "silu", False),  # prime T, d not a multiple of 16
        (13, 24, 64, 32, 0.8, False, "gelu", True),  # plain FFN, exact gelu, both biases
        (7, 40, 48, 16, 0.5, False, "gelu_tanh", True),  # gelu tanh, 3 experts (F = 48)
        (5, 32, 64, 16, 0.9, False, "relu", False),  # relu, no bias
        (21, 32, 128, 16, 0.0, True, "silu", False),  # one expert per token (tau <= 0), T > tile
        (6, 32, 64, 16, 2.0, True, "silu", False),  # every expert for every token
    ],
)
def test_matches_both_oracles(backend, path, T, d, F, S, tau, gated, act, bias):
    if backend == "triton" and path == "decode" and T > 16:
        pytest.skip("decode handles T <= 16")
    dtype, device = torch.float32, device_for(backend)
    w, perm, packed = make_ffn(d, F, S, gated=gated, act=act, bias=bias, dtype=dtype, device=device)
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(2), dtype=dtype).to(device)
    E = F // S
    route = pp.topp_route((torch.randn(T, E, generator=torch.Generator().manual_seed(3)) * 2).to(device), tau)
    ref, masked = oracles(x, w, perm, packed, route, S, act)
    out = pp.sparse_ffn(x, poison_padding(route, E, E), packed, path=path, backend=backend)
    assert out.shape == (T, d) and out.dtype == dtype
    check(out, ref, dtype)
    check(out, masked, dtype)


@pytest.mark.parametrize("backend,path", BACKENDS)
@pytest.mark.parametrize("S", [16, 32])
def test_tau_one_gate_one_is_the_dense_ffn(backend, path, S):
    d, F, T = 24, 4 * S, 5
    device = device_for(backend)
    w, _, packed = make_ffn(d, F, S, device=device)
    x = torch.randn(T, d, device=device)
    route = pp.topp_route(torch.randn(T, F // S, device=device), 1.0, gate="one")
    dense = R.dense_ffn(x, w["w_in"], w["w_out"], w_up=w["w_up"])
    check(pp.sparse_ffn(x, route, packed, path=path, backend=backend), dense, torch.float32)


def _custom_route(T, E, K, rows):
    ids = torch.full((T, K), -1, dtype=torch.int32)
    gates = torch.zeros(T, K)
    n = torch.zeros(T, dtype=torch.int32)
    for t, experts in enumerate(rows):
        ids[t, : len(experts)] = torch.tensor(experts, dtype=torch.int32)
        gates[t, : len(experts)] = torch.linspace(0.9, 0.3, len(experts)) if experts else gates[t, :0]
        n[t] = len(experts)
    return ids, gates, n


@pytest.mark.parametrize("backend,path", BACKENDS)
@pytest.mark.parametrize(
    "rows",
    [
        [[2]] * 9,  # every token to the same expert; experts 0, 1, 3 unselected
        [[3, 0], [], [1], [3, 2, 1, 0], [0]],  # a token with no expert, one with all, one with one
        [[], [], []],  # nothing selected at all
    ],
)
def test_edge_routings(backend, path, rows):
    E, S, d = 4, 16, 20
    device = device_for(backend)
    w, perm, packed = make_ffn(d, E * S, S, bias=False, device=device)
    T = len(rows)
    x = torch.randn(T, d, device=device)
    route = tuple(r.to(device) for r in _custom_route(T, E, E, rows))
    ref, masked = oracles(x, w, perm, packed, route, S, "silu")
    out = pp.sparse_ffn(x, poison_padding(route, E, E), packed, path=path, backend=backend)
    check(out, ref, torch.float32)
    check(out, masked, torch.float32)


@needs_triton
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_triton_fp16(path):
    d, F, S, T = 40, 64, 16, 11
    w, perm, packed = make_ffn(d, F, S, dtype=torch.float16, device=DEVICE)
    x = torch.randn(T, d).half().to(DEVICE)
    route = pp.topp_route(torch.randn(T, F // S, device=DEVICE), 0.7)
    ref, masked = oracles(x, w, perm, packed, route, S, "silu")
    out = pp.sparse_ffn(x, route, packed, path=path, backend="triton")
    check(out, ref, torch.float16)
    check(out, masked, torch.float16)


@needs_triton
@pytest.mark.parametrize(
    "T, S, rows, use_dot",
    [
        (3, 16, None, None),  # tensor-core path (tokens padded to 16), one chunk per expert
        (3, 32, 16, True),  # two neuron chunks per expert: the reduction sums chunks in order
        (1, 32, 8, False),  # CUDA-core single-token path with four chunks
        (1, 16, None, False),  # CUDA-core single-token path, whole expert per program
        (1, 64, 32, None),  # one token padded to 16 rows on the tensor-core path, two chunks
    ],
)
@pytest.mark.parametrize("slot_grid", [True, False])  # one token: programs per slot, or the gate table
def test_decode_chunked_reduction(T, S, rows, use_dot, slot_grid):
    from prunepath_ops.ffn.triton_ffn import sparse_ffn_decode_triton

    d, F = 48, 128
    w, _, packed = make_ffn(d, F, S, bias=True, gated=False, act="gelu", device=DEVICE)
    x = torch.randn(T, d, device=DEVICE)
    route = pp.topp_route(torch.randn(T, F // S, device=DEVICE), 0.8)
    ref = R.sparse_ffn(
        x, *route, packed.w_in, packed.w_down, b_in=packed.b_in, b_out=packed.b_out, gated=False, act="gelu"
    )
    out = sparse_ffn_decode_triton(
        x,
        *route,
        packed.w_in,
        packed.b_in,
        packed.w_down,
        packed.b_out,
        False,
        "gelu",
        rows=rows,
        use_dot=use_dot,
        slot_grid_one_token=slot_grid,
    )
    check(out, ref, torch.float32)


@needs_triton
@pytest.mark.parametrize(
    "n, dtype",
    [
        (0, torch.float32),  # nothing to write, no launch
        (1, torch.bfloat16),  # a single element: one masked program
        (3001, torch.float16),  # not a multiple of the block: the last program masked
        (4096, torch.float32),  # whole blocks only
    ],
)
def test_zero_fill(n, dtype, monkeypatch):
    from prunepath_ops.ffn import triton_ffn

    for min_bytes in (0, 1 << 40):  # the Triton store stream, then Tensor.zero_
        monkeypatch.setattr(triton_ffn, "ZERO_FILL_TRITON_MIN_BYTES", min_bytes)
        t = torch.full((n + 5,), 7.0, dtype=dtype, device=DEVICE)
        triton_ffn.zero_fill(t[:n])
        assert bool((t[:n] == 0).all()) and bool((t[n:] == 7).all())  # nothing written past n


@needs_triton
@pytest.mark.parametrize(
    "down, gated, bias",
    [
        ("mm", True, False),  # gate in the up kernel, cuBLAS-style GEMM over the zero-filled H
        ("blocksparse", True, False),  # Triton down kernel skipping unselected experts per tile
        ("mm", False, True),  # plain FFN: the output bias added once after the GEMM
        ("blocksparse", False, True),
    ],
)
def test_prefill_down_variants(down, gated, bias):
    from prunepath_ops.ffn.triton_ffn import sparse_ffn_prefill_triton

    d, F, S, T = 40, 96, 16, 37
    act = "silu" if gated else "gelu_tanh"
    w, _, packed = make_ffn(d, F, S, bias=bias, gated=gated, act=act, device=DEVICE)
    x = torch.randn(T, d, device=DEVICE)
    route = pp.topp_route(torch.randn(T, F // S, device=DEVICE), 0.6)
    ref = R.sparse_ffn(
        x, *route, packed.w_in, packed.w_down, b_in=packed.b_in, b_out=packed.b_out, gated=gated, act=act
    )
    args = (packed.w_in, packed.b_in, packed.w_down, packed.b_out, gated, act)
    # Gate and up in one N = 2S dot with the tokens as the MMA's M or as its N (swap_ab), or two
    # N = S dots (swap_ab applies to the one-dot gated path only).
    for one_dot, swap_ab in ((True, False), (True, True), (False, False)):
        out = sparse_ffn_prefill_triton(x, *route, *args, down=down, one_dot=one_dot, swap_ab=swap_ab)
        check(out, ref, torch.float32)
    with pytest.raises(ValueError, match="down"):
        sparse_ffn_prefill_triton(x, *route, *args, down="dense")


@needs_triton
@pytest.mark.parametrize(
    "fraction, gated, bias, down, dtype",
    [
        (0.0, True, False, "mm", torch.float32),  # every group with a selected cell is dense
        (0.5, True, False, "mm", torch.float32),  # dense and grouped experts side by side
        (0.5, False, True, "mm", torch.float32),  # plain FFN with biases: b_in inside a dense group
        (0.5, True, False, "blocksparse", torch.float32),  # ungated H, unselected cells never read
        (0.5, True, False, "mm", torch.float16),
        (1.0, True, False, "mm", torch.float32),  # only groups with every cell selected
        (2.0, True, False, "mm", torch.float32),  # turned off
    ],
)
def test_prefill_dense_groups(fraction, gated, bias, down, dtype):
    from prunepath_ops.ffn.triton_ffn import _dense_group_config, dense_group_flags, sparse_ffn_prefill_triton

    # T, d not multiples of the tiles (T spans three token blocks); E = 20 leaves the last expert
    # group partial (G = 8 on a GPU, 2 or 4 interpreted); padding slots poisoned with
    # out-of-range ids and NaN gates.
    d, F, S = 40, 320, 16
    E = F // S
    block_m, group = _dense_group_config(4 if dtype == torch.float32 else 2, 2 * S if gated else S, not HAS_CUDA)[:2]
    T = 2 * block_m + 5
    act = "silu" if gated else "gelu"
    w, perm, packed = make_ffn(d, F, S, bias=bias, gated=gated, act=act, dtype=dtype, device=DEVICE)
    x = torch.randn(T, d, device=DEVICE).to(dtype)
    # The first group's experts favoured by every token: mostly selected, the others rarely.
    # (Group densities over seeds, G in 2 to 16: 0.72 or more for the first, 0.15 or less after.)
    logits = torch.randn(T, E, device=DEVICE) + 5.0 * (torch.arange(E, device=DEVICE) < group)
    route = poison_padding(pp.topp_route(logits, 0.95), E, E)
    ref, mask_ref = oracles(x, w, perm, packed, route, S, act)
    args = (packed.w_in, packed.b_in, packed.w_down, packed.b_out, gated, act)
    out = sparse_ffn_prefill_triton(x, *route, *args, down=down, dense_group_fraction=fraction)
    check(out, ref, dtype)
    check(out, mask_ref, dtype)
    # The flags against a direct count of the selected cells per expert group, the slot map
    # against the routing (filled for the dense groups' experts only).
    counts = R.align_experts(route[0], route[2], E, block_m)[3]
    flags, slot_map, dense_list = dense_group_flags(route[0], route[2], counts, group, min(fraction, 1.0))
    ids, _, n = route
    cells = torch.zeros(T, E, dtype=torch.int32)
    for t in range(T):
        for j in range(int(n[t])):
            cells[t, int(ids[t, j])] = j + 1
    per_group = torch.nn.functional.pad(cells > 0, (0, -E % group)).view(T, -(-E // group), group).sum((0, 2))
    width = torch.tensor([min(group, E - g * group) for g in range(per_group.numel())])
    want = (per_group > 0) & (per_group.float() >= min(fraction, 1.0) * (T * width).float())
    assert torch.equal(flags.cpu().bool(), want)
    num_dense = int(want.sum())
    assert int(dense_list[-1]) == num_dense  # the compact list the dense kernel walks
    assert torch.equal(dense_list.cpu()[:num_dense].long(), torch.nonzero(want).flatten())
    dense_cols = want.repeat_interleave(group)[:E]
    assert torch.equal(slot_map.cpu()[:, dense_cols], cells[:, dense_cols])  # the only cells written
    if fraction == 0.5:
        assert 0 < int(flags.sum()) < flags.numel()  # the case really mixes both kinds of groups


def test_leading_dims_and_errors():
    w, _, packed = make_ffn(16, 32, 16)
    x = torch.randn(2, 3, 16)
    route = pp.topp_route(torch.randn(6, 2), 0.9)
    assert pp.sparse_ffn(x, route, packed).shape == (2, 3, 16)
    with pytest.raises(ValueError, match="path"):
        pp.sparse_ffn(x, route, packed, path="fast")
    with pytest.raises(ValueError, match="backend"):
        pp.sparse_ffn(x, route, packed, backend="gpu")
    with pytest.raises(TypeError, match="dtype"):
        pp.sparse_ffn(x.half(), route, packed)
    with pytest.raises(ValueError, match="expert id"):
        bad = (torch.tensor([[5, 0]] * 6, dtype=torch.int32), route[1], torch.ones(6, dtype=torch.int32))
        pp.sparse_ffn(x, bad, packed, backend="cpu")
    with pytest.raises(ValueError, match="divide"):
        pp.pack_experts(torch.randn(30, 8), torch.randn(8, 30), 16)


@pytest.mark.parametrize(
    "device,T,path,built,expected",
    [
        ("cpu", 1, "auto", True, "cpu"),  # the C++ kernel on the CPU, whatever T
        ("cuda", 1, "auto", True, "cuda"),  # one token: the CUDA kernel (measured faster or tied)
        ("cuda", 1, "decode", True, "cuda"),  # the decode path forced: same
        ("cuda", 1, "prefill", True, "triton"),  # the prefill path forced: Triton's grouped GEMM
        ("cuda", 2, "auto", True, "triton"),  # a batch: the CUDA kernel would read each token's experts apart
        ("cuda", 1, "auto", False, "triton"),  # a build without the CUDA kernels
    ],
)
def test_auto_backend_choice(monkeypatch, device, T, path, built, expected):
    from prunepath_ops.ffn import ops as ffn_ops

    monkeypatch.setattr(ffn_ops, "CUDA_KERNEL_BUILT", built)
    assert ffn_ops.resolve_backend("auto", torch.device(device), T, path) == expected


def test_cpu_path_is_sparse_in_the_weights_it_reads():
    """Weights of unselected experts may be NaN: a sparse path never touches them."""
    w, _, packed = make_ffn(16, 64, 16)
    packed.w_in[1:3] = float("nan")
    packed.w_down[1:3] = float("nan")
    route = _custom_route(3, 4, 4, [[0], [3, 0], [3]])
    out = pp.sparse_ffn(torch.randn(3, 16), route, packed, backend="cpu")
    assert torch.isfinite(out).all()


def test_opcheck_sparse_ffn_cpu():
    w, _, packed = make_ffn(16, 32, 16, gated=False, bias=True, act="relu")
    x = torch.randn(4, 16)
    ids, gates, n = pp.topp_route(torch.randn(4, 2), 0.8)
    args = (x, ids, gates, n, packed.w_in, packed.b_in, packed.w_down, packed.b_out, False, "relu", "auto", "cpu")
    torch.library.opcheck(torch.ops.prunepath.sparse_ffn.default, args)


# ---- the C++ CPU kernel op, torch.ops.prunepath.expert_ffn -----------------------------------------

FAMILIES = {
    "gated_silu": dict(gated=True, act="silu", bias=False),
    "plain_gelu_bias": dict(gated=False, act="gelu", bias=True),
    "plain_gelu_tanh_bias": dict(gated=False, act="gelu_tanh", bias=True),
    "plain_relu": dict(gated=False, act="relu", bias=False),
}


def expert_ffn_args(x, route, packed):
    return (x, *route, packed.w_in, packed.b_in, packed.w_down, packed.b_out, packed.gated, packed.act)


def reference_of(x, route, packed):
    return R.sparse_ffn(
        x, *route, packed.w_in, packed.w_down, b_in=packed.b_in, b_out=packed.b_out, gated=packed.gated, act=packed.act
    )


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "T,d,F,S",
    [
        (0, 32, 64, 16),  # no tokens
        (1, 40, 96, 16),  # a single token (decode), d not a multiple of 16
        (13, 72, 128, 32),  # prime T, more than one token tile, d not a multiple of the column block
        (37, 136, 96, 16),  # prime T past several tiles, d > one column block, 6 experts
    ],
)
def test_expert_ffn_op_matches_reference(family, dtype, T, d, F, S):
    cfg = FAMILIES[family]
    w, perm, packed = make_ffn(d, F, S, gated=cfg["gated"], act=cfg["act"], bias=cfg["bias"], dtype=dtype)
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    E = F // S
    route = pp.topp_route(torch.randn(T, E, generator=torch.Generator().manual_seed(3)) * 2, 0.7)
    out = torch.ops.prunepath.expert_ffn(*expert_ffn_args(x, poison_padding(route, E, E), packed))
    assert out.shape == (T, d) and out.dtype == dtype
    check(out, reference_of(x, route, packed), dtype)
    if dtype == torch.float32:
        _, masked = oracles(x, w, perm, packed, route, S, cfg["act"])
        check(out, masked, dtype)


@pytest.mark.parametrize("family", ["gated_silu", "plain_gelu_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_ffn_op_zero_expert_tokens_and_poison(family, dtype):
    cfg = FAMILIES[family]
    E, S, d = 5, 16, 24
    _, _, packed = make_ffn(d, E * S, S, gated=cfg["gated"], act=cfg["act"], bias=cfg["bias"], dtype=dtype)
    rows = [[], [4, 0], [], [1, 2, 3, 4, 0], [2]]  # tokens with no expert (first, middle), one with all
    T = len(rows)
    route = _custom_route(T, E, E, rows)
    x = torch.randn(T, d).to(dtype)
    out = torch.ops.prunepath.expert_ffn(*expert_ffn_args(x, poison_padding(route, E, E, seed=7), packed))
    check(out, reference_of(x, route, packed), dtype)
    b_out = torch.zeros(d, dtype=dtype) if packed.b_out is None else packed.b_out
    for t in (0, 2):  # no expert: exactly b_out (or zeros)
        assert torch.equal(out[t], b_out)
    # num_active beyond [0, K] is clamped, as in the other backends
    ids, gates, n = route
    clamped = (ids, gates, n.masked_fill(n == 0, -3).masked_fill(n == E, E + 4))
    assert torch.equal(torch.ops.prunepath.expert_ffn(*expert_ffn_args(x, clamped, packed)), out)


def test_expert_ffn_op_deterministic_across_threads_and_batch():
    """Fixed-order fp32 sums: bitwise equal for 1 or 2 threads and for a token alone or in a batch."""
    _, _, packed = make_ffn(200, 48 * 16, 16)
    T = 19
    x = torch.randn(T, 200)
    route = pp.topp_route(torch.randn(T, 48), 0.4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.ops.prunepath.expert_ffn(*expert_ffn_args(x, route, packed))
    finally:
        torch.set_num_threads(threads)
    multi = torch.ops.prunepath.expert_ffn(*expert_ffn_args(x, route, packed))
    assert torch.equal(single, multi)
    for t in (0, 7, 18):
        alone = torch.ops.prunepath.expert_ffn(
            *expert_ffn_args(x[t : t + 1], tuple(r[t : t + 1] for r in route), packed)
        )
        assert torch.equal(alone[0], multi[t])


def test_expert_ffn_op_reads_only_selected_experts():
    _, _, packed = make_ffn(16, 64, 16, gated=False, act="gelu", bias=True)
    for weight in (packed.w_in, packed.w_down, packed.b_in):
        weight[1:3] = float("nan")
    route = _custom_route(3, 4, 4, [[0], [3, 0], [3]])
    out = torch.ops.prunepath.expert_ffn(*expert_ffn_args(torch.randn(3, 16), route, packed))
    assert torch.isfinite(out).all()


def test_expert_ffn_op_errors():
    _, _, packed = make_ffn(16, 32, 16)
    x = torch.randn(3, 16)
    route = pp.topp_route(torch.randn(3, 2), 0.9)
    args = expert_ffn_args(x, route, packed)
    op = torch.ops.prunepath.expert_ffn
    with pytest.raises(ValueError, match="expert id 2 outside"):
        op(x, torch.tensor([[0, 1], [2, 0], [0, 1]], dtype=torch.int32), *args[2:])
    with pytest.raises(TypeError, match="dtype of x"):
        op(x.half(), *args[1:])
    with pytest.raises(ValueError, match="w_in must be"):
        op(x, *args[1:4], packed.w_in[:, :16], *args[5:])
    with pytest.raises(ValueError, match="b_in is for a plain FFN"):
        op(*args[:5], torch.zeros(2, 16), *args[6:])
    with pytest.raises(ValueError, match="num_active must be int32"):
        op(*args[:3], route[2].long(), *args[4:])
    with pytest.raises(ValueError, match="act must be one of"):
        op(*args[:-1], "tanh")
    with pytest.raises(ValueError, match="x must be"):
        op(x[None], *args[1:])


@pytest.mark.parametrize(
    "family,dtype,T",
    [
        ("gated_silu", torch.float32, 5),  # gated, fp32
        ("gated_silu", torch.bfloat16, 1),  # gated, bf16, one token
        ("plain_gelu_bias", torch.float32, 0),  # plain with both biases, no tokens
        ("plain_relu", torch.bfloat16, 3),  # plain without bias, bf16
    ],
)
def test_opcheck_expert_ffn(family, dtype, T):
    cfg = FAMILIES[family]
    _, _, packed = make_ffn(16, 48, 16, gated=cfg["gated"], act=cfg["act"], bias=cfg["bias"], dtype=dtype)
    x = torch.randn(T, 16).to(dtype)
    route = poison_padding(pp.topp_route(torch.randn(T, 3), 0.6), 3, 3)
    torch.library.opcheck(torch.ops.prunepath.expert_ffn.default, expert_ffn_args(x, route, packed))


@needs_triton
def test_opcheck_sparse_ffn_triton():
    w, _, packed = make_ffn(16, 32, 16, device=DEVICE)
    x = torch.randn(3, 16, device=DEVICE)
    ids, gates, n = pp.topp_route(torch.randn(3, 2, device=DEVICE), 0.8)
    args = (x, ids, gates, n, packed.w_in, None, packed.w_down, None, True, "silu", "decode", "triton")
    torch.library.opcheck(torch.ops.prunepath.sparse_ffn.default, args)


def test_compile_fullgraph_router_route_ffn():
    torch._dynamo.reset()
    w, _, packed = make_ffn(16, 64, 16)
    wr = torch.randn(4, 16)

    def routed(x, tau: float):
        route = pp.topp_route(x @ wr.t(), tau)
        return pp.sparse_ffn(x, route, packed)

    x = torch.randn(5, 16)
    compiled = torch.compile(routed, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, 0.6), routed(x, 0.6))


class _Llama(nn.Module):
    def __init__(self, d, F):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, F, bias=False), nn.Linear(d, F, bias=False)
        self.down_proj, self.act_fn = nn.Linear(F, d, bias=False), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _Bert(nn.Module):
    def __init__(self, d, F):
        super().__init__()
        self.fc1, self.fc2, self.activation = nn.Linear(d, F), nn.Linear(F, d), nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


@pytest.mark.parametrize("cls", [_Llama, _Bert])
def test_module_from_dense(cls):
    torch.manual_seed(0)
    d, F, S = 24, 64, 16
    dense = cls(d, F)
    perm = torch.randperm(F)
    mlp = pp.PrunePathMLP.from_dense(dense, S, perm, router_weight=torch.randn(F // S, d), tau=2.0, gate="one")
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        check(mlp(x), dense(x), torch.float32)  # tau >= 1, gate one: the dense FFN
        mlp.tau, mlp.gate = 0.5, "sigmoid"
        x2 = x.reshape(-1, d)
        route = mlp.route(x2)
        assert int(route.num_active.max()) < F // S
        packed = mlp.packed
        ref = R.sparse_ffn(
            x2,
            *route,
            packed.w_in,
            packed.w_down,
            b_in=packed.b_in,
            b_out=packed.b_out,
            gated=packed.gated,
            act=packed.act,
        )
        check(mlp(x).reshape(-1, d), ref, torch.float32)


# ---- GPU only: bf16, Llama-like shapes, determinism ---------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("S", [16, 32, 64, 128])
@pytest.mark.parametrize("T", [1, 4, 16, 17, 331])  # decode sizes, just above, a prime prefill
def test_gpu_against_reference(dtype, S, T):
    d, F = 1000, 32 * 128  # d not a multiple of any tile
    w, perm, packed = make_ffn(d, F, S, dtype=dtype, device="cuda")
    x = torch.randn(T, d, device="cuda").to(dtype)
    route = pp.topp_route(torch.randn(T, F // S, device="cuda") * 3, 0.5)
    ref = R.sparse_ffn(x.cpu(), *(t.cpu() for t in route), packed.w_in.cpu(), packed.w_down.cpu(), act="silu")
    check(pp.sparse_ffn(x, route, packed).cpu(), ref, dtype)
    if T <= 16:
        check(pp.sparse_ffn(x, route, packed, path="prefill").cpu(), ref, dtype)


@needs_cuda
@pytest.mark.parametrize("T", [1, 16, 1024])
def test_gpu_bitwise_deterministic(T):
    d, F, S = 4096, 14336 // 4, 32
    _, _, packed = make_ffn(d, F, S, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(T, d, device="cuda").bfloat16()
    route = pp.topp_route(torch.randn(T, F // S, device="cuda"), 0.3)
    first = pp.sparse_ffn(x, route, packed)
    for _ in range(5):
        assert torch.equal(pp.sparse_ffn(x, route, packed), first)


@needs_cuda
def test_gpu_cuda_graph_capture_decode():
    d, F, S = 512, 1024, 32
    _, _, packed = make_ffn(d, F, S, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(4, d, device="cuda").bfloat16()
    route = pp.topp_route(torch.randn(4, F // S, device="cuda"), 0.4)
    expected = pp.sparse_ffn(x, route, packed)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pp.sparse_ffn(x, route, packed)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


def test_decode_trace_argument_checked():
    from prunepath_ops.ffn.triton_ffn import sparse_ffn_decode_triton

    _, _, packed = make_ffn(32, 64, 16, device=DEVICE)
    x = torch.randn(1, 32, device=DEVICE)
    route = pp.topp_route(torch.randn(1, 4, device=DEVICE), 0.5)
    args = (x, *route, packed.w_in, packed.b_in, packed.w_down, packed.b_out, True, "silu")
    with pytest.raises(ValueError, match="trace must be an int64"):
        sparse_ffn_decode_triton(*args, trace=torch.zeros(3, 4, dtype=torch.int64, device=DEVICE))  # wrong rows


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (%smid and %globaltimer)")
def test_gpu_decode_trace_records_each_program():
    from prunepath_ops.ffn.triton_ffn import sparse_ffn_decode_triton

    _, _, packed = make_ffn(256, 32 * 12, 32, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(1, 256, device="cuda").bfloat16()
    route = pp.topp_route(torch.randn(1, 12, device="cuda"), 0.6)
    args = (x, *route, packed.w_in, packed.b_in, packed.w_down, packed.b_out, True, "silu")
    trace = torch.zeros(12, 4, dtype=torch.int64, device="cuda")
    out = sparse_ffn_decode_triton(*args, trace=trace)
    assert torch.equal(out, sparse_ffn_decode_triton(*args))  # tracing leaves the result alone
    sm, start, end, active = trace.cpu().T
    assert int(active.sum()) == int(route.num_active)  # one program per selected slot did work
    assert bool((end >= start).all()) and bool((start > 0).all())
    assert int(sm.max()) < torch.cuda.get_device_properties(0).multi_processor_count


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (%smid and %globaltimer)")
def test_gpu_prefill_up_trace_records_each_block():
    from prunepath_ops.ffn import triton_ffn
    from prunepath_ops.reference.sparse_ffn import align_bounds

    d, F, S, T = 64, 32 * 8, 32, 300
    _, _, packed = make_ffn(d, F, S, dtype=torch.bfloat16, device="cuda")
    E = F // S
    x = torch.randn(T, d, device="cuda").bfloat16()
    route = pp.topp_route(torch.randn(T, E, device="cuda"), 0.6)
    tiles = triton_ffn._prefill_tiles(2, 2 * S, False)
    sorted_pairs, block_expert, offsets, counts = triton_ffn._align(route.expert_ids, route.num_active, E, tiles[0])
    b_max = align_bounds(T * route.expert_ids.shape[1], E, tiles[0])[1]

    def up(trace):
        h = torch.zeros(T, E * S, dtype=x.dtype, device="cuda")
        triton_ffn.launch_grouped_up(
            x, packed.w_in, None, route.gates, h, (sorted_pairs, block_expert, offsets), None, b_max, gated=True,
            act="silu", gate_in_h=True, one_dot=True, swap_ab=True, group=4, tiles=tiles, trace=trace,
        )  # fmt: skip
        return h

    trace = torch.zeros(b_max, 4, dtype=torch.int64, device="cuda")
    assert torch.equal(up(trace), up(None))  # tracing leaves the result alone
    blocks = int(offsets[E]) // tiles[0]
    sm, start, end, rows = trace[:blocks].cpu().T
    assert int(rows.sum()) == int(counts.sum())  # every pair in exactly one traced block
    assert bool((end >= start).all()) and bool((start > 0).all())
    assert bool((trace[blocks:] == 0).all())  # no block past the device's count
    assert int(sm.max()) < torch.cuda.get_device_properties(0).multi_processor_count


# ----------------------------------------------------------------------------- expert_ffn's CUDA kernel
# (prunepath::expert_ffn on CUDA: every token's selected neurons split evenly over the SMs;
# sparse_ffn(backend="cuda"))


def test_cuda_backend_needs_cuda_tensors():
    _, _, packed = make_ffn(16, 32, 16)
    route = pp.topp_route(torch.randn(1, 2), 0.9)
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        pp.sparse_ffn(torch.randn(1, 16), route, packed, backend="cuda")


@needs_cuda
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "T,d,F,S,tau",
    [
        (0, 64, 128, 16, 0.5),  # no tokens
        (1, 4096, 32 * 64, 32, 0.5),  # one token, Llama width, 16-byte vectors
        (1, 1000, 32 * 40, 32, 2.0),  # every expert; d a multiple of 8 but not of a warp's 256
        (1, 36, 16 * 7, 16, 0.7),  # d = 36: no 16-byte vectors for 16-bit types (element path)
        (3, 40, 64 * 6, 64, 0.6),  # a few tokens, S = 64
        (17, 200, 128 * 5, 128, 0.8),  # prime T past the decode limit, S = 128
    ],
)
def test_gpu_expert_ffn_cuda_matches_reference(family, dtype, T, d, F, S, tau):
    cfg = FAMILIES[family]
    w, perm, packed = make_ffn(
        d, F, S, gated=cfg["gated"], act=cfg["act"], bias=cfg["bias"], dtype=dtype, device="cuda"
    )
    E = F // S
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(2)).to(dtype).cuda()
    route = pp.topp_route((torch.randn(T, E, generator=torch.Generator().manual_seed(3)) * 2).cuda(), tau)
    out = torch.ops.prunepath.expert_ffn(*expert_ffn_args(x, poison_padding(route, E, E), packed), True)
    assert out.shape == (T, d) and out.dtype == dtype
    cpu = tuple(t.cpu() for t in route)
    ref = R.sparse_ffn(
        x.cpu(), *cpu, packed.w_in.cpu(), packed.w_down.cpu(),
        b_in=None if packed.b_in is None else packed.b_in.cpu(),
        b_out=None if packed.b_out is None else packed.b_out.cpu(), gated=packed.gated, act=packed.act,
    )  # fmt: skip
    check(out.cpu(), ref, dtype)
    if dtype == torch.float32:
        _, masked = oracles(x, w, perm, packed, route, S, cfg["act"])
        check(out, masked, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_expert_ffn_cuda_edge_routings(dtype):
    E, S, d = 6, 32, 256
    _, _, packed = make_ffn(d, E * S, S, dtype=dtype, device="cuda")
    rows = [[], [5], [0, 1, 2, 3, 4, 5], [3, 3], [2]]  # no expert, one, all, one expert twice, one
    route = tuple(t.cuda() for t in _custom_route(len(rows), E, E, rows))
    x = torch.randn(len(rows), d).to(dtype).cuda()
    out = torch.ops.prunepath.expert_ffn(*expert_ffn_args(x, poison_padding(route, E, E, seed=5), packed))
    check(out.cpu(), reference_of(x.cpu(), tuple(t.cpu() for t in route), packed.to("cpu")), dtype)
    assert torch.equal(out[0], torch.zeros(d, dtype=dtype, device="cuda"))  # no expert: exactly zero
    # An id outside [0, E) in an active slot contributes nothing on CUDA (no host sync to raise).
    ids, gates, n = (t.clone() for t in route)
    ids[2, 1] = E + 3
    ids[2, 4] = -2
    bad = torch.ops.prunepath.expert_ffn(*expert_ffn_args(x, (ids, gates, n), packed))
    keep = [[0, 2, 3, 5]]
    gates_kept = gates[2:3, [0, 2, 3, 5]].cpu()
    one = (torch.tensor(keep, dtype=torch.int32), gates_kept, torch.tensor([4], dtype=torch.int32))
    check(bad[2:3].cpu(), reference_of(x[2:3].cpu(), one, packed.to("cpu")), dtype)


@needs_cuda
def test_gpu_expert_ffn_cuda_many_slots_and_neurons():
    """K > 1024 slots (the slot ids are read from global memory) and more neurons than the default
    grid holds at kFfnMaxNeurons per block (the launcher adds blocks)."""
    E, S, d = 1100, 32, 64
    _, _, packed = make_ffn(d, E * S, S, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(1, d).bfloat16().cuda()
    route = pp.topp_route(torch.randn(1, E, device="cuda"), 2.0)  # all 1100 experts: 35,200 neurons
    assert int(route.num_active) == E
    out = torch.ops.prunepath.expert_ffn(*expert_ffn_args(x, route, packed))
    check(out.cpu(), reference_of(x.cpu(), tuple(t.cpu() for t in route), packed.to("cpu")), torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("blocks,cap", [("1", "1"), ("3", "1"), ("2", "0"), ("8", "0")])
def test_gpu_expert_ffn_cuda_grid_knobs(monkeypatch, blocks, cap):
    """The grid's blocks per SM and the occupancy cap change the summation split, not the result."""
    d, F, S = 4096, 32 * 96, 32
    _, _, packed = make_ffn(d, F, S, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(1, d).bfloat16().cuda()
    route = pp.topp_route(torch.randn(1, F // S, device="cuda"), 0.5)
    monkeypatch.setenv("PRUNEPATH_EXPERT_FFN_BLOCKS_PER_SM", blocks)
    monkeypatch.setenv("PRUNEPATH_EXPERT_FFN_CAP", cap)
    out = torch.ops.prunepath.expert_ffn(*expert_ffn_args(x, route, packed))
    check(out.cpu(), reference_of(x.cpu(), tuple(t.cpu() for t in route), packed.to("cpu")), torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("pdl", [False, True])
def test_gpu_expert_ffn_cuda_graph_and_bitwise_repeat(pdl):
    d, F, S = 4096, 32 * 448, 32
    _, _, packed = make_ffn(d, F, S, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(1, d).bfloat16().cuda()
    route = pp.topp_route(torch.randn(1, F // S, device="cuda"), 0.3)
    args = expert_ffn_args(x, route, packed)
    first = torch.ops.prunepath.expert_ffn(*args, pdl)
    for _ in range(5):
        assert torch.equal(torch.ops.prunepath.expert_ffn(*args, pdl), first)
    assert torch.equal(pp.sparse_ffn(x, route, packed, backend="cuda"), first)  # PDL changes no bit
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.prunepath.expert_ffn(*args, pdl)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first)


@needs_cuda
@pytest.mark.parametrize(
    "family,dtype,T",
    [
        ("gated_silu", torch.bfloat16, 1),  # the decode case
        ("plain_gelu_bias", torch.float32, 3),  # plain with both biases, a few tokens
        ("plain_relu", torch.float16, 0),  # no tokens
    ],
)
def test_gpu_opcheck_expert_ffn_cuda(family, dtype, T):
    cfg = FAMILIES[family]
    _, _, packed = make_ffn(
        64, 96, 16, gated=cfg["gated"], act=cfg["act"], bias=cfg["bias"], dtype=dtype, device="cuda"
    )
    x = torch.randn(T, 64, device="cuda").to(dtype)
    route = poison_padding(pp.topp_route(torch.randn(T, 6, device="cuda"), 0.6), 6, 6)
    torch.library.opcheck(torch.ops.prunepath.expert_ffn.default, (*expert_ffn_args(x, route, packed), True))


@needs_cuda
def test_gpu_expert_ffn_cuda_errors():
    _, _, packed = make_ffn(16, 32, 16, device="cuda")
    x = torch.randn(1, 16, device="cuda")
    route = pp.topp_route(torch.randn(1, 2, device="cuda"), 0.9)
    args = expert_ffn_args(x, route, packed)
    with pytest.raises(ValueError, match="gates is on cpu"):
        torch.ops.prunepath.expert_ffn(*args[:2], route[1].cpu(), *args[3:])
    with pytest.raises(ValueError, match="w_down must be"):
        torch.ops.prunepath.expert_ffn(*args[:6], packed.w_down[:, :, :8], *args[7:])
