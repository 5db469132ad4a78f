"""Public functions of the decode step's ops: :func:`add_rms_norm`, :func:`rope_qkv`, :func:`decode_linear`.

Legend: B rows (tokens), d hidden, H query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunepath_ops.decode_step import ops as _ops  # noqa: F401  (registers the ops)


def add_rms_norm(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float = 1e-5, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Residual add fused with the next RMSNorm: ``h = x + residual``, ``y = weight * rms_norm(h)``.

    The numerics of the Llama model (and Hugging Face): the add in the input dtype, the norm in fp32
    (``h * rsqrt(mean(h^2) + eps)``), cast back to the dtype before the weight multiply. One launch
    where PyTorch takes five at decode (add, cast up, normalise, cast down, times the weight).

    Parameters
    ----------
    x : Tensor
        ``[B, d]`` float32, float16 or bfloat16; last dim contiguous.
    residual : Tensor or None
        ``[B, d]``, dtype and device of ``x``; None: ``h = x``.
    weight : Tensor
        ``[d]``, dtype of ``x``.
    eps : float
        Added to the mean square (non-negative).
    backend : {"auto", "triton", "cpu"}
        ``auto``: Triton on CUDA, the PyTorch reference (:func:`prunepath_ops.reference.add_rms_norm`)
        on the CPU; ``triton`` on CPU tensors only under ``TRITON_INTERPRET=1``.

    Returns
    -------
    (Tensor, Tensor)
        ``y`` and ``h``, ``[B, d]`` contiguous in the dtype of ``x`` (new tensors). Non-finite values
        stay in their row, as in PyTorch: a NaN in a row of ``h`` makes the whole row of ``y`` NaN;
        an Inf makes the mean square Inf, so its own element of ``y`` is NaN (Inf x 0) and the row's
        finite elements are 0.

    Raises
    ------
    ValueError, TypeError
        Before any kernel runs, on a wrong shape, dtype, device or layout, naming the argument.

    Examples
    --------
    >>> import torch
    >>> from prunepath_ops.decode_step import add_rms_norm
    >>> x, r, w = torch.randn(2, 8), torch.randn(2, 8), torch.ones(8)
    >>> y, h = add_rms_norm(x, r, w)
    >>> torch.equal(h, x + r), bool(torch.allclose(y.pow(2).mean(-1), torch.ones(2), atol=1e-4))
    (True, True)
    """
    return torch.ops.prunepath.add_rms_norm(x, residual, weight, float(eps), backend)


def rope_qkv(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int, *, backend: str = "auto") -> Tensor:
    """Rotary position embedding of the q and k heads of a fused q/k/v projection, in one launch.

    ``out[b, h] = x * cos[b] + swap_halves(x) * sin[b]`` for the H query and Hkv key heads (Hugging
    Face's ``rotate_half`` convention with the sign folded into ``sin``; ``x * cos`` is rounded to
    the dtype first, as ``torch.addcmul(x * cos, ...)`` does), the Hkv value heads copied.

    Parameters
    ----------
    qkv : Tensor
        ``[B, (H + 2 Hkv) D]``, the output of ``x @ W_qkv^T``: q heads, then k, then v. float32,
        float16 or bfloat16, last dim contiguous.
    cos, sin : Tensor
        ``[B, D]`` in the dtype of ``qkv``: row b's position's ``cos`` and signed ``sin`` (first
        half negated; :func:`prunepath_ops.models.llama.rope_tables`). D a power of two.
    n_heads, n_kv_heads : int
        H and Hkv.
    backend : {"auto", "triton", "cpu"}
        As :func:`add_rms_norm`.

    Returns
    -------
    Tensor
        ``[B, H + 2 Hkv, D]`` contiguous (new): ``out[:, :H]`` are q, ``out[:, H:H + Hkv]`` k,
        ``out[:, H + Hkv:]`` v. NaN/Inf stay within their head's row.

    Examples
    --------
    >>> import torch
    >>> from prunepath_ops.decode_step import rope_qkv
    >>> qkv = torch.randn(1, (4 + 2 * 2) * 16)
    >>> cos, sin = torch.ones(1, 16), torch.zeros(1, 16)  # position 0: the identity
    >>> torch.equal(rope_qkv(qkv, cos, sin, 4, 2).flatten(1), qkv)
    True
    """
    return torch.ops.prunepath.rope_qkv(qkv, cos, sin, n_heads, n_kv_heads, backend)


def decode_linear(x: Tensor, weight: Tensor, *, backend: str = "auto") -> Tensor:
    """``F.linear(x, weight)`` (no bias) for the few rows of a decode step, as one GEMV launch.

    At batch 1 a projection is a stream of its weight: the attention block's q/k/v and output
    projections of a Llama-3-8B layer are 50 MB and 34 MB. The kernels read each weight row once per
    call, accumulate in fp32 in a fixed order (deterministic) and, with programmatic dependent launch
    (sm_90+), start streaming the weight while the previous kernel still runs, since only ``x``
    depends on it. No split-K reduction launch. Two GPU implementations: the CUDA kernel of
    ``torch.ops.prunepath.decode_gemv`` (each warp two whole weight rows, 16-byte streaming loads;
    ``csrc/include/prunepath/decode_gemv.cuh``) and a Triton kernel (16 rows per program).

    Parameters
    ----------
    x : Tensor
        ``[B, K]`` float32, float16 or bfloat16, last dim contiguous; meant for B <= 16 (tokens are
        taken 4 per program; above, cuBLAS through ``F.linear`` is the better choice).
    weight : Tensor
        ``[N, K]`` contiguous, dtype and device of ``x`` (an ``nn.Linear`` weight).
    backend : {"auto", "cuda", "triton", "cpu"}
        ``auto``: on CUDA the CUDA kernel when the package was built with CUDA, else Triton;
        ``F.linear`` (:func:`prunepath_ops.reference.decode_linear`) on the CPU. ``triton`` on CPU
        tensors only under ``TRITON_INTERPRET=1``; ``cuda`` needs CUDA tensors and a CUDA build.

    Returns
    -------
    Tensor
        ``[B, N]`` in the dtype of ``x``: fp32 sums rounded once (a summation order of its own, so
        values may differ from cuBLAS's in the last bit). NaN/inf propagate as in a matmul.

    Raises
    ------
    ValueError, TypeError
        Before any kernel runs, on a wrong shape, dtype, device or layout, naming the argument.

    Examples
    --------
    >>> import torch
    >>> from prunepath_ops.decode_step import decode_linear
    >>> x, w = torch.randn(1, 64), torch.randn(96, 64)
    >>> torch.allclose(decode_linear(x, w), x @ w.T, atol=1e-5)
    True
    """
    return torch.ops.prunepath.decode_linear(x, weight, backend)
