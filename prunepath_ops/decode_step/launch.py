"""Launchers of the decode step's elementwise kernels: allocate, pick the tile, launch (checks are the op's)."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from prunepath_ops import _pdl
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
    pdl = _pdl.use_pdl(x.device)
    launch = {} if _interpreting() else {"num_warps": max(1, min(16, block // 1024)), **_pdl.launch_options(pdl)}
    kernels.add_rms_norm_kernel[(B,)](
        x, residual if residual is not None else x, weight, y, h, d, x.stride(0),
        residual.stride(0) if residual is not None else 0, float(eps),
        HAS_RES=residual is not None, BLOCK=block, PDL=pdl, **launch,
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
    pdl = _pdl.use_pdl(qkv.device)
    launch = {} if _interpreting() else {"num_warps": 1, **_pdl.launch_options(pdl)}
    kernels.rope_qkv_kernel[(B, nh)](
        qkv, cos, sin, out, qkv.stride(0), cos.stride(0), sin.stride(0), n_heads + n_kv_heads, nh, D=D, PDL=pdl,
        **launch,
    )  # fmt: skip
    return out


def decode_linear_triton(x: Tensor, weight: Tensor) -> Tensor:
    """See :func:`prunepath_ops.decode_step.decode_linear`; ``x [B, K]`` last dim contiguous, ``weight [N, K]`` contiguous."""
    B, K = x.shape
    N = weight.shape[0]
    y = torch.empty(B, N, dtype=x.dtype, device=x.device)
    if B == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()
    tokens = min(4, triton.next_power_of_2(B))
    # 16 output columns x 512-wide K tiles per program (x 1 token): 8192 fp32 partial sums over
    # 128 threads. Wider batches take proportionally narrower tiles, so the registers stay put.
    block_k = (
        min(512 // tokens, triton.next_power_of_2(K)) if not _interpreting() else min(64, triton.next_power_of_2(K))
    )
    block_n = 16
    pdl = _pdl.use_pdl(x.device)
    launch = {} if _interpreting() else {"num_warps": 4, **_pdl.launch_options(pdl)}
    grid = (triton.cdiv(N, block_n), triton.cdiv(B, tokens))
    kernels.decode_linear_kernel[grid](
        x, weight, y, B, N, K, x.stride(0), TOKENS=tokens, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl, **launch
    )
    return y
