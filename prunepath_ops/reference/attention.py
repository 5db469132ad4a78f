"""Decode attention with a KV cache: the readable semantics of ``prunepath::kv_decode_attention``.

Legend: B sequences, Hq query heads, Hkv key/value heads (Hq a multiple of Hkv), D head dim,
S_max cache length, L_b the number of valid keys of sequence b.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from prunepath_ops.reference.decode_step import rotate_rows


def kv_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    *,
    softmax_scale: float | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
) -> Tensor:
    """One query token per sequence attending to its valid cache prefix (loop over sequences).

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, D]``.
    k_cache, v_cache : Tensor
        ``[B, S_max, Hkv, D]``; rows ``< cache_seqlens[b]`` of sequence b are valid.
    cache_seqlens : Tensor
        ``[B]`` int32, the number of valid cache rows per sequence before the append. A length
        ``n`` outside ``[0, S_max]`` is clamped into it (the op's rule, see
        :func:`prunepath_ops.attention.kv_decode_attention`).
    k_new, v_new : Tensor, optional
        ``[B, Hkv, D]``: written **in place** at row ``n = cache_seqlens[b]`` of each sequence
        when ``0 <= n < S_max``, which then attends to ``n + 1`` keys (otherwise nothing is
        written and it attends to the clamped ``n``). ``cache_seqlens`` is not changed.
    softmax_scale : float, optional
        Default ``1 / sqrt(D)``.
    rotary_cos, rotary_sin : Tensor, optional
        ``[B, D]``, both or neither: RoPE rows of each sequence's position (``sin`` signed, first
        half negated); ``q`` and ``k_new`` are rotated by them first
        (:func:`prunepath_ops.reference.decode_step.rotate_rows`), as ``rope_qkv`` would.

    Returns
    -------
    Tensor
        ``[B, Hq, D]`` in the dtype of ``q``; softmax and accumulation in fp32. Query head h
        reads kv head ``h // (Hq // Hkv)``. A sequence with no valid key gets zeros.

    Examples
    --------
    >>> import torch
    >>> q, k, v = torch.randn(2, 4, 8), torch.randn(2, 16, 2, 8), torch.randn(2, 16, 2, 8)
    >>> kv_decode_attention(q, k, v, torch.tensor([3, 16], dtype=torch.int32)).shape
    torch.Size([2, 4, 8])
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    S_max = k_cache.shape[1]
    if rotary_cos is not None:
        q = rotate_rows(q, rotary_cos, rotary_sin)
        k_new = rotate_rows(k_new, rotary_cos, rotary_sin) if k_new is not None else None
    requested = cache_seqlens.long().tolist()
    lens = [min(max(n, 0), S_max) for n in requested]
    if k_new is not None:
        for b, n in enumerate(requested):
            if 0 <= n < S_max:  # a row outside the cache is not written, and not attended
                k_cache[b, n] = k_new[b].to(k_cache.dtype)
                v_cache[b, n] = v_new[b].to(v_cache.dtype)
                lens[b] = n + 1
    out = torch.zeros(B, Hq, D, dtype=torch.float32, device=q.device)
    group = Hq // Hkv
    for b in range(B):
        n = lens[b]
        if n == 0:
            continue
        k = k_cache[b, :n].float().repeat_interleave(group, dim=1)  # [L_b, Hq, D]
        v = v_cache[b, :n].float().repeat_interleave(group, dim=1)  # [L_b, Hq, D]
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale  # [Hq, L_b]
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v)  # [Hq, D]
    return out.to(q.dtype)
