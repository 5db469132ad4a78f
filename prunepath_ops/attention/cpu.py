"""Decode attention as a vectorised PyTorch composite (the CPU backend): the batch padded and masked, no loop over B.

Legend: B sequences, Hq query heads, Hkv key/value heads, G = Hq // Hkv, D head dim, S_max cache
rows, L_b valid keys of sequence b, S the longest L_b of the batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from prunepath_ops.reference.decode_step import rotate_rows


def append_and_lengths(
    k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, k_new: Tensor | None, v_new: Tensor | None
) -> Tensor:
    """Write ``k_new``/``v_new`` at row ``cache_seqlens[b]`` in place; return the keys attended ``L [B]`` (int64).

    Same rule as the Triton kernels: ``n`` is clamped into ``[0, S_max]``; the new row is written,
    and counted, only when ``0 <= n < S_max``.
    """
    S_max = k_cache.shape[1]
    n = cache_seqlens.long()
    n_old = n.clamp(0, S_max)
    if k_new is None or S_max == 0:
        return n_old
    write = (n >= 0) & (n < S_max)  # [B]
    rows = n.clamp(0, S_max - 1)
    b = torch.arange(n.shape[0], device=n.device)
    # Sequences that skip the append rewrite their own row, so the scatter has one fixed shape.
    keep = write[:, None, None]
    k_cache[b, rows] = torch.where(keep, k_new.to(k_cache.dtype), k_cache[b, rows])
    v_cache[b, rows] = torch.where(keep, v_new.to(v_cache.dtype), v_cache[b, rows])
    return n_old + write.long()


def kv_decode_attention_cpu(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k_new: Tensor | None,
    v_new: Tensor | None,
    softmax_scale: float | None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
) -> Tensor:
    """Decode attention over the batch padded to its longest valid prefix; arguments as :func:`prunepath_ops.attention.kv_decode_attention`.

    Batched over the sequences, one step per kv head: ``k_cache[:, :S, h]`` is a strided
    ``[B, S, D]`` batch of matrices that batched GEMM reads in place (a padded
    ``[B, Hkv, S, D]`` einsum would first copy the whole cache, about 6x slower). Scores and
    softmax in fp32 (inputs upcast), keys past ``L_b`` masked to ``-inf``, zeros for ``L_b = 0``;
    NaN or Inf in rows that are not attended never reaches the output. Reads the longest length
    on the host, so it is meant for CPU tensors.

    Returns
    -------
    Tensor
        ``[B, Hq, D]``, dtype of ``q``.
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if rotary_cos is not None:
        q = rotate_rows(q, rotary_cos, rotary_sin)
        k_new = rotate_rows(k_new, rotary_cos, rotary_sin) if k_new is not None else None
    L = append_and_lengths(k_cache, v_cache, cache_seqlens, k_new, v_new)  # [B]
    S = int(L.max()) if B > 0 else 0
    if S == 0:
        return torch.zeros(B, Hq, D, dtype=q.dtype, device=q.device)
    invalid = torch.arange(S, device=q.device)[None, :] >= L[:, None]  # [B, S]
    has_keys = (L > 0)[:, None, None]  # [B, 1, 1]
    qg = q.float().reshape(B, Hkv, G, D)
    out = torch.empty(B, Hkv, G, D, dtype=torch.float32, device=q.device)
    for h in range(Hkv):
        k = k_cache[:, :S, h].float()  # [B, S, D]
        v = v_cache[:, :S, h].float()  # [B, S, D]
        scores = torch.bmm(qg[:, h], k.transpose(1, 2)).mul_(scale)  # [B, G, S]
        scores.masked_fill_(invalid[:, None, :], float("-inf"))
        # A row without keys is all -inf (softmax NaN): zeros instead; NaN from q still propagates.
        p = torch.where(has_keys, torch.softmax(scores, dim=-1), 0.0)
        o = torch.bmm(p, v)  # [B, G, D]
        if bool(o.isnan().any()):
            # p = 0 on padded rows, but 0 * NaN (or Inf) there is NaN: recompute with those rows zeroed.
            o = torch.bmm(p, v.masked_fill(invalid[:, :, None], 0.0))
        out[:, h] = o
    return out.reshape(B, Hq, D).to(q.dtype)
