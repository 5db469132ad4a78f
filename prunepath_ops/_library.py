"""Registration of the ops implemented in Python (``torch.ops.prunepath.*`` next to the C++ ones).

Each op is defined by its schema and registered as the CPU and CUDA kernel of the dispatcher
directly, with a fake kernel for ``torch.compile``, rather than through
``torch.library.custom_op``: that decorator runs Python-side machinery on every call, ~35 us per
eager call on the CI machine against ~5 us for a kernel registered on the dispatcher; for
``kv_decode_attention`` and ``sparse_ffn`` the change saved ~45-50 and ~15-25 us per call there
(``bench/diag/op_dispatch_overhead.py``, ``bench/results/op_dispatch_overhead_cpu.md``), and a
decode step run eagerly calls these ops several times per layer. vLLM registers its Python ops the
same way for the same reason. What the decorator added that matters is kept: the schema states which arguments are mutated (``Tensor(a!)``)
so that ``torch.compile`` functionalises them, and every op passes ``torch.library.opcheck``. None
of these ops has a derivative: backpropagating through one warns that no autograd kernel exists
(the training path uses differentiable PyTorch compositions instead, ``prunepath_ops.modules``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# The namespace itself is created by the C++ extension's TORCH_LIBRARY(prunepath, m); Python adds
# to it. The object must live as long as the process: dropping it unregisters the ops.
_LIB = torch.library.Library("prunepath", "FRAGMENT")


def define_op(schema: str, impl: Callable, fake: Callable) -> Callable:
    """Define ``prunepath::<name>`` from ``schema`` ("name(args) -> returns"); ``impl`` runs on CPU
    and CUDA tensors, ``fake`` computes output metadata for ``torch.compile``. Returns ``impl``."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, impl, key)
    torch.library.register_fake(f"prunepath::{name}", fake, lib=_LIB)
    return impl
