"""Shared pieces of the ``topp_route`` benchmarks: shapes, inputs, byte counts, the correctness gate.

Used by the pytest-benchmark suite (``bench/test_bench_topp_route.py``) and by the
standalone GPU script (``bench/topp_route_gpu.py``); both put ``bench/`` on
``sys.path`` (pytest through ``bench/conftest.py``, the script because it lives here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import prunepath_ops
from prunepath_ops import reference
from prunepath_ops.reference.routing import sanitize_logits

# The grid.
T_VALUES = (1, 64, 4096, 65536)
E_VALUES = (48, 448, 1024)
# Measured device-to-device copy bandwidth of the H200 (bytes read + written per second), ENVIRONMENT.md.
H200_COPY_BW = 4.24e12
# Default threshold. The composite's cost does not depend on tau (it always sorts and scans the
# whole row); the kernel's barely does (it also sorts the whole row; tau only changes how many
# slots get a gate instead of padding). tau >= 1 keeps every expert: the most gates to compute.
TAU = 0.5
TAU_ALL = 1.05
# Shapes that are also run with TAU_ALL.
TAU_ALL_SHAPES = ((4096, 448), (65536, 448))
# Rows whose sorted cumulative sum comes this close to tau may legitimately differ by one expert.
TAU_SLACK = 1e-6

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


def make_logits(T: int, E: int, dtype: torch.dtype, device: str | torch.device, seed: int = 0) -> Tensor:
    """``[T, E]`` standard-normal router logits (drawn in fp32, then cast), reproducible per seed."""
    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + T * 4099 + E)
    return torch.randn(T, E, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def route_bytes(T: int, E: int, dtype: torch.dtype, K: int | None = None) -> int:
    """Bytes the op must move: read the logits, write ``expert_ids`` (int32) and ``gates`` (fp32)
    ``[T, K]`` and ``num_active`` (int32) ``[T]``. ``K`` defaults to ``E`` (``max_experts=None``)."""
    K = E if K is None else K
    elem = torch.empty((), dtype=dtype).element_size()
    return T * E * elem + T * K * (4 + 4) + T * 4


def op_fn(logits: Tensor, tau: float) -> Callable[[], object]:
    """The op under test, as a zero-argument callable."""
    return lambda: prunepath_ops.topp_route(logits, tau)


def composite_fn(logits: Tensor, tau: float) -> Callable[[], object]:
    """The PyTorch composite baseline (softmax, stable sort, cumsum, mask, gather, sigmoid gates)."""
    return lambda: reference.topp_route(logits, tau)


IMPLS: dict[str, Callable[[Tensor, float], Callable[[], object]]] = {
    "prunepath": op_fn,
    "reference": composite_fn,
}


@dataclass
class CheckResult:
    rows: int
    mismatched_rows: int  # rows whose expert_ids or num_active differ from the reference
    near_tau_rows: int  # rows with a sorted cumulative sum within TAU_SLACK of tau
    near_tie_rows: int  # rows with two distinct logits whose probabilities nearly tie in the kept prefix
    mean_active: float  # mean num_active of the reference

    def summary(self) -> str:
        return (
            f"{self.rows} rows, {self.mismatched_rows} differ from the reference "
            f"(allowed: {self.near_tau_rows} near tau, {self.near_tie_rows} near ties), "
            f"mean active {self.mean_active:.1f}"
        )


def check_route(logits: Tensor, tau: float, out=None, *, slack: float = TAU_SLACK) -> CheckResult:
    """Check ``prunepath_ops.topp_route`` against the reference on ``logits``; raise AssertionError if wrong.

    ``expert_ids`` and ``num_active`` must match the reference exactly, except on rows where
    the choice is numerically ambiguous (computed from the reference probabilities):

    * some inclusive cumulative sum of the sorted probabilities lies within ``slack`` of tau
      (only when tau < 1): there ``num_active`` may differ by one and the common prefix must agree;
    * two different logits whose reference probabilities differ by at most ``slack`` (relative,
      *including equal*: fp32 softmax can round logits one ulp apart to the same probability) sit
      next to each other in the kept prefix: their order may differ.

    Even there every kept slot must hold a distinct expert whose reference probability is that
    slot's sorted probability within ``slack`` (relative). The padding must be exact (-1 ids,
    0 gates after ``num_active``) and the gates must equal the reference gates of the op's own
    selection (``reference.topp_gates``) to fp32 rounding. ``out`` is the op's output when the
    caller already has it. Only the default call (``min_experts=1``, ``K = E``, sigmoid) is checked.
    """
    T, E = logits.shape
    ids, gates, n = prunepath_ops.topp_route(logits, tau) if out is None else out
    ref_ids, _, ref_n = reference.topp_route(logits, tau)
    assert ids.shape == (T, E) and gates.shape == (T, E) and n.shape == (T,), (ids.shape, gates.shape, n.shape)
    dtypes = (ids.dtype, gates.dtype, n.dtype)
    assert dtypes == (torch.int32, torch.float32, torch.int32), dtypes
    assert ids.device == logits.device and gates.device == logits.device and n.device == logits.device
    ref_n = ref_n.to(torch.int32)

    # Structure of the op's own output.
    slot = torch.arange(E, device=logits.device)[None, :]
    kept = slot < n[:, None].long()
    assert bool(((n >= 1) & (n <= E)).all()), "num_active outside [1, E]"
    assert bool((ids[~kept] == -1).all()), "expert_ids padding is not -1"
    assert bool((gates[~kept] == 0).all()), "gates padding is not 0"
    assert bool(((ids[kept] >= 0) & (ids[kept] < E)).all()), "expert id out of range"

    # Ambiguous rows, from the reference probabilities.
    p = reference.routing_probabilities(logits)  # [T, E] fp32
    p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)
    if tau < 1.0:
        c = torch.cumsum(p_sorted.double(), dim=-1)
        near_tau = ((c - tau).abs() <= slack).any(dim=-1)
    else:
        near_tau = torch.zeros(T, dtype=torch.bool, device=logits.device)
    g_sorted = sanitize_logits(logits).gather(1, order)
    close = (p_sorted[:, :-1] - p_sorted[:, 1:]) <= slack * p_sorted[:, :-1]
    distinct = g_sorted[:, :-1] != g_sorted[:, 1:]
    in_prefix = slot[:, :-1] < torch.maximum(n, ref_n)[:, None].long()
    near_tie = (close & distinct & in_prefix).any(dim=-1)
    del order, g_sorted, close, distinct, in_prefix

    ids_differ = (ids != ref_ids).any(dim=-1)
    mismatched = ids_differ | (n != ref_n)
    unexplained = mismatched & ~(near_tau | near_tie)
    if bool(unexplained.any()):
        r = int(unexplained.nonzero()[0, 0])
        k = int(max(n[r], ref_n[r])) + 1
        raise AssertionError(
            f"topp_route differs from the reference on {int(unexplained.sum())} of {T} rows that are not "
            f"near tau or near a tie (tau={tau}, dtype={logits.dtype}); first row {r}: "
            f"num_active {int(n[r])} vs {int(ref_n[r])}, ids {ids[r, :k].tolist()} vs {ref_ids[r, :k].tolist()}"
        )
    # Even on ambiguous rows: num_active within one (only near tau), every kept slot holds an expert of
    # (nearly) that slot's sorted probability, and no expert twice.
    assert bool(((n - ref_n).abs() <= near_tau.int()).all()), "num_active differs by more than the tau band allows"
    tau_only = mismatched & near_tau & ~near_tie
    common = slot < torch.minimum(n, ref_n)[:, None].long()
    assert not bool(((ids != ref_ids) & common)[tau_only].any()), "a near-tau row differs inside its common prefix"
    p_of_ids = p.gather(1, ids.clamp(min=0).long())
    in_order = (p_of_ids - p_sorted).abs() <= slack * p_sorted + 1e-30
    assert bool(in_order[kept].all()), "a kept slot holds an expert out of probability order"
    by_value = ids.sort(dim=-1).values
    assert not bool(((by_value[:, 1:] == by_value[:, :-1]) & (by_value[:, 1:] >= 0)).any()), "an expert selected twice"
    del p, p_sorted, p_of_ids, in_order, by_value

    # Gates: the reference gates of the op's own selection, to fp32 rounding.
    expected = reference.topp_gates(logits, ids, "sigmoid")
    torch.testing.assert_close(gates, expected, rtol=4e-6, atol=2e-6, msg=lambda m: f"gates differ: {m}")
    return CheckResult(
        rows=T,
        mismatched_rows=int(mismatched.sum()),
        near_tau_rows=int(near_tau.sum()),
        near_tie_rows=int(near_tie.sum()),
        mean_active=float(ref_n.float().mean()) if T else 0.0,
    )
