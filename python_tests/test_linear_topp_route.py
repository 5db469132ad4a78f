"""linear_topp_route: the fused router projection + top-p routing against its composition.

The routing half is held to bit-identity with ``topp_route`` on the op's own logits (same rank
kernel code on CUDA) and to the reference (SPEC.md section 3); the projection half to
``F.linear`` within the dtype's tolerance (exactly on the CPU, where the op is that composition).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prunepath_ops
from prunepath_ops import reference
from prunepath_ops.testing import DEVICES, TOLERANCES, assert_close, assert_route_matches_reference

GATES = reference.GATE_MODES
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(T: int, E: int, d: int, dtype, device, seed: int = 0, x_scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, d, generator=gen) * x_scale).to(dtype=dtype, device=device)
    w = (torch.randn(E, d, generator=gen) * (2.0 / max(d, 1) ** 0.5)).to(dtype=dtype, device=device)
    return x, w


def _check(x, w, tau, *, min_experts=1, max_experts=None, gate="sigmoid", tickets=None, pdl=None):
    """Run the op; check logits against F.linear and the routing against topp_route on those logits."""
    logits, route = prunepath_ops.linear_topp_route(
        x, w, tau, min_experts=min_experts, max_experts=max_experts, gate=gate, tickets=tickets, pdl=pdl
    )
    assert logits.shape == (x.shape[0], w.shape[0]) and logits.dtype == x.dtype
    if x.device.type == "cpu":  # the CPU op is this composition: exact, NaN/inf rows included
        torch.testing.assert_close(logits, F.linear(x, w), atol=0.0, rtol=0.0, equal_nan=True)
    else:
        # Against the exact (fp64) product: the kernel rounds an fp32 sum once. Not against cuBLAS's
        # half-precision output, which may itself be a reduced-precision reduction (torch's default
        # for fp16/bf16), so the two can differ by more than the dtype's tolerance near zero.
        atol, rtol = TOLERANCES[x.dtype]
        exact = F.linear(x.double(), w.double())
        torch.testing.assert_close(logits.double(), exact, atol=atol, rtol=rtol, equal_nan=True)
    again = prunepath_ops.topp_route(logits, tau, min_experts=min_experts, max_experts=max_experts, gate=gate)
    for got, want in zip(route, again, strict=True):
        assert torch.equal(got, want), "routing differs from topp_route on the op's own logits"
    assert_route_matches_reference(
        route, logits.float(), tau, min_experts=min_experts, max_experts=max_experts, gate=gate
    )
    return logits, route


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "T, E, d",
    [
        (0, 8, 64),  # empty batch: nothing launched, outputs still shaped
        (1, 1, 16),  # one expert: always kept, one block per token
        (1, 48, 576),  # SmolLM2-135M router, batch 1
        (3, 33, 40),  # E one past a warp; d a multiple of 8 but not of a warp's 256-element stride
        (2, 100, 37),  # d odd: the scalar (non-vector) path on CUDA
        (16, 448, 256),  # Llama-3-8B expert count, the largest decode batch
        (5, 1024, 96),  # largest E the CUDA kernel takes (a block of 32 warps)
        (1, 448, 4096),  # Llama-3-8B router at batch 1 (the decode case it exists for)
    ],
)
@pytest.mark.parametrize("tau", [0.0, 0.3, 0.85, 1.05])
def test_matches_composition(device, dtype, T, E, d, tau):
    if device == "cpu" and T * E * d > 1 << 21 and dtype != torch.float32:
        pytest.skip("large half-precision CPU matmuls are slow and add nothing over float32")
    x, w = _inputs(T, E, d, dtype, device, seed=T * 31 + E + d)
    for gate in GATES:
        _check(x, w, tau, gate=gate)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "tau_kind",
    [
        "per_token",  # a [T] tensor: each token its own budget (NaN: min_experts)
        "broadcast",  # a one-element tensor, as PrunePathMLP keeps it
    ],
)
def test_tau_tensor_and_bounds(device, tau_kind):
    x, w = _inputs(6, 40, 64, torch.float32, device, seed=3)
    if tau_kind == "per_token":
        tau = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0, float("nan")], device=device)
    else:
        tau = torch.tensor([0.6], device=device)
    for min_experts, max_experts in [(1, None), (0, 5), (3, 7), (40, 40)]:
        _check(x, w, tau, min_experts=min_experts, max_experts=max_experts, gate="renorm")


@pytest.mark.parametrize("device", DEVICES)
def test_strided_and_misaligned_x(device):
    # A row-strided view (a slice of a wider buffer) is read in place; an offset of one element
    # breaks 16-byte alignment, which the CUDA glue must notice (scalar path), not misread.
    base, w = _inputs(4, 24, 130, torch.bfloat16, device, seed=5)
    w = w[:, :128].contiguous()
    for x in (base[:, :128], base[:, 1:129], base[:, 2:]):
        _check(x, w, 0.7)


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_inputs(device):
    # NaN/inf in x become NaN/inf logits (documented), which topp_route defines: NaN counts as
    # -inf (an all-NaN row is uniform), +inf entries share the mass.
    x, w = _inputs(3, 12, 32, torch.float32, device, seed=6)
    x[0] = float("nan")
    x[1, 0] = float("inf")
    logits, route = _check(x, w, 0.5)
    assert torch.isnan(logits[0]).all() and torch.isinf(logits[1]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_tickets_are_left_zero(device):
    # The caller's counters must come back zero after every call, whatever T (they are reused
    # by the next call, and by the next replay of a captured graph).
    tickets = torch.zeros(16, dtype=torch.int32, device=device)
    for T in (1, 16, 3, 0, 7):
        x, w = _inputs(T, 200, 64, torch.float16, device, seed=T)
        _check(x, w, 0.6, tickets=tickets)
        assert not tickets.any(), tickets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, w, c: (x[0], w, c), ValueError, "x must be 2-D"),  # rank
        (lambda x, w, c: (x.int(), w, c), TypeError, "x must be float32"),  # dtype of x
        (lambda x, w, c: (x, w.half(), c), TypeError, "weight must have the dtype of x"),
        (lambda x, w, c: (x, w[:, :-1], c), ValueError, r"weight must be \[E, d\] with d = 32"),
        (lambda x, w, c: (x, w.t().contiguous().t(), c), ValueError, "weight must be contiguous"),
        (lambda x, w, c: (x.t().contiguous().t(), w, c), ValueError, "unit inner stride"),
        (lambda x, w, c: (x, w, c.long()), TypeError, "tickets must be int32"),
        (lambda x, w, c: (x, w, c[:2]), ValueError, "at least T = 4 zeros"),  # too few counters
    ],
)
def test_bad_input(device, call, error, match):
    x, w = _inputs(4, 10, 32, torch.float32, device)
    tickets = torch.zeros(8, dtype=torch.int32, device=device)
    args = call(x, w, tickets)
    with pytest.raises(error, match=match):
        prunepath_ops.linear_topp_route(args[0], args[1], 0.5, tickets=args[2])
    with pytest.raises(error, match=match):  # the op itself, without the Python checks
        torch.ops.prunepath.linear_topp_route(args[0], args[1], 0.5, None, 1, None, "sigmoid", args[2], False)
    assert not tickets.any()


@pytest.mark.parametrize("device", DEVICES)
def test_bad_routing_arguments(device):
    x, w = _inputs(2, 10, 32, torch.float32, device)
    with pytest.raises(ValueError, match="tau must be a number"):
        prunepath_ops.linear_topp_route(x, w, float("nan"))
    with pytest.raises(ValueError, match="max_experts must lie in"):
        prunepath_ops.linear_topp_route(x, w, 0.5, max_experts=11)
    with pytest.raises(ValueError, match="gate must be one of"):
        prunepath_ops.linear_topp_route(x, w, 0.5, gate="softmax")
    with pytest.raises(ValueError, match="tau tensor must have shape"):
        prunepath_ops.linear_topp_route(x, w, torch.zeros(3, device=device))


@CUDA_ONLY
def test_gpu_device_mismatch_and_expert_limit():
    x, w = _inputs(2, 10, 32, torch.float32, "cuda")
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        prunepath_ops.linear_topp_route(x, w.cpu(), 0.5)
    with pytest.raises(ValueError, match="tickets is on cpu"):
        prunepath_ops.linear_topp_route(x, w, 0.5, tickets=torch.zeros(4, dtype=torch.int32))
    big_x, big_w = _inputs(1, 1025, 32, torch.float32, "cuda")  # one past the one-block routing
    for fn in (
        lambda: prunepath_ops.linear_topp_route(big_x, big_w, 0.5),
        lambda: torch.ops.prunepath.linear_topp_route(big_x, big_w, 0.5, None, 1, None, "one", None, False),
    ):
        with pytest.raises(ValueError, match="handles 1 <= E <= 1024"):
            fn()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(0, 17),
    E=st.integers(1, 1024),
    d=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    tau=st.floats(-0.1, 1.1),
    gate=st.sampled_from(GATES),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes(T, E, d, dtype, tau, gate, seed):
    # Any decode batch, expert count the CUDA kernel takes, hidden size (vector or scalar path).
    for device in DEVICES:
        x, w = _inputs(T, E, d, dtype, device, seed=seed)
        _check(x, w, tau, gate=gate)


def _opcheck_cases(device):
    x, w = _inputs(5, 12, 40, torch.float32, device, seed=1)
    tickets = torch.zeros(8, dtype=torch.int32, device=device)
    yield (x, w, 0.5, None, 1, None, "sigmoid", None, False)
    yield (x.bfloat16(), w.bfloat16(), 0.9, None, 0, 4, "renorm", tickets, False)
    yield (x.half(), w.half(), 0.0, torch.linspace(0, 1, 5, device=device), 2, 6, "one", tickets, True)
    yield (x[:0], w, 0.5, None, 1, None, "prob", None, False)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in _opcheck_cases(device):
        torch.library.opcheck(torch.ops.prunepath.linear_topp_route.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x, w = _inputs(3, 48, 64, torch.bfloat16, device, seed=9)
    tau = torch.tensor([0.7], device=device)
    tickets = torch.zeros(4, dtype=torch.int32, device=device)

    def route(x, w, tau):
        logits, r = prunepath_ops.linear_topp_route(x, w, tau, gate="prob", tickets=tickets)
        return logits, r.expert_ids, r.gates, r.num_active

    eager = route(x, w, tau)
    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")(x, w, tau)
    for a, b in zip(compiled, eager, strict=True):
        assert torch.equal(a, b)
    assert not tickets.any()


@CUDA_ONLY
@pytest.mark.parametrize("pdl", [False, True])
def test_gpu_bitwise_deterministic(pdl):
    # Fixed summation order and routing: the same bits on every call, with or without PDL.
    x, w = _inputs(16, 448, 4096, torch.bfloat16, "cuda", seed=11)
    tickets = torch.zeros(16, dtype=torch.int32, device="cuda")
    first = prunepath_ops.linear_topp_route(x, w, 0.3, tickets=tickets, pdl=pdl)
    for _ in range(20):
        again = prunepath_ops.linear_topp_route(x, w, 0.3, tickets=tickets, pdl=pdl)
        assert torch.equal(again[0], first[0])
        for a, b in zip(again[1], first[1], strict=True):
            assert torch.equal(a, b)
    other = prunepath_ops.linear_topp_route(x, w, 0.3, tickets=tickets, pdl=not pdl)
    assert torch.equal(other[0], first[0]) and all(torch.equal(a, b) for a, b in zip(other[1], first[1], strict=True))


@CUDA_ONLY
def test_gpu_graph_capture_and_replay():
    # Captured once, replayed with new x and a new tau written into the same tensors.
    T, E, d = 4, 448, 4096
    x, w = _inputs(T, E, d, torch.bfloat16, "cuda", seed=12)
    tau = torch.tensor([0.3], device="cuda")
    tickets = torch.zeros(16, dtype=torch.int32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        prunepath_ops.linear_topp_route(x, w, tau, tickets=tickets)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits, route = prunepath_ops.linear_topp_route(x, w, tau, tickets=tickets)
    for seed, value in [(13, 0.3), (14, 0.6), (15, 1.05)]:
        x.copy_(_inputs(T, E, d, torch.bfloat16, "cuda", seed=seed)[0])
        tau.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        eager_logits, eager_route = prunepath_ops.linear_topp_route(x, w, value)
        assert torch.equal(logits, eager_logits)
        for a, b in zip(route, eager_route, strict=True):
            assert torch.equal(a, b)
        assert not tickets.any()


@CUDA_ONLY
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_mlp_fused_router(dtype):
    # PrunePathMLP takes the fused router for one token on CUDA: same output as the module
    # call + topp_route (when the two logits agree, the routes agree bit for bit), and a forward
    # hook on the router turns it off (the hook must see the call).
    from prunepath_ops.models import LlamaMLP

    torch.manual_seed(0)
    dense = LlamaMLP(256, 1024).to("cuda", dtype)
    mlp = prunepath_ops.PrunePathMLP.from_dense(dense, 32, tau=0.5, router_weight=torch.randn(32, 256) / 16)
    mlp = mlp.to("cuda", dtype)
    x = torch.randn(1, 256, device="cuda", dtype=dtype)  # batch-1 decode: the fused router's case
    assert mlp._use_fused_router(x) and not mlp._use_fused_router(torch.randn(2, 256, device="cuda", dtype=dtype))
    assert not mlp._use_fused_router(x.cpu())
    fused = mlp(x)
    logits, route = prunepath_ops.linear_topp_route(x, mlp.router.weight, mlp.tau_tensor)
    expected = prunepath_ops.sparse_ffn(x, route, mlp.packed)
    assert torch.equal(fused, expected)
    mlp.fused_router = False
    unfused = mlp(x)
    assert_close(unfused.float(), fused.float(), dtype=dtype)
    mlp.fused_router = True
    seen = []
    handle = mlp.router.register_forward_hook(lambda m, i, o: seen.append(o))
    mlp(x)
    handle.remove()
    assert len(seen) == 1
