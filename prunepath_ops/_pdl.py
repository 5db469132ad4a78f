"""Programmatic dependent launch (PDL) for the Triton kernels of the decode step.

On Hopper and later a kernel launched with ``launch_pdl=True`` may be scheduled while the kernel
before it on the stream is still running, once every program of that one has started (or has
called ``gdc_launch_dependents``). Its programs must then execute ``gdc_wait`` before touching
global memory another kernel writes or reads: the wait returns when the preceding kernel has
finished and its writes are visible. What PDL buys is the launch latency of the dependent kernel
(its programs are resident and waiting when the previous kernel ends), about a microsecond per
kernel boundary, which is a tenth of a decode-step kernel at batch 1. CUDA graphs keep the
dependency (stream capture records a programmatic edge), so a graphed decode step gains too.

Every kernel that takes a ``PDL`` constexpr calls :func:`pdl_wait` first, before any load or
store, so the order of memory accesses across kernels is the same as without PDL: results do not
change, bit for bit. ``PRUNEPATH_PDL=0`` turns it off (for A/B timing or a driver that rejects it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from prunepath_ops.ffn._env import interpreting

# A plain dict, not functools.cache: torch.compile traces the op wrappers that ask this, and Dynamo
# warns about (and ignores) an lru_cache wrapper on every compile; a dict lookup it traces cleanly.
_PDL_SUPPORT: dict[int, bool] = {}


def _device_supports_pdl(index: int) -> bool:
    supported = _PDL_SUPPORT.get(index)
    if supported is None:
        cuda = getattr(getattr(tl, "extra", None), "cuda", None)
        supported = torch.cuda.get_device_capability(index)[0] >= 9 and (
            hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents")
        )
        _PDL_SUPPORT[index] = supported
    return supported


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL: a CUDA device of compute capability >= 9,
    a Triton that has the ``gdc_*`` intrinsics, not the interpreter, and ``PRUNEPATH_PDL`` not 0."""
    if device.type != "cuda" or interpreting() or os.environ.get("PRUNEPATH_PDL", "1") == "0":
        return False
    return _device_supports_pdl(device.index if device.index is not None else torch.cuda.current_device())


def resolve(pdl: bool | None, device: torch.device) -> bool:
    """A launcher's ``pdl`` argument: None takes :func:`use_pdl`; True only where PDL is available."""
    return (pdl is None or bool(pdl)) and use_pdl(device)


def launch_options(pdl: bool) -> dict:
    """Keyword arguments of a Triton launch for ``pdl`` (empty when off, so older Tritons never see the key)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait for the preceding kernel on the stream to finish (a no-op without PDL)."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_launch_dependents(PDL: tl.constexpr):
    """Let the next kernel on the stream be scheduled once every program got here (a no-op without PDL)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
