"""Public routed-FFN function: :func:`sparse_ffn`."""

from __future__ import annotations

import torch
from torch import Tensor

from prunepath_ops import _pdl
from prunepath_ops.ffn import ops as _ops  # registers torch.ops.prunepath.sparse_ffn
from prunepath_ops.ffn.packing import PackedExperts


def sparse_ffn(
    x: Tensor,
    route: tuple[Tensor, Tensor, Tensor],
    packed: PackedExperts,
    *,
    path: str = "auto",
    backend: str = "auto",
) -> Tensor:
    """Routed expert FFN reading and computing only the selected experts.

    ``y[t] = sum_{j < num_active[t]} gates[t, j] * FFN_{expert_ids[t, j]}(x[t]) (+ b_out)``
    (SPEC.md sections 1 and 3), accumulated in fp32, deterministic (no float
    atomics), without host synchronisation on the Triton path (CUDA-graph capturable).

    Parameters
    ----------
    x : Tensor
        ``[..., d]`` hidden states, float32, float16 or bfloat16 (the weights' dtype).
    route : Route or tuple
        ``(expert_ids [T, K] int32, gates [T, K] float32, num_active [T] int32)``
        with T the number of rows of ``x``, as :func:`prunepath_ops.topp_route`
        returns it. Slots ``j >= num_active[t]`` are never read.
    packed : PackedExperts
        Weights from :func:`prunepath_ops.pack_experts`, on the device of ``x``.
    path : {"auto", "decode", "prefill"}
        ``auto`` takes the decode kernels (weights read once for the batch, tuned
        for bandwidth) up to 16 tokens and the grouped-GEMM prefill kernels above.
    backend : {"auto", "cuda", "triton", "cpu", "torch", "reference"}
        ``auto``: on CUDA the ``cuda`` kernel for one token on the decode path
        and Triton otherwise, ``cpu`` on the CPU. ``cuda`` is the CUDA kernel
        of ``torch.ops.prunepath.expert_ffn`` (its blocks split each token's
        selected neurons evenly over the SMs; for one token it beats the Triton
        decode kernels at low fractions and ties with them above,
        bench/results/sparse_ffn_cuda_llama3_8b.md; for a batch every token
        reads its own experts). ``cpu`` is the C++ kernel (parallel over experts
        and output columns, fp32 accumulation, deterministic); ``torch`` the
        sparse PyTorch composite (CPU); ``triton`` on the CPU runs under
        ``TRITON_INTERPRET=1`` only; ``reference`` is the expert loop of
        :func:`prunepath_ops.reference.sparse_ffn`.

    Returns
    -------
    Tensor
        ``[..., d]`` in the dtype of ``x``.

    Examples
    --------
    >>> import torch, prunepath_ops
    >>> F, d, S = 64, 32, 16
    >>> packed = prunepath_ops.pack_experts(torch.randn(F, d), torch.randn(d, F), S, w_up=torch.randn(F, d))
    >>> x = torch.randn(3, d)
    >>> route = prunepath_ops.topp_route(torch.randn(3, F // S), 0.5)
    >>> prunepath_ops.sparse_ffn(x, route, packed).shape
    torch.Size([3, 32])
    """
    expert_ids, gates, num_active = route
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    _ops.check_path_backend(path, backend, x2.shape[0])
    chosen = _ops.resolve_backend(backend, x.device, x2.shape[0], path)
    if chosen in ("cpu", "cuda"):
        # The C++/CUDA kernel op directly: one opaque node for torch.compile as well, without the
        # Python dispatch of prunepath::sparse_ffn (tens of microseconds, a lot at batch 1).
        pdl = chosen == "cuda" and _pdl.use_pdl(x.device)
        y = torch.ops.prunepath.expert_ffn(
            x2, expert_ids, gates, num_active,
            packed.w_in, packed.b_in, packed.w_down, packed.b_out, packed.gated, packed.act, pdl,
        )  # fmt: skip
        return y.view(shape)
    y = torch.ops.prunepath.sparse_ffn(
        x2, expert_ids, gates, num_active,
        packed.w_in, packed.b_in, packed.w_down, packed.b_out, packed.gated, packed.act, path, backend,
    )  # fmt: skip
    return y.view(shape)
