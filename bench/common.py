"""Shared pieces of the GPU benchmark scripts: timers, the environment record, CUDA-graph capture, output files.

Every script records the same environment (GPU, driver, versions, command line, date, git state) and
writes ``<name>.md`` + ``<name>.json`` next to each other, so results stay comparable across scripts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import prunepath_ops

# ----------------------------------------------------------------------------- timers


def _quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else [times_ms[0]] * 9
    return statistics.median(times_ms), q[1], q[7]  # median, p20, p80


def make_timer(args: argparse.Namespace) -> tuple[str, Callable[[Callable[[], object]], tuple[float, float, float]]]:
    """Returns (description, timer); timer(fn) -> (median, p20, p80) in ms of one call of fn."""
    warmup, rep = args.warmup, args.rep
    if args.device == "cpu":

        def cpu_timer(fn):
            fn()
            start = time.perf_counter()
            fn()
            est = max(time.perf_counter() - start, 1e-7) * 1e3
            for _ in range(max(0, int(warmup / est))):
                fn()
            times = []
            for _ in range(max(3, int(rep / est))):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return _quantiles(times)

        return "time.perf_counter per call (CPU)", cpu_timer

    do_bench = None
    if args.timer in ("auto", "do_bench"):
        try:
            from triton.testing import do_bench
        except ImportError:
            if args.timer == "do_bench":
                raise
    if do_bench is not None:

        def triton_timer(fn):
            try:
                med, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
            except TypeError:  # an older signature: median only
                med = p20 = p80 = do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
            return med, p20, p80

        return f"triton.testing.do_bench (warmup {warmup:g} ms, rep {rep:g} ms, L2 flushed, median)", triton_timer

    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")

    def event_timer(fn):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            flush.zero_()
            fn()
        end.record()
        torch.cuda.synchronize()
        est = max(start.elapsed_time(end) / 5, 1e-4)
        for _ in range(max(1, int(warmup / est))):
            fn()
        n = max(1, int(rep / est))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])

    return f"CUDA events (warmup {warmup:g} ms, rep {rep:g} ms, L2 flushed, median; triton missing)", event_timer


# ----------------------------------------------------------------------------- environment


def _git(*cmd: str) -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(
            ["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(
    args: argparse.Namespace, timer_desc: str, *, device: str | None = None, peak_tbps: float | None = None
) -> dict:
    """Versions, git state, host and GPU of a run. ``device`` / ``peak_tbps`` default to the script's
    ``--device`` / ``--peak-tbps``; the GPU-only diagnostics, which have neither option, pass them."""
    device = device or args.device
    if peak_tbps is None:
        peak_tbps = getattr(args, "peak_tbps", None)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": "python " + shlex.join(sys.argv),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "prunepath_ops": prunepath_ops.__version__,
        "backends": prunepath_ops.backends(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None,
        "timer": timer_desc,
        "floor_bandwidth_TBps": peak_tbps,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "torch_num_threads": torch.get_num_threads(),
        # Kernel choices made through the environment (PRUNEPATH_TOPP_KERNEL, PRUNEPATH_DECODE_SCHEDULE, ...).
        "prunepath_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("PRUNEPATH_")},
    }
    status = _git("status", "--porcelain", "--untracked-files=no")
    env["git_dirty"] = None if status is None else bool(status)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_sms"] = props.multi_processor_count
        env["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
        env["cuda_driver"] = _nvidia_smi_driver()
    return env


def _nvidia_smi_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


# ----------------------------------------------------------------------------- CUDA graphs


def capture(fn: Callable[[], object], warmup: int = 2) -> tuple[Callable[[], None], object]:
    """``(replay, output)`` of ``fn()`` captured once in a CUDA graph.

    The warm-up calls run on a side stream, as ``torch.cuda.graph`` advises (Triton compiles, the
    caching allocator fills its pools); ``output`` is the captured call's result, which every replay
    rewrites in place. A decode step runs this way: replays cost GPU time only.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


# ----------------------------------------------------------------------------- output


def header_lines(title: str, env: dict, args: argparse.Namespace) -> list[str]:
    """The first lines of every report: title, command, date and git state, versions, timer."""
    where = f", driver {env.get('cuda_driver')}" if env["device"] == "cuda" else f", {env['torch_num_threads']} threads"
    return [
        f"# {title}",
        "",
        f"- command: `{env['command']}`",
        f"- date: {env['date_utc']}; git {env['git_commit']} (dirty: {env['git_dirty']})",
        f"- torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}, python {env['python']}" + where,
        f"- timer: {env['timer']}",
        *(
            [f"- environment: {', '.join(f'{k}={v}' for k, v in env['prunepath_env'].items())}"]
            if env.get("prunepath_env")
            else []
        ),
    ]


def write_texts(out_dir: str | None, files: dict[str, str]) -> None:
    """Write each ``files[name]`` to ``<out_dir>/<name>`` (a newline added where missing); no-op without ``out_dir``."""
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")


def write_results(out_dir: str | None, name: str, report: str, payload: dict) -> None:
    """Write ``<out_dir>/<name>.md`` (the report) and ``<name>.json`` (``payload``); no-op without ``out_dir``."""
    if not out_dir:
        return
    write_texts(out_dir, {name + ".json": json.dumps(payload, indent=2), name + ".md": report})
    print(f"wrote {os.path.join(out_dir, name)}.json and .md")
