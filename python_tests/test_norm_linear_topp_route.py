"""norm_linear_topp_route: add_rms_norm in front of linear_topp_route, against its composition.

On the CPU the op is the composition of the references (``h`` and ``y`` exact). On CUDA the norm
is recomputed by every router block: ``h`` must be exact, ``y`` within a rounding of
``add_rms_norm``'s (another summation order of the mean square). Everywhere the logits and routing
are those of the op's own ``y``, bit-identical to ``linear_topp_route(y)``.
"""

from __future__ import annotations

import pytest
import torch

import prunepath_ops
from prunepath_ops import reference
from prunepath_ops.testing import DEVICES, assert_close

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(T: int, E: int, d: int, dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=gen).to(dtype=dtype, device=device)
    r = torch.randn(T, d, generator=gen).to(dtype=dtype, device=device)
    nw = (0.5 + torch.rand(d, generator=gen)).to(dtype=dtype, device=device)
    w = (torch.randn(E, d, generator=gen) * (2.0 / max(d, 1) ** 0.5)).to(dtype=dtype, device=device)
    return x, r, nw, w


def _check(x, r, nw, w, tau, *, eps=1e-5, **kw):
    y, h, logits, route = prunepath_ops.norm_linear_topp_route(x, r, nw, w, tau, eps=eps, **kw)
    ref_kw = {k: v for k, v in kw.items() if k not in ("tickets", "pdl")}  # kernel-only arguments
    ref = reference.norm_linear_topp_route(x, r, nw, w, tau, eps=eps, **ref_kw)
    T, d = x.shape
    assert y.shape == h.shape == (T, d) and y.dtype == h.dtype == x.dtype
    torch.testing.assert_close(h, ref[1], atol=0.0, rtol=0.0, equal_nan=True)  # the add in the dtype: exact
    if x.device.type == "cpu":  # the CPU op is the composition of the references
        torch.testing.assert_close(y, ref[0], atol=0.0, rtol=0.0, equal_nan=True)
    else:
        assert_close(y.float(), ref[0].float(), dtype=x.dtype, equal_nan=True)  # a NaN row stays NaN
    # The logits and routing are linear_topp_route's of the op's own y, bit for bit (that op is
    # held to F.linear and the routing reference in test_linear_topp_route.py). Not the
    # reference's logits on the CPU either: a half-precision CPU matmul may round differently
    # for another allocation of the same values.
    again_logits, again = prunepath_ops.linear_topp_route(y, w, tau, **kw)
    torch.testing.assert_close(logits, again_logits, atol=0.0, rtol=0.0, equal_nan=True)
    for a, b in zip(route, again, strict=True):
        assert torch.equal(a, b)
    return y, h, logits, route


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "T, E, d, residual",
    [
        (1, 48, 576, True),  # SmolLM2's router at batch 1, the decode case
        (1, 448, 4096, True),  # Llama-3-8B's
        (3, 7, 40, True),  # d not a multiple of the 16-byte vector: the element path
        (2, 17, 64, False),  # no residual: h = x
        (0, 12, 32, True),  # no tokens
    ],
)
def test_matches_composition(device, dtype, T, E, d, residual):
    x, r, nw, w = _inputs(T, E, d, dtype, device, seed=T + E)
    _check(x, r if residual else None, nw, w, 0.6, gate="prob")


@pytest.mark.parametrize("device", DEVICES)
def test_tau_tensor_bounds_and_eps(device):
    x, r, nw, w = _inputs(4, 24, 64, torch.float32, device, seed=3)
    _check(x, r, nw, w, torch.tensor([0.2, 0.5, 0.9, 1.2], device=device), min_experts=2, max_experts=8, gate="renorm")
    _check(x, r, nw, w, 0.5, eps=0.0)  # eps 0: the plain mean square
    _check(x, r, nw, w, 0.5, eps=10.0)  # a large eps shrinks y: flatter logits


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_rows_stay_in_their_row(device):
    # A NaN in row 0 of h makes row 0 of y and of the logits NaN (routed as topp_route documents
    # an all-NaN row; _check compares with it); row 1 is untouched.
    x, r, nw, w = _inputs(2, 16, 32, torch.float32, device, seed=4)
    x[0, 5] = float("nan")
    y, h, logits, route = _check(x, r, nw, w, 0.7)
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1]).any()
    assert torch.isnan(logits[0]).all() and not torch.isnan(logits[1]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_tickets_are_left_zero(device):
    x, r, nw, w = _inputs(3, 32, 64, torch.bfloat16, device, seed=5)
    tickets = torch.zeros(4, dtype=torch.int32, device=device)
    _check(x, r, nw, w, 0.5, tickets=tickets)
    assert not tickets.any()


def _bad_calls(device):
    x, r, nw, w = _inputs(2, 8, 16, torch.float32, device, seed=6)
    call = prunepath_ops.norm_linear_topp_route
    return [
        # (call, error, match), each named by the argument it breaks
        (lambda: call(x, r[:1], nw, w, 0.5), ValueError, "residual must have the shape of x"),
        (lambda: call(x, r.half(), nw, w, 0.5), TypeError, "residual must have the dtype of x"),
        (lambda: call(x, r.t().contiguous().t(), nw, w, 0.5), ValueError, "residual must be contiguous"),
        (lambda: call(torch.randn(2, 32, device=device)[:, :16], r, nw, w, 0.5), ValueError, "x must be contiguous"),
        (lambda: call(x, r, nw[:8], w, 0.5), ValueError, "norm_weight must be \\[d\\]"),
        (lambda: call(x, r, nw.half(), w, 0.5), TypeError, "norm_weight must have the dtype of x"),
        (lambda: call(x, r, nw, w, 0.5, eps=-1.0), ValueError, "eps must be finite and >= 0"),
        (lambda: call(x, r, nw, w, 0.5, eps=float("nan")), ValueError, "eps must be finite and >= 0"),
        (lambda: call(x, r, nw, w, 0.5, eps=float("inf")), ValueError, "eps must be finite and >= 0"),
        (lambda: call(x, r, nw, w[:, :8], 0.5), ValueError, "weight must be \\[E, d\\]"),
        (lambda: call(x, r, nw, w, 0.5, gate="softmax"), ValueError, "gate"),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    # The Python checks and the C++ glue's (called directly) name the same argument.
    for fn, error, match in _bad_calls(device):
        with pytest.raises(error, match=match):
            fn()
    x, r, nw, w = _inputs(2, 8, 16, torch.float32, device, seed=6)
    op = torch.ops.prunepath.norm_linear_topp_route
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        op(x, r[:1], nw, 1e-5, w, 0.5, None, 1, None, "sigmoid", None, False)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        op(x, r, nw, -1.0, w, 0.5, None, 1, None, "sigmoid", None, False)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, r, nw, w = _inputs(3, 12, 40, torch.float32, device, seed=7)
    tickets = torch.zeros(4, dtype=torch.int32, device=device)
    cases = [
        (x, r, nw, 1e-5, w, 0.5, None, 1, None, "sigmoid", None, False),
        (x.bfloat16(), None, nw.bfloat16(), 1e-6, w.bfloat16(), 0.9, None, 0, 4, "renorm", tickets, False),
        (x.half(), r.half(), nw.half(), 1e-5, w.half(), 0.0, torch.linspace(0, 1, 3, device=device), 2, 6, "one",
         tickets, True),
        (x[:0], r[:0], nw, 1e-5, w, 0.5, None, 1, None, "prob", None, False),
    ]  # fmt: skip
    for args in cases:
        torch.library.opcheck(torch.ops.prunepath.norm_linear_topp_route.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x, r, nw, w = _inputs(2, 48, 64, torch.bfloat16, device, seed=8)
    tau = torch.tensor([0.7], device=device)

    def step(x, r, tau):
        y, h, logits, route = prunepath_ops.norm_linear_topp_route(x, r, nw, w, tau, gate="prob")
        return y, h, logits, route.expert_ids, route.gates, route.num_active

    eager = step(x, r, tau)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, r, tau)
    for a, b in zip(compiled, eager, strict=True):
        assert torch.equal(a, b)


@CUDA_ONLY
@pytest.mark.parametrize("pdl", [False, True])
def test_gpu_bitwise_deterministic_and_blocks_agree(pdl):
    # Every router block recomputes the norm: the routing is that of the y the op returns (checked
    # in _check), the same bits on every call, with or without PDL.
    x, r, nw, w = _inputs(1, 448, 4096, torch.bfloat16, "cuda", seed=9)
    first = _check(x, r, nw, w, 0.3, pdl=pdl)
    for _ in range(10):
        again = prunepath_ops.norm_linear_topp_route(x, r, nw, w, 0.3, pdl=pdl)
        assert all(torch.equal(a, b) for a, b in zip(again[:3], first[:3], strict=True))
        assert all(torch.equal(a, b) for a, b in zip(again[3], first[3], strict=True))


@CUDA_ONLY
def test_gpu_misaligned_rows():
    # A norm weight starting 2 bytes past an aligned address (the norm reads its inputs an element
    # at a time either way), then an x that does (the kernel's element loop): same results.
    x, r, nw, w = _inputs(1, 64, 129, torch.bfloat16, "cuda", seed=10)
    _check(x[:, 1:].contiguous(), r[:, 1:].contiguous(), nw[1:], w[:, 1:].contiguous(), 0.5)
    buf = torch.randn(1, 4097, device="cuda").bfloat16()
    xs = buf[:, 1:]  # contiguous, but its data starts 2 bytes past an aligned address
    _, r2, nw2, w2 = _inputs(1, 64, 4096, torch.bfloat16, "cuda", seed=11)
    _check(xs, r2, nw2, w2, 0.5)


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_mlp_forward_after_norm(device):
    # PrunePathMLP.forward_after_norm = add_rms_norm, then the module; on CUDA at batch 1 through
    # the fused op (one token: the fused router's case), elsewhere the composition itself.
    from prunepath_ops.decode_step import add_rms_norm
    from prunepath_ops.models import LlamaMLP

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dense = LlamaMLP(256, 1024).to(device, dtype)
    mlp = prunepath_ops.PrunePathMLP.from_dense(dense, 32, tau=0.5, router_weight=torch.randn(32, 256) / 16)
    mlp = mlp.to(device, dtype)
    x, r = (torch.randn(1, 256, device=device, dtype=dtype) for _ in range(2))
    nw = (0.5 + torch.rand(256, device=device)).to(dtype)
    assert mlp._use_fused_router(x) == (device == "cuda")
    out, h = mlp.forward_after_norm(x, r, nw, 1e-5)
    y_ref, h_ref = add_rms_norm(x, r, nw, 1e-5)
    assert torch.equal(h, h_ref)
    if device == "cpu":
        assert torch.equal(out, mlp(y_ref))
    else:
        y, _, _, route = prunepath_ops.norm_linear_topp_route(
            x, r, nw, mlp.router.weight, mlp.tau_tensor, min_experts=mlp.min_experts, max_experts=mlp.max_experts,
            gate=mlp.gate,
        )  # fmt: skip
        assert torch.equal(out, prunepath_ops.sparse_ffn(y, route, mlp.packed))  # the fused path was taken
        assert_close(out.float(), mlp(y_ref).float(), dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_llama_decode_step_with_router_norm(device):
    # Llama.fused_router_norm: the same decode step up to the norm's last bit (exactly on the CPU,
    # where the FFN norm is add_rms_norm either way).
    from prunepath_ops.models import LlamaConfig, to_prunepath
    from prunepath_ops.testing import random_llama

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = LlamaConfig.tiny()
    model = random_llama(cfg, dtype=dtype, device=device)
    to_prunepath(model, expert_width=16, tau=0.8, gate="sigmoid")
    gen = torch.Generator().manual_seed(0)
    for m in model.ffns():
        m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=gen))
    model.to(device)
    tokens = torch.randint(0, cfg.vocab, (1, 6), generator=torch.Generator().manual_seed(1)).to(device)
    outs = {}
    for fused in (False, True):
        model.fused_router_norm = fused
        model.setup_cache(1, 16)
        model(tokens, 0)  # prefill: the same cache for both
        outs[fused] = [
            model.decode_step(tokens[:, t], torch.tensor([5 + t], dtype=torch.int32, device=device), attn="kernel")
            for t in range(1, 4)
        ]
    for step, (a, b) in enumerate(zip(outs[False], outs[True], strict=True)):
        if device == "cpu":
            assert torch.equal(a, b), f"step {step}"
        else:
            assert_close(b.float(), a.float(), dtype=dtype, msg=f"step {step}")
