"""Launchers of the decode step's elementwise kernels: allocate, pick the tile, launch (checks are the op's)."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from prunepath_ops.decode_step import kernels
from prunepath_ops.ffn._env import interpreting as _interpreting


def add_rms_norm_triton(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """See :func:`prunepath_ops.decode_step.add_rms_norm`; ``[B, d]`` rows, last dim contiguous."""
    B, d = x.shape
    y = torch.empty(B, d, dtype=x.dtype, device=x.device)
    h = torch.empty_like(y)
    if B == 0:
        return y, h
    block = triton.next_power_of_2(d)
    # One row in registers: a warp per 1024 columns keeps 32 fp32 values per thread at most.
    launch = {} if _interpreting() else {"num_warps": max(1, min(16, block // 1024))}
    kernels.add_rms_norm_kernel[(B,)](
        x, residual if residual is not None else x, weight, y, h, d, x.stride(0),
        residual.stride(0) if residual is not None else 0, float(eps),
        HAS_RES=residual is not None, BLOCK=block, **launch,
    )  # fmt: skip
    return y, h


def rope_qkv_triton(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int) -> Tensor:
    """See :func:`prunepath_ops.decode_step.rope_qkv`; ``[B, (H + 2 Hkv) D]``, last dims contiguous."""
    B = qkv.shape[0]
    D = cos.shape[1]
    nh = n_heads + 2 * n_kv_heads
    out = torch.empty(B, nh, D, dtype=qkv.dtype, device=qkv.device)
    if B == 0:
        return out
    launch = {} if _interpreting() else {"num_warps": 1}
    kernels.rope_qkv_kernel[(B, nh)](
        qkv, cos, sin, out, qkv.stride(0), cos.stride(0), sin.stride(0), n_heads + n_kv_heads, nh, D=D, **launch
    )
    return out
