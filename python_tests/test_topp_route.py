"""topp_route: kernels against the reference (SPEC.md section 3), edge cases, registration."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prunepath_ops
from prunepath_ops import reference
from prunepath_ops.testing import DEVICES, assert_route_matches_reference, random_logits

GATES = reference.GATE_MODES
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "T, E",
    [
        (0, 8),  # empty batch: nothing to launch, outputs still shaped [0, K]
        (1, 1),  # single expert: always kept
        (3, 2),  # two experts
        (7, 48),  # SmolLM2-135M expert count, odd T
        (33, 64),  # exactly fills the smallest CUDA block shape
        (65, 448),  # Llama-3-8B expert count
        (5, 1000),  # E not a power of two, just under a block shape boundary
        (4, 1024),  # largest E named by the issue
        (2, 1025),  # one past a block shape boundary
        (3, 4096),  # largest E the CUDA kernel takes
    ],
)
@pytest.mark.parametrize("tau", [-0.5, 0.0, 0.3, 0.85, 1.0, 1.05])
def test_matches_reference(device, dtype, T, E, tau):
    logits = random_logits(T, E, dtype, device, seed=T * 7919 + E)
    for gate in GATES:
        route = prunepath_ops.topp_route(logits, tau, gate=gate)
        seen = assert_route_matches_reference(route, logits, tau, gate=gate)
        assert seen.near_tau_rows <= max(1, T // 20), seen


@pytest.mark.parametrize("device", DEVICES)
def test_spec_example_strict_threshold(device):
    # SPEC.md: sorted p = [0.5, 0.3, 0.2], tau = 0.85 -> c = [0.5, 0.8, 1.0] -> n = 2.
    logits = torch.tensor([[math.log(0.2), math.log(0.5), math.log(0.3)]], device=device)
    route = prunepath_ops.topp_route(logits, 0.85, gate="prob")
    assert route.expert_ids.tolist() == [[1, 2, -1]]
    assert route.num_active.tolist() == [2]
    torch.testing.assert_close(route.gates.cpu(), torch.tensor([[0.5, 0.3, 0.0]]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "tau, expected_n",
    [
        (0.25, 1),  # c_0 == tau exactly: strict '<' keeps nothing, min_experts keeps 1
        (0.5, 1),  # c_1 == tau exactly: the expert reaching tau is NOT kept
        (0.5000001, 2),  # just above c_1
        (0.75, 2),
        (0.9999999, 3),  # below 1: c_3 = 1.0 is not < tau, but c_2 = 0.75 is
        (1.0, 4),  # tau >= 1 keeps every expert
    ],
)
def test_equal_logits_exact_sums(device, tau, expected_n):
    # Four equal logits: p = 0.25 exactly, c = [0.25, 0.5, 0.75, 1.0] exactly, ties in index order.
    logits = torch.zeros(1, 4, device=device)
    route = prunepath_ops.topp_route(logits, tau, gate="one")
    assert route.num_active.tolist() == [expected_n]
    assert route.expert_ids.tolist() == [[i if i < expected_n else -1 for i in range(4)]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype, row, tau, expected",
    [
        # -0 and +0 are equal logits: four equal probabilities, index order (found by fuzzing on the H200)
        (torch.float16, [-0.0, 0.0, 0.0, 0.0, -1.0, -2.0], 0.4784, [0, 1]),
        (torch.bfloat16, [0.0, -0.0, -0.0, 0.0], 0.6, [0, 1]),
        # different bf16 logits (subnormals) whose fp32 probabilities are equal: the tie goes to the
        # lower index even though expert 1 has the largest logit and expert 0 the smallest
        (torch.bfloat16, [0.0, 1.8e-40, 9.2e-41], 0.34, [0]),
        (torch.bfloat16, [0.0, 1.8e-40, 9.2e-41], 0.67, [0, 1]),
    ],
)
def test_ties_follow_probability_not_logit_bits(device, dtype, row, tau, expected):
    logits = torch.tensor([row], dtype=dtype, device=device)
    route = prunepath_ops.topp_route(logits, tau)
    assert route.expert_ids[0, : len(expected)].tolist() == expected
    assert route.num_active.tolist() == [len(expected)]
    assert_route_matches_reference(route, logits, tau)


@pytest.mark.parametrize("device", DEVICES)
def test_min_max_clamps(device):
    logits = random_logits(16, 32, torch.float32, device, seed=3)
    # tau <= 0 keeps exactly min_experts, including zero of them.
    assert prunepath_ops.topp_route(logits, 0.0, min_experts=0).num_active.eq(0).all()
    assert prunepath_ops.topp_route(logits, -1.0, min_experts=3).num_active.eq(3).all()
    # tau >= 1 keeps everything, up to the cap, which also sets K.
    capped = prunepath_ops.topp_route(logits, 1.05, max_experts=5)
    assert capped.expert_ids.shape == (16, 5) and capped.num_active.eq(5).all()
    full = prunepath_ops.topp_route(logits, 1.05)
    assert torch.equal(capped.expert_ids, full.expert_ids[:, :5])
    # min_experts raises n above the threshold's choice; zero experts means all padding.
    lifted = prunepath_ops.topp_route(logits, 0.01, min_experts=7)
    assert lifted.num_active.eq(7).all()
    empty = prunepath_ops.topp_route(logits, 0.0, min_experts=0)
    assert empty.expert_ids.eq(-1).all() and empty.gates.eq(0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_rows(device, dtype):
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor(
        [
            [nan, nan, nan, nan],  # all NaN: uniform, experts in index order
            [-inf, -inf, -inf, -inf],  # all -inf: the same as all NaN
            [1.0, nan, 0.5, nan],  # NaN counts as -inf
            [1.0, -inf, 0.5, -inf],  # ... so this row routes exactly like the one above
            [inf, 0.0, inf, 1.0],  # +inf entries share the mass evenly
            [1e30 if dtype != torch.float16 else 6e4, 0.0, -3.0, 2.0],  # large magnitude: no overflow
        ],
        dtype=dtype,
        device=device,
    )
    for gate in GATES:
        route = prunepath_ops.topp_route(logits, 0.6, gate=gate)
        assert_route_matches_reference(route, logits, 0.6, gate=gate)
        ids, gates, n = (x.cpu() for x in route)
        assert n[:2].tolist() == [2, 2]  # c = 0.25, 0.5 < 0.6, then 0.75
        assert ids[0].tolist() == [0, 1, -1, -1] and torch.equal(ids[0], ids[1])
        assert torch.equal(ids[2], ids[3]) and torch.equal(gates[2], gates[3])
        assert ids[4].tolist()[:1] == [0] and n[4].item() == 1  # c = 0.5, 1.0
        assert torch.isfinite(gates).all()
        if gate == "sigmoid":
            assert gates[0, :3].eq(0).all()  # sigmoid(-inf) = 0: the uniform fallback does not invent gates
            assert gates[4, 0].item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_tau_tensor_per_token_and_broadcast(device):
    logits = random_logits(6, 40, torch.bfloat16, device, seed=11)
    taus = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0, float("nan")], device=device)
    route = prunepath_ops.topp_route(logits, taus, min_experts=2)
    assert_route_matches_reference(route, logits, taus, min_experts=2)
    assert route.num_active[0].item() == 2 and route.num_active[4].item() == 40
    assert route.num_active[5].item() == 2  # a NaN budget keeps min_experts
    for shape in ((), (1,)):
        one = torch.full(shape, 0.7, device=device)
        assert torch.equal(
            prunepath_ops.topp_route(logits, one).expert_ids, prunepath_ops.topp_route(logits, 0.7).expert_ids
        )


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    wide = random_logits(9, 70, torch.float32, device, seed=5)
    row_view = wide[:, 3:51]  # unit inner stride, row stride 70: read in place
    col_major = wide[:, :48].t().contiguous().t()  # inner stride != 1: copied once
    for view in (row_view, col_major):
        assert not view.is_contiguous()
        route = prunepath_ops.topp_route(view, 0.8)
        expected = prunepath_ops.topp_route(view.contiguous(), 0.8)
        for a, b in zip(route, expected, strict=True):
            assert torch.equal(a, b)
    taus = torch.linspace(0.1, 0.9, 18, device=device)[::2]  # strided tau tensor
    assert torch.equal(
        prunepath_ops.topp_route(row_view, taus).num_active,
        prunepath_ops.topp_route(row_view, taus.contiguous()).num_active,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_bits(device):
    logits = random_logits(513, 448, torch.bfloat16, device, seed=9)
    first = prunepath_ops.topp_route(logits, 0.7, gate="renorm")
    for _ in range(3):
        again = prunepath_ops.topp_route(logits, 0.7, gate="renorm")
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


BAD_INPUTS = [
    # (logits shape, dtype, kwargs, error type, message fragment)
    ((4,), torch.float32, {}, ValueError, "2-D"),  # wrong rank
    ((2, 3, 4), torch.float32, {}, ValueError, "2-D"),  # wrong rank
    ((4, 8), torch.int32, {}, TypeError, "float32, float16 or bfloat16"),  # integer logits
    ((4, 8), torch.float64, {}, TypeError, "float32, float16 or bfloat16"),  # double logits
    ((4, 0), torch.float32, {}, ValueError, "E >= 1"),  # no experts
    ((4, 8), torch.float32, {"max_experts": 0}, ValueError, "max_experts"),  # cap below 1
    ((4, 8), torch.float32, {"max_experts": 9}, ValueError, "max_experts"),  # cap above E
    ((4, 8), torch.float32, {"min_experts": -1}, ValueError, "min_experts"),  # negative floor
    ((4, 8), torch.float32, {"min_experts": 4, "max_experts": 3}, ValueError, "min_experts"),  # floor above cap
    ((4, 8), torch.float32, {"gate": "softmax"}, ValueError, "gate"),  # unknown gate mode
    ((4, 8), torch.float32, {"tau": float("nan")}, ValueError, "NaN"),  # NaN scalar tau
    ((4, 8), torch.float32, {"tau": "0.5"}, TypeError, "tau"),  # tau of the wrong type
    ((4, 8), torch.float32, {"tau": torch.ones(3)}, ValueError, r"\[T\]"),  # tau tensor of the wrong length
    ((4, 8), torch.float32, {"tau": torch.ones(4, 1)}, ValueError, r"\[T\]"),  # tau tensor of the wrong rank
    ((4, 8), torch.float32, {"tau": torch.ones(4, dtype=torch.float64)}, TypeError, "float32"),  # tau dtype
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, dtype, kwargs, error, match", BAD_INPUTS)
def test_bad_input_is_rejected(device, shape, dtype, kwargs, error, match):
    logits = torch.zeros(shape, dtype=dtype, device=device)
    kwargs = dict(kwargs)
    tau = kwargs.pop("tau", 0.5)
    if isinstance(tau, torch.Tensor):
        tau = tau.to(device)
    with pytest.raises(error, match=match):
        prunepath_ops.topp_route(logits, tau, **kwargs)


@CUDA_ONLY
def test_tau_tensor_on_another_device():
    logits = torch.zeros(4, 8, device="cuda")
    with pytest.raises(ValueError, match="tau tensor is on"):
        prunepath_ops.topp_route(logits, torch.full((4,), 0.5))


@CUDA_ONLY
def test_cuda_expert_limit_is_explained():
    with pytest.raises(ValueError, match="E <= 4096"):
        prunepath_ops.topp_route(torch.zeros(1, 4097, device="cuda"), 0.5)


@CUDA_ONLY
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_kernel(dtype):
    logits = random_logits(2049, 448, dtype, "cuda", seed=21)
    gpu = prunepath_ops.topp_route(logits, 0.6, gate="prob")
    cpu = prunepath_ops.topp_route(logits.cpu(), 0.6, gate="prob")
    rows_differ = (gpu.expert_ids.cpu() != cpu.expert_ids).any(dim=-1)
    assert int(rows_differ.sum()) <= 2  # only rows with a cumulative sum within rounding of tau


_VARIANT_SCRIPT = """
import sys, torch, prunepath_ops
from prunepath_ops.testing import random_logits
out = []
for dtype in (torch.bfloat16, torch.float32):
    logits = random_logits(9001, 448, dtype, "cuda", seed=3)
    out.append(tuple(t.cpu() for t in prunepath_ops.topp_route(logits, 0.5)))
torch.save(out, sys.argv[1])
"""


def _route_with_kernel(name: str, folder) -> list:
    """Routes in a subprocess with PRUNEPATH_TOPP_KERNEL=name (read once per process)."""
    path = folder / f"{name}.pt"
    env = {**os.environ, "PRUNEPATH_TOPP_KERNEL": name}
    subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT, str(path)], env=env, check=True, timeout=300)
    return torch.load(path)


@pytest.fixture(scope="module")
def auto_routes(tmp_path_factory):
    return _route_with_kernel("auto", tmp_path_factory.mktemp("auto"))


@CUDA_ONLY
@pytest.mark.parametrize("variant", ["lean_prefetch", "warp", "rank"])  # the A/B kernel names against auto (lean here)
def test_cuda_kernel_variants_write_the_same_bits(variant, auto_routes, tmp_path):
    """9001 tokens of 448 experts, bf16 and fp32: large enough that lean_prefetch's L2 prefetch
    distance (3/8 of a resident wave of warps, 1,584 tokens on an H200) lies inside the batch."""
    for ref, out in zip(auto_routes, _route_with_kernel(variant, tmp_path), strict=True):
        for a, b in zip(ref, out, strict=True):
            assert torch.equal(a, b)


@CUDA_ONLY
def test_cuda_graph_capture_with_tau_tensor():
    logits = random_logits(64, 448, torch.bfloat16, "cuda", seed=4)
    tau = torch.full((1,), 0.5, device="cuda")
    prunepath_ops.topp_route(logits, tau)  # warm up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        route = prunepath_ops.topp_route(logits, tau)
    for value in (0.3, 0.9):
        tau.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(route.expert_ids, prunepath_ops.topp_route(logits, value).expert_ids)


def _opcheck_cases(device):
    logits = random_logits(5, 12, torch.float32, device, seed=1)
    yield (logits, 0.5, None, 1, None, "sigmoid")
    yield (logits.to(torch.bfloat16), 0.9, None, 0, 4, "renorm")
    yield (logits.half(), 0.0, torch.linspace(0, 1, 5, device=device), 2, 6, "one")
    yield (torch.zeros(0, 3, device=device), 0.5, None, 1, None, "sigmoid")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in _opcheck_cases(device):
        torch.library.opcheck(torch.ops.prunepath.topp_route.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_with_grad(device):
    logits = random_logits(5, 12, torch.float32, device, seed=1).requires_grad_()
    # opcheck's AOT forward+backward harness sums every output into one tensor
    # that starts as the int32 expert_ids and then cannot take the float gates
    # (a harness limitation, not an op bug); the compiled backward is covered by
    # test_torch_compile_backward below.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for gate in GATES:
        torch.library.opcheck(
            torch.ops.prunepath.topp_route.default, (logits, 0.7, None, 1, None, gate), test_utils=utils
        )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_backward(device):
    torch._dynamo.reset()

    def loss(x, w):
        return (prunepath_ops.topp_route(x, 0.8, gate="prob").gates * w).sum()

    x = random_logits(7, 16, torch.float32, device, seed=12).requires_grad_()
    w = torch.randn(7, 16, device=device)
    (eager,) = torch.autograd.grad(loss(x, w), x)
    (compiled,) = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x, w), x)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    compiled = torch.compile(prunepath_ops.topp_route, fullgraph=True)
    logits = random_logits(17, 48, torch.bfloat16, device, seed=2)
    tau = torch.full((17,), 0.6, device=device)
    for args in ((logits, tau), (logits, 0.6)):
        got = compiled(*args, gate="renorm", max_experts=20)
        expected = prunepath_ops.topp_route(*args, gate="renorm", max_experts=20)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)


class _GatesWithFormula(torch.autograd.Function):
    """Reference gates forward, the op's hand-written backward: gradcheck-able in float64."""

    @staticmethod
    def forward(ctx, logits, expert_ids, gate):
        gates = reference.topp_gates(logits, expert_ids, gate).to(logits.dtype)
        ctx.save_for_backward(logits, expert_ids, gates)
        ctx.gate = gate
        return gates

    @staticmethod
    def backward(ctx, grad):
        from prunepath_ops._registration import topp_route_backward

        logits, expert_ids, gates = ctx.saved_tensors
        return topp_route_backward(grad, logits, expert_ids, gates, ctx.gate), None, None


def _topp_gates_f64(logits, expert_ids, gate):
    # reference.topp_gates computes in fp32; a float64 twin for gradcheck.
    kept = expert_ids >= 0
    idx = expert_ids.clamp(min=0).long()
    if gate == "sigmoid":
        v = torch.sigmoid(logits.gather(1, idx))
    elif gate == "one":
        v = torch.ones_like(logits.gather(1, idx))
    else:
        v = torch.softmax(logits, -1).gather(1, idx)
        if gate == "renorm":
            v = v / (v * kept).sum(-1, keepdim=True)
    return torch.where(kept, v, torch.zeros_like(v))


@pytest.mark.parametrize("gate", GATES)
def test_backward_formula_gradcheck(gate, monkeypatch):
    logits = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    ids = prunepath_ops.topp_route(logits.detach().float(), 0.7, max_experts=8).expert_ids
    monkeypatch.setattr(reference, "topp_gates", _topp_gates_f64)
    assert torch.autograd.gradcheck(lambda x: _GatesWithFormula.apply(x, ids, gate), (logits,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", GATES)
def test_op_gradient_matches_reference_autograd(device, gate):
    logits = random_logits(9, 24, torch.float32, device, seed=8).requires_grad_()
    route = prunepath_ops.topp_route(logits, 0.8, gate=gate)
    weight = torch.randn(route.gates.shape, device=device)
    (grad,) = torch.autograd.grad((route.gates * weight).sum(), logits, allow_unused=True)
    ref_logits = logits.detach().clone().requires_grad_()
    ref_gates = reference.topp_gates(ref_logits, route.expert_ids, gate)
    if gate == "one":
        assert grad is None or grad.eq(0).all()
        return
    (ref_grad,) = torch.autograd.grad((ref_gates * weight).sum(), ref_logits)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


@st.composite
def _routing_problems(draw):
    T = draw(st.integers(0, 24))
    E = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1e-4, 1.0, 8.0, 1e3]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen) * scale
    if draw(st.booleans()):  # ties: few distinct values
        logits = logits.round() if scale >= 1 else (logits * 1e4).round()
    special = draw(st.sampled_from(["none", "-inf", "nan", "+inf", "mixed"]))
    if special != "none" and T * E:
        mask = torch.rand(T, E, generator=gen) < draw(st.sampled_from([0.05, 0.5, 1.0]))
        values = {"-inf": float("-inf"), "nan": float("nan"), "+inf": float("inf")}
        if special == "mixed":
            pick = torch.randint(0, 3, (T, E), generator=gen)
            table = torch.tensor([float("-inf"), float("nan"), float("inf")])
            logits = torch.where(mask, table[pick], logits)
        else:
            logits = logits.masked_fill(mask, values[special])
    logits = logits.to(dtype)
    if draw(st.booleans()):
        tau = draw(st.sampled_from([0.0, 0.5, 1.0, 1.05, -0.1]) | st.floats(-0.2, 1.2, allow_nan=False))
    else:
        tau = torch.rand(T, generator=gen) * 1.2 - 0.1
    K = draw(st.one_of(st.none(), st.integers(1, E)))
    min_experts = draw(st.integers(0, E if K is None else K))
    gate = draw(st.sampled_from(GATES))
    return logits, tau, min_experts, K, gate


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=_routing_problems())
def test_fuzz_against_reference(problem):
    logits, tau, min_experts, K, gate = problem
    for device in DEVICES:
        x = logits.to(device)
        t = tau.to(device) if isinstance(tau, torch.Tensor) else tau
        route = prunepath_ops.topp_route(x, t, min_experts=min_experts, max_experts=K, gate=gate)
        assert_route_matches_reference(route, x, t, min_experts=min_experts, max_experts=K, gate=gate)


def test_backends_report():
    info = prunepath_ops.backends()
    assert info["cpu"] is True
    assert info["cuda_available"] == torch.cuda.is_available()
    if torch.cuda.is_available():
        assert info["cuda"], "a GPU is visible but the CUDA kernels were not built"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.zeros(4), 0.5, None, 1, None, "sigmoid"), ValueError, r"2-D \[T, E\]; got shape \[4\]"),  # rank
        ((torch.zeros(4, 8, dtype=torch.int32), 0.5, None, 1, None, "sigmoid"), TypeError, "Int"),  # dtype
        ((torch.zeros(4, 8), 0.5, None, 1, 9, "sigmoid"), ValueError, r"\[1, E = 8\]; got 9"),  # cap
        ((torch.zeros(4, 8), 0.5, None, 5, 3, "sigmoid"), ValueError, "min_experts"),  # floor above cap
        ((torch.zeros(4, 8), 0.5, None, 1, None, "max"), ValueError, "got 'max'"),  # gate mode
        ((torch.zeros(4, 8), 0.5, torch.ones(5), 1, None, "sigmoid"), ValueError, r"\[T\] = \[4\]"),  # tau length
    ],
)
def test_cpp_checks_raise_cleanly(device, args, error, match):
    # The raw op, bypassing the Python wrapper's checks: the C++ glue must raise
    # the same kind of error (and not crash) before any kernel runs.
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(error, match=match):
        torch.ops.prunepath.topp_route(*args)
