"""Registration of ``torch.ops.prunepath.sparse_ffn``: argument checks, backend choice, fake kernel.

One op boundary per call (the whole routed FFN), so ``torch.compile(fullgraph=True)``
sees a single opaque node whose output shape the fake kernel gives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunepath_ops.ffn._env import DECODE_MAX_TOKENS
from prunepath_ops.ffn._env import interpreting as _interpreting
from prunepath_ops.ffn.cpu import sparse_ffn_cpu
from prunepath_ops.reference.sparse_ffn import ACTIVATIONS
from prunepath_ops.reference.sparse_ffn import sparse_ffn as sparse_ffn_reference

PATHS = ("auto", "decode", "prefill")
BACKENDS = ("auto", "triton", "cpu", "reference")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_sparse_ffn_args(
    x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out, gated, act, path, backend
) -> None:
    """Raise on inconsistent shapes, dtypes or devices (shared by the real and the fake kernel)."""
    if x.dim() != 2:
        raise ValueError(f"sparse_ffn: x must be [T, d]; got shape {list(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"sparse_ffn: x must be float32, float16 or bfloat16; got {x.dtype}")
    T, d = x.shape
    if w_down.dim() != 3 or w_down.shape[2] != d:
        raise ValueError(f"sparse_ffn: w_down must be [E, S, d = {d}]; got {list(w_down.shape)}")
    E, S, _ = w_down.shape
    rows = 2 * S if gated else S
    if tuple(w_in.shape) != (E, rows, d):
        raise ValueError(
            f"sparse_ffn: w_in must be [E, {'2S' if gated else 'S'}, d] = {[E, rows, d]}; got {list(w_in.shape)}"
        )
    if w_in.dtype != x.dtype or w_down.dtype != x.dtype:
        raise TypeError(f"sparse_ffn: weights must have the dtype of x ({x.dtype}); got {w_in.dtype}, {w_down.dtype}")
    if expert_ids.dim() != 2 or expert_ids.shape[0] != T or expert_ids.dtype != torch.int32:
        raise ValueError(
            f"sparse_ffn: expert_ids must be int32 [T = {T}, K]; got {expert_ids.dtype} {list(expert_ids.shape)}"
        )
    if tuple(gates.shape) != tuple(expert_ids.shape) or gates.dtype != torch.float32:
        raise ValueError(
            f"sparse_ffn: gates must be float32 {list(expert_ids.shape)}; got {gates.dtype} {list(gates.shape)}"
        )
    if tuple(num_active.shape) != (T,) or num_active.dtype != torch.int32:
        raise ValueError(f"sparse_ffn: num_active must be int32 [{T}]; got {num_active.dtype} {list(num_active.shape)}")
    if b_in is not None and (gated or tuple(b_in.shape) != (E, S)):
        raise ValueError(f"sparse_ffn: b_in is for a plain FFN and must be [E, S] = {[E, S]}")
    if b_out is not None and tuple(b_out.shape) != (d,):
        raise ValueError(f"sparse_ffn: b_out must be [d] = [{d}]; got {list(b_out.shape)}")
    for t in (b_in, b_out):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"sparse_ffn: biases must have the dtype of x ({x.dtype}); got {t.dtype}")
    tensors = [t for t in (x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"sparse_ffn: every tensor must be on {x.device}")
    if act not in ACTIVATIONS:
        raise ValueError(f"sparse_ffn: act must be one of {ACTIVATIONS}; got {act!r}")
    if path not in PATHS:
        raise ValueError(f"sparse_ffn: path must be one of {PATHS}; got {path!r}")
    if backend not in BACKENDS:
        raise ValueError(f"sparse_ffn: backend must be one of {BACKENDS}; got {backend!r}")
    if path == "decode" and T > DECODE_MAX_TOKENS:
        raise ValueError(f"sparse_ffn: path='decode' handles T <= {DECODE_MAX_TOKENS} tokens; got {T}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: Triton on CUDA, the sparse PyTorch CPU path on the CPU.

    ``triton`` on the CPU needs ``TRITON_INTERPRET=1`` (the tests use it there).
    """
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise RuntimeError("sparse_ffn: backend='triton' on the CPU needs TRITON_INTERPRET=1")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"sparse_ffn: backend='cpu' needs CPU tensors; got {device}")
    return backend


def resolve_path(path: str, num_tokens: int) -> str:
    """``auto``: the decode kernels up to ``DECODE_MAX_TOKENS`` tokens, the prefill kernels above."""
    if path == "auto":
        return "decode" if num_tokens <= DECODE_MAX_TOKENS else "prefill"
    return path


@torch.library.custom_op("prunepath::sparse_ffn", mutates_args=())
def sparse_ffn_op(
    x: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    num_active: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_down: Tensor,
    b_out: Tensor | None,
    gated: bool,
    act: str,
    path: str,
    backend: str,
) -> Tensor:
    """Routed expert FFN; see :func:`prunepath_ops.sparse_ffn`."""
    args = (x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out, gated, act)
    check_sparse_ffn_args(*args, path, backend)
    x, expert_ids, gates, num_active = (t.contiguous() for t in (x, expert_ids, gates, num_active))
    w_in, w_down = w_in.contiguous(), w_down.contiguous()
    args = (x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out, gated, act)
    chosen = resolve_backend(backend, x.device)
    if chosen == "reference":
        return sparse_ffn_reference(
            x, expert_ids, gates, num_active, w_in, w_down, b_in=b_in, b_out=b_out, gated=gated, act=act
        )
    if chosen == "cpu":
        return sparse_ffn_cpu(*args)
    from prunepath_ops.ffn.triton_ffn import sparse_ffn_decode_triton, sparse_ffn_prefill_triton

    if resolve_path(path, x.shape[0]) == "decode":
        return sparse_ffn_decode_triton(*args)
    return sparse_ffn_prefill_triton(*args)


@sparse_ffn_op.register_fake
def _sparse_ffn_fake(x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out, gated, act, path, backend):
    check_sparse_ffn_args(x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out, gated, act, path, backend)
    return torch.empty_like(x, memory_format=torch.contiguous_format)
