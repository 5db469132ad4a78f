"""The elementwise work of a decode step: readable semantics of ``prunepath::add_rms_norm`` and ``prunepath::rope_qkv``.

Legend: B rows (tokens), d hidden, H query heads, Hkv key/value heads, D head dim.
Both follow the Llama model of :mod:`prunepath_ops.models.llama` (Hugging Face numerics): the
residual add in the activations' dtype, RMSNorm in fp32 cast back before the weight, RoPE in the
activations' dtype with Hugging Face's ``rotate_half`` convention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(weight * rms_norm(h), h)`` with ``h = x + residual`` (``h = x`` without a residual).

    Parameters
    ----------
    x, residual : Tensor
        ``[B, d]``, same dtype.
    weight : Tensor
        ``[d]``, dtype of ``x``.
    eps : float

    Returns
    -------
    (Tensor, Tensor)
        ``y [B, d]`` = ``weight * (h.float() * rsqrt(mean(h.float()^2) + eps)).to(dtype)`` and ``h [B, d]``.
    """
    h = x if residual is None else x + residual
    y = F.rms_norm(h.float(), (h.shape[-1],), eps=eps)
    return weight * y.to(h.dtype), h


def rotate_rows(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE of one position per row: ``x [B, H, D]`` by ``cos, sin [B, D]`` (``sin`` signed, first half negated).

    Also ``x [B, T, H, D]`` with tables ``[T, D]`` (one position per token; the tables broadcast as
    ``[T, 1, D]``), as :func:`prunepath_ops.models.llama.apply_rope` calls it for prefill.

    ``x * cos + swap_halves(x) * sin`` with ``x * cos`` rounded to the dtype first (as
    ``torch.addcmul(x * cos, ...)``, Hugging Face's ``rotate_half`` convention); ``[B, H, D]``,
    dtype of ``x``.
    """
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos[:, None, :], swapped, sin[:, None, :])


def rope_qkv(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int) -> Tensor:
    """Rotary embedding of the q and k heads of a fused projection; v copied.

    Parameters
    ----------
    qkv : Tensor
        ``[B, (H + 2 Hkv) D]``: q heads, then k heads, then v heads (``x @ W_qkv^T``).
    cos, sin : Tensor
        ``[B, D]`` in the dtype of ``qkv``: each row's position's ``cos`` and signed ``sin``
        (first half negated, :func:`prunepath_ops.models.llama.rope_tables`).
    n_heads, n_kv_heads : int

    Returns
    -------
    Tensor
        ``[B, H + 2 Hkv, D]`` contiguous: ``x * cos + swap_halves(x) * sin`` for the q and k
        heads (``x * cos`` rounded to the dtype first, as ``torch.addcmul(x * cos, ...)``), v as is.
    """
    B, D = qkv.shape[0], cos.shape[-1]
    heads = qkv.view(B, n_heads + 2 * n_kv_heads, D)  # [B, H + 2 Hkv, D]
    rotated = rotate_rows(heads[:, : n_heads + n_kv_heads], cos, sin)
    return torch.cat((rotated, heads[:, n_heads + n_kv_heads :]), dim=1).contiguous()


def decode_linear(x: Tensor, weight: Tensor) -> Tensor:
    """Reference of :func:`prunepath_ops.decode_step.decode_linear`: ``x [B, K] @ weight [N, K]^T`` -> ``[B, N]``."""
    return F.linear(x, weight)
