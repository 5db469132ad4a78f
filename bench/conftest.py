"""pytest-benchmark configuration for ``bench/``: device selection, synchronisation, round planning.

Options (see ``bench/README.md``):

``--bench-device cpu|cuda|auto``
    Where the benchmarks run (default ``auto``: CUDA when torch sees a GPU).
``--bench-dtype auto|fp32|fp16|bf16[,...]``
    Logit dtypes (default ``auto``: bf16 on CUDA, fp32 on the CPU).
``--bench-threads N``
    ``torch.set_num_threads(N)`` before anything runs (default: torch's choice, one per core).
``--bench-max-t N``
    Skip shapes with more tokens than N (default 4096 on the CPU, where T=65536 takes seconds
    per call; no cap on CUDA). ``--bench-max-t 65536`` runs the whole grid on the CPU.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # routing_bench, whatever the import mode

_DEVICE_KEY = pytest.StashKey[torch.device]()
_RESULTS_KEY = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("prunepath bench")
    group.addoption(
        "--bench-device",
        choices=("cpu", "cuda", "auto"),
        default="auto",
        help="device the benchmarks run on (default: auto = cuda if available, else cpu)",
    )
    group.addoption(
        "--bench-dtype",
        default="auto",
        help="comma-separated logit dtypes among fp32, fp16, bf16 (default: auto = bf16 on cuda, fp32 on cpu)",
    )
    group.addoption(
        "--bench-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for CPU runs (default: leave torch's default)",
    )
    group.addoption(
        "--bench-max-t",
        type=int,
        default=None,
        help="skip shapes with more than this many tokens (default: 4096 on cpu, no cap on cuda)",
    )


def pytest_configure(config: pytest.Config) -> None:
    choice = config.getoption("--bench-device")
    if choice == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: torch sees no CUDA device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    config.stash[_DEVICE_KEY] = torch.device(choice)
    threads = config.getoption("--bench-threads")
    if threads is not None:
        torch.set_num_threads(threads)
    config.stash[_RESULTS_KEY] = []


def bench_device_of(config: pytest.Config) -> torch.device:
    return config.stash[_DEVICE_KEY]


def bench_dtypes_of(config: pytest.Config) -> list[str]:
    """Dtype names every benchmark with a ``bench_dtype`` argument is parametrized over."""
    raw = config.getoption("--bench-dtype")
    if raw == "auto":
        return ["bf16"] if bench_device_of(config).type == "cuda" else ["fp32"]
    names = [s.strip() for s in raw.split(",") if s.strip()]
    bad = [n for n in names if n not in ("fp32", "fp16", "bf16")]
    if bad or not names:
        raise pytest.UsageError(f"--bench-dtype: unknown dtype(s) {bad or raw!r}; use fp32, fp16, bf16 or auto")
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Only tests that ask for ``bench_dtype`` are parametrized: other modules keep their own dtypes.
    if "bench_dtype" in metafunc.fixturenames:
        metafunc.parametrize("bench_dtype", bench_dtypes_of(metafunc.config))


def bench_max_t_of(config: pytest.Config) -> int | None:
    max_t = config.getoption("--bench-max-t")
    if max_t is None and bench_device_of(config).type == "cpu":
        return 4096
    return max_t


@pytest.fixture(scope="session")
def bench_device(pytestconfig: pytest.Config) -> torch.device:
    """The device every benchmark runs on."""
    return bench_device_of(pytestconfig)


@pytest.fixture(scope="session")
def sync(bench_device: torch.device) -> Callable[[], None]:
    """Waits for the device: call it inside the timed function so that CUDA time is measured, not launch time."""
    if bench_device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


@pytest.fixture
def check_shape(pytestconfig: pytest.Config, bench_device: torch.device) -> Callable[[int], None]:
    """``check_shape(T)`` skips the test when T exceeds the cap for this device."""

    def check(T: int) -> None:
        max_t = bench_max_t_of(pytestconfig)
        if max_t is not None and T > max_t:
            pytest.skip(f"T={T} > --bench-max-t {max_t} on {bench_device.type} (pass --bench-max-t {T} to run it)")

    return check


@pytest.fixture
def plan_rounds(pytestconfig: pytest.Config) -> Callable[[Callable[[], object]], tuple[int, int]]:
    """``plan_rounds(run) -> (rounds, warmup_rounds)`` for ``benchmark.pedantic``.

    Calls ``run`` twice (the first absorbs one-time costs, the second estimates one call), then
    picks as many rounds as fit in ``--benchmark-max-time`` but at least ``--benchmark-min-rounds``
    (the two options pytest-benchmark's own calibration honours), and up to 0.2 s of warmup.
    """
    min_rounds = int(pytestconfig.getoption("benchmark_min_rounds"))
    max_time = float(pytestconfig.getoption("benchmark_max_time"))

    def plan(run: Callable[[], object]) -> tuple[int, int]:
        run()
        start = time.perf_counter()
        run()
        est = max(time.perf_counter() - start, 1e-7)
        rounds = max(min_rounds, min(100_000, math.ceil(max_time / est)))
        warmup = max(1, min(50, int(0.2 / est)))
        return rounds, warmup

    return plan


@pytest.fixture
def bench_record(pytestconfig: pytest.Config) -> Callable[..., None]:
    """``bench_record(group=..., impl=..., median_s=..., nbytes=...)`` feeds the ratio table printed at the end."""
    return lambda **row: pytestconfig.stash[_RESULTS_KEY].append(row)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    device = bench_device_of(config)
    info = {
        "bench_device": str(device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_num_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    machine_info["prunepath"] = info


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line per group: the op's median next to its baseline's, their ratio, the op's bandwidth."""
    rows = config.stash.get(_RESULTS_KEY, [])
    if not rows:
        return
    by_group: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_group.setdefault(row["group"], {})[row["impl"]] = row
    tr = terminalreporter
    tr.section("prunepath: op vs PyTorch composite (medians of this run)")
    tr.write_line(f"{'group':<44} {'prunepath':>12} {'reference':>12} {'speedup':>8} {'op GB/s':>9}")
    for group, impls in by_group.items():
        op, ref = impls.get("prunepath"), impls.get("reference")
        op_s = f"{op['median_s'] * 1e6:.1f} us" if op else "-"
        ref_s = f"{ref['median_s'] * 1e6:.1f} us" if ref else "-"
        speedup = f"{ref['median_s'] / op['median_s']:.2f}x" if op and ref else "-"
        gbs = f"{op['nbytes'] / op['median_s'] / 1e9:.2f}" if op else "-"
        tr.write_line(f"{group:<44} {op_s:>12} {ref_s:>12} {speedup:>8} {gbs:>9}")
