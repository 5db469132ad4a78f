"""prunepath_ops: structured FFN sparsity ops for PyTorch (PrunePath).

Importing the package registers every op under ``torch.ops.prunepath``.
"""

from __future__ import annotations

import torch

try:
    from prunepath_ops import _C  # noqa: F401  (loads the library; its initialisers register the ops)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "prunepath_ops._C is not built. Install the package with "
        "`pip install --no-build-isolation -e .` (after installing torch)."
    ) from exc

from prunepath_ops import (
    _registration,  # noqa: E402,F401  (fake kernels, autograd)
    reference,  # noqa: E402
)
from prunepath_ops.attention import kv_decode_attention  # noqa: E402
from prunepath_ops.ffn import Alignment, PackedExperts, align_experts, pack_experts, sparse_ffn  # noqa: E402
from prunepath_ops.modules import PrunePathMLP  # noqa: E402
from prunepath_ops.routing import Route, linear_topp_route, norm_linear_topp_route, topp_route  # noqa: E402

__version__ = "0.1.0"

_OPS = (
    "topp_route",
    "linear_topp_route",
    "norm_linear_topp_route",
    "decode_gemv",
    "align_experts",
)  # C++ ops with CPU and CUDA kernels (expert_ffn too; backends() asks these)


def backends() -> dict[str, bool]:
    """Which kernel backends this build of the package has.

    Returns
    -------
    dict
        ``{"cpu": ..., "cuda": ...}``: ``cuda`` is True when the CUDA kernels
        were compiled in (a GPU is not needed to ask) and ``cuda_available``
        says whether torch can see a GPU now.

    Examples
    --------
    >>> import prunepath_ops
    >>> prunepath_ops.backends()["cpu"]
    True
    """
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {
        "cpu": all(has(f"prunepath::{op}", "CPU") for op in _OPS),
        "cuda": all(has(f"prunepath::{op}", "CUDA") for op in _OPS),
        "cuda_available": torch.cuda.is_available(),
    }


__all__ = [
    "Alignment",
    "PackedExperts",
    "PrunePathMLP",
    "Route",
    "align_experts",
    "kv_decode_attention",
    "backends",
    "linear_topp_route",
    "norm_linear_topp_route",
    "pack_experts",
    "reference",
    "sparse_ffn",
    "topp_route",
]
