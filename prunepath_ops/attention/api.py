"""Public decode-attention function: :func:`kv_decode_attention`.

Legend: B sequences, Hq query heads, Hkv key/value heads, D head dim, S_max cache rows,
L_b keys attended by sequence b.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunepath_ops.attention import ops as _ops  # noqa: F401  (registers torch.ops.prunepath.kv_decode_attention)


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
    backend: str = "auto",
) -> Tensor:
    """Attention of one new query token per sequence over its KV cache (decode), appending the new key/value in place.

    ``out[b, h] = softmax(scale * q[b, h] K_b^T) V_b`` where ``K_b, V_b`` are the first ``L_b``
    rows of kv head ``h // (Hq // Hkv)`` of sequence b (grouped-query attention). Softmax and
    accumulation in fp32; deterministic (bitwise equal across runs); on CUDA no host
    synchronisation (lengths are read on the device), so the call can be captured in a CUDA graph
    and replayed with other values in ``cache_seqlens``. Same semantics as
    :func:`prunepath_ops.reference.kv_decode_attention` and flash-attn's ``flash_attn_with_kvcache``
    for one query token.

    On CUDA the key axis is cut into splits merged in a fixed order. By default each sequence cuts
    its own keys over a number of splits fixed by ``S_max`` and the batch size; for B > 1 and caches
    longer than 2048 rows the cut follows the whole batch's lengths instead
    (``triton_attention.SPLIT_BY_LENGTH``), so a sequence's last bits may change with the other
    sequences' lengths (not batch-invariant; set ``SPLIT_BY_LENGTH = False`` for the per-sequence
    cut). The same inputs give the same bits.

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, D]`` float32, float16 or bfloat16; D one of 16, 32, 64, 128, 256. Last dim contiguous.
    k_cache, v_cache : Tensor
        ``[B, S_max, Hkv, D]``, dtype and device of ``q``, Hq a multiple of Hkv. Last dim
        contiguous; other strides are free (a slice of a larger cache works). Rows at and past
        ``L_b`` are never read: they may hold anything, NaN included.
    cache_seqlens : Tensor
        ``[B]`` int32 on the device of ``q``: valid cache rows per sequence before the append.
        Not modified. Lengths are not checked on the host (that would synchronise); on the
        device a length ``n`` outside ``[0, S_max]`` is clamped into it.
    k_new, v_new : Tensor, optional
        ``[B, Hkv, D]``, both or neither. Written **in place** into ``k_cache[b, n]`` and
        ``v_cache[b, n]`` with ``n = cache_seqlens[b]``; sequence b then attends to ``n + 1``
        keys, the new one last. When ``n`` lies outside ``[0, S_max - 1]`` nothing is written
        for that sequence and it attends to the clamped ``n`` cached keys only (no row out of
        bounds is ever read or written). No other cache row changes.
    softmax_scale : float, optional
        Multiplies the scores; default ``1 / sqrt(D)``.
    rotary_cos, rotary_sin : Tensor, optional
        ``[B, D]``, both or neither, dtype and device of ``q``, last dim contiguous: the rotary
        embedding of each sequence's position (``cos``, and ``sin`` with its first half negated:
        :func:`prunepath_ops.models.llama.rope_tables` rows). ``q`` and ``k_new`` are then
        passed unrotated and rotated inside the kernel (``x * cos + swap_halves(x) * sin``, the
        same bits as :func:`prunepath_ops.decode_step.rope_qkv` before the call), so the appended
        cache row holds the rotated key; one launch less per layer in a decode step (as
        flash-attn's ``flash_attn_with_kvcache(rotary_cos=...)``, non-interleaved).
    backend : {"auto", "triton", "cpu"}
        ``auto``: the Triton split-KV kernels (flash-decoding) on CUDA, the vectorised PyTorch
        composite on the CPU. ``triton`` on CPU tensors runs the kernels under
        ``TRITON_INTERPRET=1`` only (for tests).

    Returns
    -------
    Tensor
        ``[B, Hq, D]`` contiguous, dtype of ``q``. A sequence with ``L_b = 0`` gets zeros.
        NaN or Inf in ``q`` or in the attended rows propagates to the affected heads' outputs
        (Inf scores may turn into NaN); values in rows that are not attended never do.

    Raises
    ------
    ValueError, TypeError
        Before any kernel runs, on a wrong rank, shape, dtype, device or layout, naming the argument.

    Examples
    --------
    >>> import torch
    >>> from prunepath_ops.attention import kv_decode_attention
    >>> B, Hq, Hkv, D, S_max = 2, 8, 2, 64, 32
    >>> q = torch.randn(B, Hq, D)
    >>> k_cache, v_cache = torch.zeros(B, S_max, Hkv, D), torch.zeros(B, S_max, Hkv, D)
    >>> lens = torch.tensor([5, 0], dtype=torch.int32)
    >>> k_new, v_new = torch.randn(B, Hkv, D), torch.randn(B, Hkv, D)
    >>> out = kv_decode_attention(q, k_cache, v_cache, lens, k_new, v_new)
    >>> out.shape, bool((k_cache[1, 0] == k_new[1]).all())
    (torch.Size([2, 8, 64]), True)
    >>> torch.allclose(out[1], v_new[1].repeat_interleave(Hq // Hkv, dim=0))  # one key: its value
    True
    """
    return torch.ops.prunepath.kv_decode_attention(
        q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, rotary_cos, rotary_sin, backend
    )
