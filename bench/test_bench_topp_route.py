"""pytest-benchmark: ``prunepath_ops.topp_route`` next to the PyTorch composite it replaces.

Each (T, E, dtype, tau) is one pytest-benchmark group holding two benchmarks, ``prunepath``
(the op) and ``reference`` (``prunepath_ops.reference.topp_route``: softmax, stable sort,
cumsum, mask, gather, sigmoid gates), so ``--benchmark-group-by=group`` shows the ratio from
one run. Times are wall-clock per call with the device synchronised inside the timed
function (host overhead included, L2 warm); ``bench/topp_route_gpu.py`` measures device time
with the L2 flushed and reports the roofline.

Before the op is timed its output is checked against the reference
(``routing_bench.check_route``), so a wrong kernel fails instead of reporting a number.
"""

from __future__ import annotations

import pytest
from routing_bench import (
    DTYPES,
    E_VALUES,
    IMPLS,
    T_VALUES,
    TAU,
    TAU_ALL,
    TAU_ALL_SHAPES,
    check_route,
    make_logits,
    route_bytes,
)

# (T, E, tau); the logit dtype (bench_dtype) is parametrized by conftest.py (--bench-dtype).
SHAPES = [
    pytest.param(T, E, tau, id=f"T{T}-E{E}-tau{tau}")
    for T in T_VALUES
    for E in E_VALUES
    for tau in ((TAU, TAU_ALL) if (T, E) in TAU_ALL_SHAPES else (TAU,))
]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("T,E,tau", SHAPES)
def test_topp_route(
    benchmark, bench_device, sync, check_shape, plan_rounds, bench_record, T, E, bench_dtype, tau, impl
):
    dtype = bench_dtype
    check_shape(T)
    logits = make_logits(T, E, DTYPES[dtype], bench_device)
    benchmark.group = f"topp_route T={T} E={E} {dtype} tau={tau}"
    fn = IMPLS[impl](logits, tau)
    nbytes = route_bytes(T, E, logits.dtype)
    benchmark.extra_info.update(
        {"op": "topp_route", "impl": impl, "T": T, "E": E, "K": E, "dtype": dtype, "tau": tau, "bytes": nbytes}
    )
    if impl == "prunepath":
        result = check_route(logits, tau)  # raises if the op is wrong
        benchmark.extra_info["mean_active"] = result.mean_active
        benchmark.extra_info["check"] = result.summary()

    def run():
        out = fn()
        sync()
        return out

    rounds, warmup_rounds = plan_rounds(run)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_us"] = median * 1e6
        benchmark.extra_info["GB/s"] = nbytes / median / 1e9
        bench_record(group=benchmark.group, impl=impl, median_s=median, nbytes=nbytes)
