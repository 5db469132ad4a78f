"""Triton kernel bodies of the decode step's elementwise ops (launchers: :mod:`.launch`).

Legend: B rows (tokens), d hidden, H query heads, Hkv key/value heads, D head dim.

At decode every elementwise op of a layer is a launch over a few kilobytes: RMSNorm as PyTorch
runs it is four (cast up, normalise, cast down, times the weight), RoPE three per tensor, the
residual add one more. These two kernels do a layer's worth in three launches: one residual add
fused with the next RMSNorm (twice per layer) and one RoPE over the fused q/k/v projection.
The attention block's two projections (fused q/k/v, output) are GEMVs of a few rows:
:func:`decode_linear_kernel`.

With ``PDL`` (:mod:`prunepath_ops._pdl`) a kernel may start while the previous one finishes: each
loads what no earlier kernel writes (weights) first, waits, then reads its input, and lets the next
kernel launch at once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from prunepath_ops._pdl import pdl_launch_dependents, pdl_wait


@triton.jit
def add_rms_norm_kernel(
    x_ptr,  # [B, d]
    res_ptr,  # [B, d] or a dummy (HAS_RES False)
    w_ptr,  # [d]
    y_ptr,  # [B, d] out: weight * rms_norm(h)
    h_ptr,  # [B, d] out: h = x + residual
    d,
    stride_x,
    stride_r,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """One row per program: h = x + residual in the input dtype, then RMSNorm of h in fp32."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < d
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)  # a weight: no kernel writes it
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    h = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if HAS_RES:
        # Rounded to the dtype, as PyTorch's add: h is the residual stream the next layer adds to.
        h = (h.to(tl.float32) + tl.load(res_ptr + row * stride_r + offs, mask=ok, other=0.0).to(tl.float32)).to(
            x_ptr.dtype.element_ty
        )
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / d + eps)
    y = (hf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # cast before the weight, as Hugging Face
    y = y * w
    tl.store(y_ptr + row * d + offs, y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(h_ptr + row * d + offs, h, mask=ok)


@triton.jit
def rope_qkv_kernel(
    qkv_ptr,  # [B, (H + 2 Hkv) D]
    cos_ptr,  # [B, D]
    sin_ptr,  # [B, D] signed (first half negated)
    out_ptr,  # [B, H + 2 Hkv, D] out
    stride_qkv,
    stride_cos,
    stride_sin,
    H_QK,  # H + Hkv: heads that rotate; the Hkv after them (v) are copied
    NH,  # H + 2 Hkv
    D: tl.constexpr,
    PDL: tl.constexpr,
):
    """One (row, head) per program: ``x * cos + swap_halves(x) * sin`` for q and k heads, a copy for v."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, D)
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    src = qkv_ptr + row * stride_qkv + head * D
    x = tl.load(src + offs)
    if head < H_QK:
        swapped = tl.load(src + (offs + D // 2) % D).to(tl.float32)
        c = tl.load(cos_ptr + row * stride_cos + offs).to(tl.float32)
        s = tl.load(sin_ptr + row * stride_sin + offs).to(tl.float32)
        xc = (x.to(tl.float32) * c).to(x.dtype).to(tl.float32)  # x * cos rounded first, as torch.addcmul's input
        x = (xc + swapped * s).to(x.dtype)
    tl.store(out_ptr + (row * NH + head) * D + offs, x)


@triton.jit
def decode_linear_kernel(
    x_ptr,  # [B, K]
    w_ptr,  # [N, K] contiguous
    y_ptr,  # [B, N] out
    B,
    N,
    K,
    stride_x,
    TOKENS: tl.constexpr,  # tokens per program (a power of two)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """``y = x W^T`` for a few rows of x: program (i, j) computes columns [i BLOCK_N, +BLOCK_N) of
    tokens [j TOKENS, +TOKENS), streaming its BLOCK_N weight rows once in BLOCK_K-wide tiles.

    Products accumulate elementwise in fp32 over the K loop and are summed once at the end (a fixed
    order: the same bits every run); the first weight tile is loaded before the PDL wait.
    """
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    toks = tl.program_id(1) * TOKENS + tl.arange(0, TOKENS)  # [TOKENS]
    ks = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    col_ok = cols < N
    tok_ok = toks < B
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * K  # [BLOCK_N, 1]
    x_rows = x_ptr + toks.to(tl.int64)[:, None] * stride_x  # [TOKENS, 1]
    w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & (ks[None, :] < K), other=0.0)
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    acc = tl.zeros((TOKENS, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_next = k0 + BLOCK_K + ks
        w_next = tl.load(w_rows + k_next[None, :], mask=col_ok[:, None] & (k_next[None, :] < K), other=0.0)
        x = tl.load(x_rows + (k0 + ks)[None, :], mask=tok_ok[:, None] & ((k0 + ks)[None, :] < K), other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        w = w_next
    y = tl.sum(acc, axis=2)  # [TOKENS, BLOCK_N]
    y_ptrs = y_ptr + toks.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=tok_ok[:, None] & col_ok[None, :])
