"""``kv_decode_attention`` through torch's bundled FlashAttention-2 (``backend="flash"``).

Legend: B sequences, Hq query heads, Hkv key/value heads, D head dim, S_max cache rows, L_b keys
attended by sequence b.

The caches are read in place by FlashAttention's varlen forward: the B queries are B segments of
one token (``cu_seqlens_q = [0, 1, ..., B]``), the caches B segments of ``S_max`` rows
(``cu_seqlens_k = b * S_max``, static) of which ``seqused_k = L_b`` are used; FlashAttention swaps
the G query heads of a kv head into its M dimension and splits long keys over programs itself.
One Triton launch before it appends the new rows and clamps the lengths
(``append_and_lengths_kernel``). CUDA only, fp16/bf16, caches whose (B, S_max) dims merge into
one (a contiguous cache, or a slice of its heads or features; not a slice of its rows). No host
synchronisation; deterministic (FlashAttention's split merge has a fixed order).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from prunepath_ops.attention import kernels

_OP = "kv_decode_attention"


def check_flash_args(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
    """Raise a ValueError naming what ``backend="flash"`` cannot take (after the op's common checks)."""
    if q.device.type != "cuda":
        raise ValueError(f"{_OP}: backend='flash' needs CUDA tensors; got {q.device}")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{_OP}: backend='flash' takes float16 or bfloat16; got {q.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        B, S_max = t.shape[:2]
        if B > 1 and t.stride(0) != S_max * t.stride(1):
            raise ValueError(
                f"{_OP}: backend='flash' needs {name}'s batch and row dims to merge (stride(0) == S_max * "
                f"stride(1)); got strides {t.stride()}"
            )
        if B * S_max >= 2**31:
            raise ValueError(f"{_OP}: backend='flash' needs B * S_max < 2^31; got {B} * {S_max}")


_segment_cache: dict[tuple[int, int, torch.device], tuple[Tensor, Tensor]] = {}


def _segments(B: int, S_max: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(cu_seqlens_q, cu_seqlens_k) int32 ``[B + 1]``, static: made once per shape.

    Not kept when first made during a CUDA-graph capture (the memory would belong to that graph's
    pool); the capture then records the two small kernels instead.
    """
    key = (B, S_max, device)
    if key in _segment_cache:
        return _segment_cache[key]
    cu_q = torch.arange(B + 1, dtype=torch.int32, device=device)
    made = (cu_q, cu_q * S_max)
    if not torch.cuda.is_current_stream_capturing():
        _segment_cache[key] = made
    return made


def append_and_lengths(
    k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, k_new: Tensor | None, v_new: Tensor | None
) -> Tensor:
    """Write ``k_new``/``v_new`` at row ``cache_seqlens[b]`` (when inside the cache) and return the attended lengths.

    Returns
    -------
    Tensor
        ``[B]`` int32: ``clamp(n, 0, S_max) + (0 <= n < S_max)`` with ``k_new``, ``clamp(n, 0, S_max)``
        without (the rule of :func:`prunepath_ops.attention.kv_decode_attention`).
    """
    B, S_max, Hkv, D = k_cache.shape
    lens = torch.empty(B, dtype=torch.int32, device=k_cache.device)
    has_new = k_new is not None
    nk = (k_new.stride(0), k_new.stride(1)) if has_new else (0, 0)
    nv = (v_new.stride(0), v_new.stride(1)) if has_new else (0, 0)
    kernels.append_and_lengths_kernel[(B,)](
        k_cache, v_cache, k_new if has_new else k_cache, v_new if has_new else v_cache, cache_seqlens, lens,
        S_max, Hkv, cache_seqlens.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *nk, *nv, D=D, H_PAD=triton.next_power_of_2(Hkv), HAS_NEW=has_new,
    )  # fmt: skip
    return lens


def kv_decode_attention_flash(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k_new: Tensor | None,
    v_new: Tensor | None,
    softmax_scale: float | None,
) -> Tensor:
    """Append, then FlashAttention-2's varlen forward on the caches in place; arguments as the op's.

    Returns
    -------
    Tensor
        ``[B, Hq, D]``, dtype of ``q`` (FlashAttention writes zeros for ``L_b = 0``).
    """
    B, Hq, D = q.shape
    _, S_max, Hkv, _ = k_cache.shape
    with torch.cuda.device(q.device):
        lens = append_and_lengths(k_cache, v_cache, cache_seqlens, k_new, v_new)
        cu_q, cu_k = _segments(B, S_max, q.device)
        k = k_cache.as_strided((B * S_max, Hkv, D), (k_cache.stride(1), k_cache.stride(2), 1))
        v = v_cache.as_strided((B * S_max, Hkv, D), (v_cache.stride(1), v_cache.stride(2), 1))
        scale = softmax_scale if softmax_scale is not None else D**-0.5
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, 1, S_max, 0.0, False, False, scale=scale, seqused_k=lens
        )[0]
    return out if out.is_contiguous() else out.contiguous()
