"""The decode step's ops (``add_rms_norm``, ``rope_qkv``, ``decode_linear``) against the reference and the model's modules.

Legend: B rows, d hidden, H query heads, Hkv kv heads, D head dim, K/N GEMV input/output width.

CPU: the reference backend, and the Triton kernels under TRITON_INTERPRET=1 (fp32/fp16). GPU: bf16 too,
Llama-3-8B sizes, CUDA-graph capture.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunepath_ops import reference as R
from prunepath_ops.decode_step import add_rms_norm, decode_linear, rope_qkv
from prunepath_ops.models.llama import RMSNorm, apply_rope, rope_tables
from prunepath_ops.testing import assert_close

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TRITON_OK = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
BACKENDS = ["cpu", pytest.param("triton", marks=needs_triton)]
GEMV_BACKENDS = [*BACKENDS, pytest.param("cuda", marks=needs_cuda)]  # decode_linear's: + the C++ CUDA kernel
GEMV_DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]  # decode_gemv's C++ kernels
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)]


def _device(backend: str) -> str:
    return "cpu" if backend == "cpu" else DEVICE


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B, d, with_residual",
    [
        (1, 64, True),  # one decode token
        (3, 48, True),  # d not a power of two: a masked tail in the row
        (5, 100, False),  # no residual: h is x itself
        (0, 32, True),  # no rows
    ],
)
def test_add_rms_norm_matches_reference_and_module(backend, dtype, B, d, with_residual):
    dev = _device(backend)
    g = torch.Generator().manual_seed(B * 1000 + d)
    x = torch.randn(B, d, generator=g).to(dev, dtype)
    res = torch.randn(B, d, generator=g).to(dev, dtype) if with_residual else None
    norm = RMSNorm(d, eps=1e-6).to(dev, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g))
    y, h = add_rms_norm(x, res, norm.weight.detach(), 1e-6, backend=backend)
    ref_y, ref_h = R.add_rms_norm(x, res, norm.weight.detach(), 1e-6)
    assert torch.equal(h, ref_h)  # the add rounds once, in the dtype, like PyTorch's
    assert B == 0 or h.data_ptr() != x.data_ptr()  # a new tensor even without a residual
    assert_close(y, ref_y, dtype)
    with torch.no_grad():
        assert_close(y, norm(ref_h), dtype)  # what the model's module computes


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_rms_norm_nonfinite_rows_stay_in_their_row(backend):
    dev = _device(backend)
    x = torch.randn(3, 32, device=dev)
    x[0, 5] = float("nan")
    x[2, 1] = float("inf")
    y, h = add_rms_norm(x, None, torch.ones(32, device=dev), backend=backend)
    assert bool(y[0].isnan().all())  # a NaN: the whole row
    assert bool(y[2, 1].isnan()) and bool((y[2, torch.arange(32, device=dev) != 1] == 0).all())  # an Inf: NaN, 0s
    assert bool(torch.isfinite(y[1]).all())
    ref = R.add_rms_norm(x, None, torch.ones(32, device=dev), 1e-5)[0]
    torch.testing.assert_close(y, ref, equal_nan=True, atol=1e-5, rtol=1e-5)  # as PyTorch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B, H, Hkv, D",
    [
        (1, 4, 4, 16),  # multi-head attention (Hkv = H)
        (3, 8, 2, 64),  # GQA 4
        (2, 8, 1, 32),  # GQA 8 (one kv head)
        (0, 4, 2, 16),  # no rows
    ],
)
def test_rope_qkv_matches_reference_and_apply_rope(backend, dtype, B, H, Hkv, D):
    dev = _device(backend)
    g = torch.Generator().manual_seed(B + 10 * H + 100 * D)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, generator=g).to(dev, dtype)
    cos_t, sin_t = rope_tables(D, 64, 10000.0)
    pos = torch.randint(0, 64, (B,), generator=g)
    cos, sin = cos_t[pos].to(dev, dtype), sin_t[pos].to(dev, dtype)  # [B, D]
    out = rope_qkv(qkv, cos, sin, H, Hkv, backend=backend)
    assert out.shape == (B, H + 2 * Hkv, D) and out.is_contiguous()
    ref = R.rope_qkv(qkv, cos, sin, H, Hkv)
    assert_close(out, ref, dtype)
    heads = qkv.view(B, H + 2 * Hkv, D)
    assert torch.equal(out[:, H + Hkv :], heads[:, H + Hkv :])  # v is copied untouched
    assert_close(out[:, :H], apply_rope(heads[:, :H], cos, sin), dtype)  # the model's q
    assert_close(out[:, H : H + Hkv], apply_rope(heads[:, H : H + Hkv], cos, sin), dtype)  # and k


@needs_triton
@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 4),
    d=st.integers(1, 130),
    with_residual=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),  # tiny and large rows: the mean square's range
    seed=st.integers(0, 2**16),
)
def test_add_rms_norm_random_rows(B, d, with_residual, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, d, generator=g) * scale).to(DEVICE)
    res = (torch.randn(B, d, generator=g) * scale).to(DEVICE) if with_residual else None
    w = torch.randn(d, generator=g).to(DEVICE)
    y, h = add_rms_norm(x, res, w, 1e-6, backend="triton")
    ref_y, ref_h = R.add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(h, ref_h)
    assert_close(y, ref_y, torch.float32)


@needs_triton
@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    Hkv=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    D=st.sampled_from([2, 8, 32]),
    seed=st.integers(0, 2**16),
)
def test_rope_qkv_random_shapes(B, Hkv, group, D, seed):
    g = torch.Generator().manual_seed(seed)
    H = Hkv * group
    qkv = torch.randn(B, (H + 2 * Hkv) * D, generator=g).to(DEVICE)
    cos, sin = torch.randn(B, D, generator=g).to(DEVICE), torch.randn(B, D, generator=g).to(DEVICE)
    out = rope_qkv(qkv, cos, sin, H, Hkv, backend="triton")
    assert_close(out, R.rope_qkv(qkv, cos, sin, H, Hkv), torch.float32)


@pytest.mark.parametrize("backend", GEMV_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B, K, N",
    [
        (0, 16, 8),  # empty batch: nothing launched
        (1, 64, 96),  # batch-1 decode, tile-aligned
        (1, 37, 5),  # K and N not multiples of anything: masked tails in both
        (3, 130, 33),  # odd batch inside one 4-token program; K one tile plus a tail
        (5, 200, 17),  # two token groups, the second partial
        (16, 48, 64),  # the largest decode batch
        (2, 1, 3),  # K = 1
    ],
)
def test_decode_linear_matches_reference(backend, dtype, B, K, N):
    device = _device(backend)
    gen = torch.Generator().manual_seed(B * 1000 + K + N)
    x = torch.randn(B, K, generator=gen).to(device, dtype)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(device, dtype)
    y = decode_linear(x, w, backend=backend)
    assert y.shape == (B, N) and y.dtype == dtype and y.is_contiguous()
    if backend == "cpu":
        assert torch.equal(y, R.decode_linear(x, w))
    else:
        assert_close(y.float(), R.decode_linear(x.double(), w.double()).float(), dtype)
        assert torch.equal(decode_linear(x, w, backend=backend), y)  # fixed summation order


@pytest.mark.parametrize("backend", GEMV_BACKENDS)
def test_decode_linear_strided_rows_and_nonfinite(backend):
    # x may be a row-strided view (a slice of a wider buffer); NaN/inf propagate like a matmul's.
    device = _device(backend)
    base = torch.randn(3, 80, device=device)
    x = base[:, :64]
    w = torch.randn(24, 64, device=device)
    assert_close(decode_linear(x, w, backend=backend), R.decode_linear(x, w), torch.float32)
    x = x.clone()
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    y = decode_linear(x, w, backend=backend)
    assert torch.isnan(y[1]).all() and not torch.isfinite(y[2]).any() and torch.isfinite(y[0]).all()


@needs_triton
@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 16),
    K=st.integers(1, 300),
    N=st.integers(1, 80),
    half=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_decode_linear_random_shapes(B, K, N, half, seed):
    dtype = torch.float16 if half else torch.float32
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=gen).to(DEVICE, dtype)
    w = torch.randn(N, K, generator=gen).to(DEVICE, dtype)
    y = decode_linear(x, w, backend="triton")
    ref = R.decode_linear(x.double(), w.double())
    # Tolerance relative to the size of the terms summed (a sum of K products of N(0, 1) values).
    atol = (1e-3 if half else 1e-5) * (K**0.5 + 1)
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=1e-2 if half else 1e-5)


def _gemv_inputs(device, dtype, B, K, N, seed, misalign=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K + misalign, generator=gen).to(device, dtype)[:, misalign:]  # misalign: x off 16 bytes
    w = (torch.randn(N, K, generator=gen) / max(K, 1) ** 0.5).to(device, dtype)
    return x, w


@pytest.mark.parametrize("device", GEMV_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize(
    "B, K, N, misalign",
    [
        (1, 4096, 40, False),  # batch-1 decode: K a whole number of 16-byte vector batches per lane
        (2, 1000, 33, False),  # two tokens; N odd: the last warp's second row is past the end
        (3, 136, 9, False),  # three tokens in one 4-token pass (one masked); K a partial vector batch
        (7, 64, 16, False),  # two passes over the weights, the second with three tokens
        (1, 37, 5, False),  # K not a multiple of the vector: one element per lane and step
        (2, 64, 12, True),  # x 2 or 4 bytes past 16-byte alignment: the element path
        (4, 1, 3, False),  # K = 1
        (3, 0, 5, False),  # K = 0: all zeros
        (0, 8, 4, False),  # no tokens
        (2, 8, 0, False),  # no output features
    ],
)
def test_decode_gemv_kernels_match_reference(device, dtype, pdl, B, K, N, misalign):
    # prunepath::decode_gemv's C++ kernels (CPU and CUDA) called directly, against the float64 matmul.
    x, w = _gemv_inputs(device, dtype, B, K, N, B * 100003 + K * 31 + N, misalign)
    y = torch.ops.prunepath.decode_gemv(x, w, pdl)
    assert y.shape == (B, N) and y.dtype == dtype and y.device == x.device and y.is_contiguous()
    assert_close(y.float(), R.decode_linear(x.double(), w.double()).float(), dtype)
    assert torch.equal(torch.ops.prunepath.decode_gemv(x, w, pdl), y)  # fixed summation order: same bits


@pytest.mark.parametrize("device", GEMV_DEVICES)
def test_decode_gemv_nonfinite_rows(device):
    # NaN/inf stay in their token's row, as in a matmul (the schema comment's promise).
    x, w = _gemv_inputs(device, torch.float32, 3, 64, 24, 7)
    x = x.clone()
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    y = torch.ops.prunepath.decode_gemv(x, w, False)
    assert torch.isnan(y[1]).all() and not torch.isfinite(y[2]).any() and torch.isfinite(y[0]).all()


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 9),
    K=st.integers(1, 600),
    N=st.integers(1, 70),
    half=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_decode_gemv_random_shapes(B, K, N, half, seed):
    dtype = torch.float16 if half else torch.float32
    x, w = _gemv_inputs(DEVICE, dtype, B, K, N, seed)
    y = torch.ops.prunepath.decode_gemv(x, w, True)
    ref = R.decode_linear(x.double(), w.double())
    torch.testing.assert_close(y.double(), ref, atol=(1e-3 if half else 1e-5), rtol=1e-2 if half else 1e-5)
    if HAS_CUDA:  # the CPU kernel on the same inputs: same sums, another order
        cpu = torch.ops.prunepath.decode_gemv(x.cpu(), w.cpu(), False)
        torch.testing.assert_close(y.cpu().double(), cpu.double(), atol=(2e-3 if half else 2e-5), rtol=1e-2)


@pytest.mark.parametrize("device", ["cpu", "meta"])  # the C++ checks, and the fake kernel's copy of them
@pytest.mark.parametrize(
    "x_shape, w_shape, dtypes, transpose, match",
    [
        ((2, 3, 4), (5, 4), None, None, "x must be 2-D"),
        ((2, 4), (5, 3), None, None, r"weight must be \[N, K\] with K = 4"),
        ((2, 4), (5, 4), (torch.float32, torch.float16), None, "weight must have the dtype of x"),
        ((2, 4), (5, 4), (torch.int64, torch.int64), None, "x must be float32, float16 or bfloat16"),
        ((2, 4), (4, 5), None, "w", "weight must be contiguous"),
        ((4, 2), (5, 4), None, "x", "x must have a unit inner stride"),
    ],
)
def test_decode_gemv_bad_input_is_named(device, x_shape, w_shape, dtypes, transpose, match):
    xd, wd = dtypes or (torch.float32, torch.float32)
    x = torch.zeros(x_shape, dtype=xd, device=device)
    w = torch.zeros(w_shape, dtype=wd, device=device)
    x, w = (x.t() if transpose == "x" else x), (w.t() if transpose == "w" else w)
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.prunepath.decode_gemv(x, w, False)


@needs_cuda
def test_decode_gemv_device_mismatch_is_named():
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        torch.ops.prunepath.decode_gemv(torch.randn(1, 8, device="cuda"), torch.randn(4, 8), False)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: decode_linear(torch.randn(2, 3, 4), torch.randn(5, 4)), "x must be 2-D"),
        (lambda: decode_linear(torch.randn(2, 4), torch.randn(5, 3)), r"weight must be \[N, K\] with K = 4"),
        (lambda: decode_linear(torch.randn(2, 4), torch.randn(5, 4).half()), "weight must have dtype"),
        (lambda: decode_linear(torch.randn(2, 4), torch.randn(4, 5).t()), "weight must be contiguous"),
        (lambda: decode_linear(torch.randn(4, 2).t(), torch.randn(5, 4)), "x must be contiguous"),
        (lambda: decode_linear(torch.randn(2, 4).long(), torch.randn(5, 4)), "x must be float32"),
        (lambda: decode_linear(torch.randn(2, 4), torch.randn(5, 4), backend="gpu"), "backend must be one of"),
        (lambda: decode_linear(torch.randn(2, 4), torch.randn(5, 4), backend="cuda"), "needs CUDA tensors"),
        (lambda: add_rms_norm(torch.randn(2, 3, 4), None, torch.ones(4)), "x must be 2-D"),
        (lambda: add_rms_norm(torch.randn(2, 4), torch.randn(2, 5), torch.ones(4)), "residual must have shape"),
        (lambda: add_rms_norm(torch.randn(2, 4), None, torch.ones(4).double()), "weight must have dtype"),
        (lambda: add_rms_norm(torch.randn(2, 4), None, torch.ones(4), -1.0), "eps must be"),
        (lambda: add_rms_norm(torch.randn(2, 4).long(), None, torch.ones(4)), "x must be float32"),
        (lambda: add_rms_norm(torch.randn(4, 2).t(), None, torch.ones(4)), "x must be contiguous"),
        (lambda: rope_qkv(torch.randn(2, 8 * 16), torch.ones(2, 16), torch.ones(2, 16), 4, 1), "qkv must have shape"),
        (lambda: rope_qkv(torch.randn(2, 6 * 12), torch.ones(2, 12), torch.ones(2, 12), 4, 1), "power of two"),
        (lambda: rope_qkv(torch.randn(2, 6 * 16), torch.ones(1, 16), torch.ones(2, 16), 4, 1), "cos must have shape"),
        (lambda: rope_qkv(torch.randn(2, 6 * 16), torch.ones(2, 16), torch.ones(2, 16), 0, 1), "must be positive"),
        (lambda: add_rms_norm(torch.randn(2, 4), None, torch.ones(4), backend="gpu"), "backend must be one of"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_opcheck_every_op():
    x, r, w = torch.randn(3, 48), torch.randn(3, 48), torch.randn(48)
    torch.library.opcheck(torch.ops.prunepath.add_rms_norm.default, (x, r, w, 1e-5, "auto"))
    torch.library.opcheck(torch.ops.prunepath.add_rms_norm.default, (x, None, w, 1e-5, "auto"))
    qkv, cos, sin = torch.randn(2, 8 * 16), torch.randn(2, 16), torch.randn(2, 16)
    torch.library.opcheck(torch.ops.prunepath.rope_qkv.default, (qkv, cos, sin, 4, 2, "auto"))
    torch.library.opcheck(torch.ops.prunepath.decode_linear.default, (x, torch.randn(40, 48), "auto"))
    torch.library.opcheck(torch.ops.prunepath.decode_gemv.default, (x, torch.randn(40, 48), False))
    torch.library.opcheck(torch.ops.prunepath.decode_gemv.default, (x[:, :37], torch.randn(9, 37), False))
    if HAS_CUDA:
        xc, wc = torch.randn(1, 256, device="cuda").bfloat16(), torch.randn(96, 256, device="cuda").bfloat16()
        for backend in ("cuda", "triton"):
            torch.library.opcheck(torch.ops.prunepath.decode_linear.default, (xc, wc, backend))
        torch.library.opcheck(torch.ops.prunepath.decode_gemv.default, (xc, wc, True))


def test_compile_fullgraph():
    def step(x, r, w, qkv, cos, sin, w_out):
        y, h = add_rms_norm(x, r, w)
        return (
            y,
            h,
            rope_qkv(qkv, cos, sin, 4, 2),
            decode_linear(y, w_out),
            torch.ops.prunepath.decode_gemv(h, w_out, False),
        )

    args = (torch.randn(2, 48), torch.randn(2, 48), torch.randn(48), torch.randn(2, 128), torch.randn(2, 16))
    args = (*args, torch.randn(2, 16), torch.randn(5, 48))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), step(*args), strict=True):
        assert torch.equal(got, want)


@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_llama_sizes_and_graph_capture(backend):
    d, H, Hkv, D = 4096, 32, 8, 128
    x, r = torch.randn(1, d, device="cuda").bfloat16(), torch.randn(1, d, device="cuda").bfloat16()
    w = torch.randn(d, device="cuda").bfloat16()
    qkv = torch.randn(1, (H + 2 * Hkv) * D, device="cuda").bfloat16()
    cos, sin = (t[[37]].cuda().bfloat16() for t in rope_tables(D, 64, 500000.0))
    w_qkv = (torch.randn((H + 2 * Hkv) * D, d, device="cuda") / d**0.5).bfloat16()
    w_o = (torch.randn(d, H * D, device="cuda") / d**0.5).bfloat16()
    graph = torch.cuda.CUDAGraph()
    # compile outside the capture
    add_rms_norm(x, r, w), rope_qkv(qkv, cos, sin, H, Hkv), decode_linear(x, w_qkv, backend=backend)
    with torch.cuda.graph(graph):
        (y, h), out = add_rms_norm(x, r, w), rope_qkv(qkv, cos, sin, H, Hkv)
        proj = decode_linear(y, w_qkv, backend=backend)  # PDL-launched after add_rms_norm: reads its output
        proj_o = decode_linear(proj[:, : H * D], w_o, backend=backend)  # a strided view of the one before
    graph.replay()
    torch.cuda.synchronize()
    ref_y, ref_h = R.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(h, ref_h)
    assert_close(y, ref_y, torch.bfloat16)
    assert_close(out, R.rope_qkv(qkv, cos, sin, H, Hkv), torch.bfloat16)
    assert_close(proj.float(), R.decode_linear(y.double(), w_qkv.double()).float(), torch.bfloat16)
    assert_close(proj_o.float(), R.decode_linear(proj[:, : H * D].double(), w_o.double()).float(), torch.bfloat16)
    assert torch.equal(proj, decode_linear(y, w_qkv, backend=backend))  # graph replay = eager, bit for bit
    assert torch.equal(proj_o, decode_linear(proj[:, : H * D], w_o, backend=backend))


@needs_cuda
@pytest.mark.parametrize("B", [1, 2, 3, 4, 16])  # the decode batches; 16: four passes over the weight
def test_gpu_decode_gemv_llama_shapes(B):
    gen = torch.Generator(device="cuda").manual_seed(B)
    for N, K in ((6144, 4096), (4096, 4096), (448, 4096)):  # q/k/v, output, a router's
        x = torch.randn(B, K, device="cuda", generator=gen).bfloat16()
        w = (torch.randn(N, K, device="cuda", generator=gen) / K**0.5).bfloat16()
        y = torch.ops.prunepath.decode_gemv(x, w, True)
        assert_close(y.float(), R.decode_linear(x.double(), w.double()).float(), torch.bfloat16)
        for _ in range(3):
            assert torch.equal(torch.ops.prunepath.decode_gemv(x, w, True), y)  # bitwise, run to run
        assert torch.equal(torch.ops.prunepath.decode_gemv(x, w, False), y)  # PDL changes no bits
