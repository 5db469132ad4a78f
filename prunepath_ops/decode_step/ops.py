"""Registration of ``torch.ops.prunepath.{add_rms_norm, rope_qkv, decode_linear}``: checks, backend, fakes.

Legend: B rows, d hidden, H query heads, Hkv key/value heads, D head dim, K/N GEMV input/output width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunepath_ops import _pdl
from prunepath_ops import reference as R
from prunepath_ops._backend import check_backend, resolve_backend
from prunepath_ops._library import define_op

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_2d(op: str, name: str, t: Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {list(shape)}; got {list(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype}; got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must be contiguous in its last dim; got strides {t.stride()}")


def check_add_rms_norm_args(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, backend: str) -> None:
    op = "add_rms_norm"
    check_backend(op, backend)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [B, d]; got shape {list(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16; got {x.dtype}")
    _check_2d(op, "x", x, tuple(x.shape), x.dtype, x.device)
    if residual is not None:
        _check_2d(op, "residual", residual, tuple(x.shape), x.dtype, x.device)
    _check_2d(op, "weight", weight, (x.shape[1],), x.dtype, x.device)
    if not (eps >= 0.0):  # also rejects NaN
        raise ValueError(f"{op}: eps must be a non-negative number; got {eps}")


def check_rope_qkv_args(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int, backend: str) -> None:
    op = "rope_qkv"
    check_backend(op, backend)
    if n_heads < 1 or n_kv_heads < 1:
        raise ValueError(f"{op}: n_heads and n_kv_heads must be positive; got {n_heads} and {n_kv_heads}")
    if qkv.dim() != 2:
        raise ValueError(f"{op}: qkv must be 2-D [B, (H + 2 Hkv) D]; got shape {list(qkv.shape)}")
    if qkv.dtype not in DTYPES:
        raise TypeError(f"{op}: qkv must be float32, float16 or bfloat16; got {qkv.dtype}")
    if cos.dim() != 2:
        raise ValueError(f"{op}: cos must be 2-D [B, D]; got shape {list(cos.shape)}")
    B, D = qkv.shape[0], cos.shape[1]
    nh = n_heads + 2 * n_kv_heads
    if D < 2 or D & (D - 1):
        raise ValueError(f"{op}: the head dim D (cos.shape[1]) must be a power of two >= 2; got {D}")
    _check_2d(op, "qkv", qkv, (B, nh * D), qkv.dtype, qkv.device)
    _check_2d(op, "cos", cos, (B, D), qkv.dtype, qkv.device)
    _check_2d(op, "sin", sin, (B, D), qkv.dtype, qkv.device)


#: decode_linear's backends: the CUDA kernel of ``prunepath::decode_gemv`` besides Triton and PyTorch.
DECODE_LINEAR_BACKENDS = ("auto", "cuda", "triton", "cpu")


def check_decode_linear_args(x: Tensor, weight: Tensor, backend: str) -> None:
    op = "decode_linear"
    if backend not in DECODE_LINEAR_BACKENDS:
        raise ValueError(f"{op}: backend must be one of {DECODE_LINEAR_BACKENDS}; got {backend!r}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [B, K]; got shape {list(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16; got {x.dtype}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weight must be [N, K] with K = {x.shape[1]}; got shape {list(weight.shape)}")
    _check_2d(op, "x", x, tuple(x.shape), x.dtype, x.device)
    _check_2d(op, "weight", weight, tuple(weight.shape), x.dtype, x.device)
    if not weight.is_contiguous():
        raise ValueError(f"{op}: weight must be contiguous; got strides {weight.stride()}")


def add_rms_norm_op(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, backend: str
) -> tuple[Tensor, Tensor]:
    """Residual add fused with RMSNorm; see :func:`prunepath_ops.decode_step.add_rms_norm`."""
    check_add_rms_norm_args(x, residual, weight, eps, backend)
    if resolve_backend("add_rms_norm", backend, x.device) == "cpu":
        y, h = R.add_rms_norm(x, residual, weight, eps)
        return y.contiguous(), h.clone() if h is x else h.contiguous()  # outputs never alias inputs
    from prunepath_ops.decode_step.launch import add_rms_norm_triton

    return add_rms_norm_triton(x, residual, weight, eps)


def _add_rms_norm_fake(x, residual, weight, eps, backend):
    check_add_rms_norm_args(x, residual, weight, eps, backend)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        x, memory_format=torch.contiguous_format
    )


define_op(
    "add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps, str backend) -> (Tensor, Tensor)",
    add_rms_norm_op,
    _add_rms_norm_fake,
)


def rope_qkv_op(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int, backend: str) -> Tensor:
    """RoPE of a fused q/k/v projection; see :func:`prunepath_ops.decode_step.rope_qkv`."""
    check_rope_qkv_args(qkv, cos, sin, n_heads, n_kv_heads, backend)
    if resolve_backend("rope_qkv", backend, qkv.device) == "cpu":
        return R.rope_qkv(qkv, cos, sin, n_heads, n_kv_heads)
    from prunepath_ops.decode_step.launch import rope_qkv_triton

    return rope_qkv_triton(qkv, cos, sin, n_heads, n_kv_heads)


def _rope_qkv_fake(qkv, cos, sin, n_heads, n_kv_heads, backend):
    check_rope_qkv_args(qkv, cos, sin, n_heads, n_kv_heads, backend)
    return qkv.new_empty(qkv.shape[0], n_heads + 2 * n_kv_heads, cos.shape[1])


define_op(
    "rope_qkv(Tensor qkv, Tensor cos, Tensor sin, SymInt n_heads, SymInt n_kv_heads, str backend) -> Tensor",
    rope_qkv_op,
    _rope_qkv_fake,
)


# Fixed once prunepath_ops._C is loaded (the package's __init__ loads it before any submodule), so
# asked once here rather than on every decode_linear call or in torch.compile's trace.
_CUDA_GEMV_BUILT = torch._C._dispatch_has_kernel_for_dispatch_key("prunepath::decode_gemv", "CUDA")


def cuda_gemv_built() -> bool:
    """Whether this build of the package has the CUDA kernel of ``prunepath::decode_gemv``."""
    return _CUDA_GEMV_BUILT


def resolve_decode_linear_backend(backend: str, device: torch.device) -> str:
    """``"cuda"``, ``"triton"`` or ``"cpu"`` for decode_linear on ``device``.

    ``auto``: on CUDA the C++ kernel (``prunepath::decode_gemv``) when this build has CUDA kernels,
    else Triton; the PyTorch implementation on the CPU. ``cuda`` needs CUDA tensors and a CUDA build.
    """
    if backend == "cuda" or (backend == "auto" and device.type == "cuda"):
        built = cuda_gemv_built()
        if backend == "auto":
            return "cuda" if built else "triton"
        if device.type != "cuda":
            raise ValueError(f"decode_linear: backend='cuda' needs CUDA tensors; got {device}")
        if not built:
            raise RuntimeError("decode_linear: backend='cuda' needs a CUDA build of prunepath_ops (PRUNEPATH_CUDA=1)")
        return "cuda"
    return resolve_backend("decode_linear", backend, device)


def decode_linear_op(x: Tensor, weight: Tensor, backend: str) -> Tensor:
    """``x W^T`` for a few rows; see :func:`prunepath_ops.decode_step.decode_linear`."""
    check_decode_linear_args(x, weight, backend)
    backend = resolve_decode_linear_backend(backend, x.device)
    if backend == "cpu":
        return R.decode_linear(x, weight).contiguous()
    if backend == "cuda":
        return torch.ops.prunepath.decode_gemv(x, weight, _pdl.resolve(None, x.device))
    from prunepath_ops.decode_step.launch import decode_linear_triton

    return decode_linear_triton(x, weight)


def _decode_linear_fake(x, weight, backend):
    check_decode_linear_args(x, weight, backend)
    return x.new_empty(x.shape[0], weight.shape[0])


define_op(
    "decode_linear(Tensor x, Tensor weight, str backend) -> Tensor",
    decode_linear_op,
    _decode_linear_fake,
)
