"""Registration of ``torch.ops.prunepath.kv_decode_attention``: argument checks, backend choice, fake kernel.

Legend: B sequences, Hq query heads, Hkv key/value heads, D head dim, S_max cache rows.
The op mutates ``k_cache`` and ``v_cache`` (schema ``Tensor(a!)``) when ``k_new``/``v_new`` are
given, so ``torch.compile`` functionalises the append instead of dropping it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunepath_ops._backend import check_backend
from prunepath_ops._backend import resolve_backend as _resolve_backend
from prunepath_ops._library import define_op
from prunepath_ops.attention.cpu import kv_decode_attention_cpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Head dims the Triton kernels compile for (``tl.arange`` needs a power of two); every backend
#: accepts the same set so that code which runs on the CPU also runs on the GPU.
HEAD_DIMS = (16, 32, 64, 128, 256)

_OP = "kv_decode_attention"


def _check_tensor(name: str, t: Tensor, rank: int, layout: str, dtype: torch.dtype, device: torch.device) -> None:
    if t.dim() != rank:
        raise ValueError(f"{_OP}: {name} must be {rank}-D {layout}; got shape {list(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{_OP}: {name} must have the dtype of q ({dtype}); got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{_OP}: {name} is on {t.device} but q is on {device}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{_OP}: {name} must be contiguous in its last dim (stride 1); got strides {t.stride()}")


def _check_pair(first: tuple[str, Tensor | None], second: tuple[str, Tensor | None], layout: str,
                shape: tuple[int, ...], q: Tensor) -> None:  # fmt: skip
    """Two optional tensors given together or not at all, each of ``shape`` with q's dtype and device."""
    (name_a, a), (name_b, b) = first, second
    if (a is None) != (b is None):
        given, missing = (name_a, name_b) if b is None else (name_b, name_a)
        raise ValueError(f"{_OP}: {given} was given without {missing}; pass both or neither")
    if a is None:
        return
    for name, t in (first, second):
        _check_tensor(name, t, len(shape), layout, q.dtype, q.device)
        if tuple(t.shape) != shape:
            raise ValueError(f"{_OP}: {name} must have shape {layout} = {list(shape)}; got {list(t.shape)}")


def check_kv_decode_attention_args(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k_new: Tensor | None,
    v_new: Tensor | None,
    softmax_scale: float | None,
    backend: str,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
) -> None:
    """Raise on inconsistent shapes, dtypes, devices or layouts (shared by the real and the fake kernel).

    Only static properties are checked: lengths stay on the device (see the op's docstring for
    the rule applied to lengths outside ``[0, S_max]``).
    """
    check_backend(_OP, backend)
    if q.dim() != 3:
        raise ValueError(f"{_OP}: q must be 3-D [B, Hq, D]; got shape {list(q.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"{_OP}: q must be float32, float16 or bfloat16; got {q.dtype}")
    B, Hq, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"{_OP}: head dim D must be one of {HEAD_DIMS}; got q of shape {list(q.shape)}")
    if q.stride(-1) != 1:
        raise ValueError(f"{_OP}: q must be contiguous in its last dim (stride 1); got strides {q.stride()}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, t, 4, "[B, S_max, Hkv, D]", q.dtype, q.device)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{_OP}: k_cache and v_cache must have the same shape; got {list(k_cache.shape)} and {list(v_cache.shape)}"
        )
    _, S_max, Hkv, Dk = k_cache.shape
    if k_cache.shape[0] != B or Dk != D:
        raise ValueError(
            f"{_OP}: k_cache must have shape [B={B}, S_max, Hkv, D={D}] to match q {list(q.shape)}; "
            f"got {list(k_cache.shape)}"
        )
    if Hkv < 1 or Hq < 1 or Hq % Hkv != 0:
        raise ValueError(f"{_OP}: Hq = {Hq} query heads must be a positive multiple of Hkv = {Hkv} kv heads")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"{_OP}: cache_seqlens must be int32; got {cache_seqlens.dtype}")
    if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != B:
        raise ValueError(f"{_OP}: cache_seqlens must have shape [B] = [{B}]; got {list(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"{_OP}: cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    _check_pair(("k_new", k_new), ("v_new", v_new), "[B, Hkv, D]", (B, Hkv, D), q)
    if softmax_scale is not None and softmax_scale != softmax_scale:
        raise ValueError(f"{_OP}: softmax_scale must be a number; got {softmax_scale}")
    _check_pair(("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin), "[B, D]", (B, D), q)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: Triton on CUDA, the PyTorch composite on the CPU (see :func:`prunepath_ops._backend.resolve_backend`)."""
    return _resolve_backend(_OP, backend, device)


def kv_decode_attention_op(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k_new: Tensor | None,
    v_new: Tensor | None,
    softmax_scale: float | None,
    rotary_cos: Tensor | None,
    rotary_sin: Tensor | None,
    backend: str,
) -> Tensor:
    """Decode attention over a KV cache with an in-place append; see :func:`prunepath_ops.attention.kv_decode_attention`."""
    args = (q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale)
    rotary = {"rotary_cos": rotary_cos, "rotary_sin": rotary_sin}
    check_kv_decode_attention_args(*args, backend, **rotary)
    if resolve_backend(backend, q.device) == "cpu":
        return kv_decode_attention_cpu(*args, **rotary)
    from prunepath_ops.attention.triton_attention import kv_decode_attention_triton

    return kv_decode_attention_triton(*args, **rotary)


def _kv_decode_attention_fake(
    q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, rotary_cos, rotary_sin, backend
):  # fmt: skip
    check_kv_decode_attention_args(
        q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, backend, rotary_cos, rotary_sin
    )
    return torch.empty_like(q, memory_format=torch.contiguous_format)


define_op(
    "kv_decode_attention(Tensor q, Tensor(a1!) k_cache, Tensor(a2!) v_cache, Tensor cache_seqlens, "
    "Tensor? k_new, Tensor? v_new, float? softmax_scale, Tensor? rotary_cos, Tensor? rotary_sin, "
    "str backend) -> Tensor",
    kv_decode_attention_op,
    _kv_decode_attention_fake,
)
