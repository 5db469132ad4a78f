"""The ``backend`` argument of the Triton-or-PyTorch ops (decode attention, the decode step's elementwise ops)."""

from __future__ import annotations

import torch

from prunepath_ops.ffn._env import interpreting

#: ``auto``: Triton on CUDA, the PyTorch implementation on the CPU.
BACKENDS = ("auto", "triton", "cpu")


def check_backend(op: str, backend: str) -> None:
    """Raise a ValueError naming ``op`` unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}; got {backend!r}")


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"cpu"`` for tensors on ``device``.

    ``auto``: Triton on CUDA, the PyTorch implementation on the CPU. ``triton`` on CPU tensors needs
    ``TRITON_INTERPRET=1`` (the tests use it); ``cpu`` needs CPU tensors.
    """
    check_backend(op, backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise RuntimeError(f"{op}: backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"{op}: backend='cpu' needs CPU tensors; got {device}")
    return backend
