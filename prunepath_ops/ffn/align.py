"""Public wrapper of the token-to-expert alignment op (the variable-k ``moe_align_block_size``)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from prunepath_ops.reference.sparse_ffn import align_bounds


class Alignment(NamedTuple):
    """(token, slot) pairs grouped by expert, each group padded to ``block_m`` rows.

    Attributes
    ----------
    sorted_pairs : Tensor
        ``[P_max]`` int32 flat slot indices ``t * K + j``: experts in increasing
        order, tokens in increasing order within an expert, -1 in padding rows.
    block_expert : Tensor
        ``[B_max]`` int32 expert of each ``block_m``-row block, -1 past the last used block.
    expert_offsets : Tensor
        ``[E + 1]`` int32 padded first row of each expert; ``expert_offsets[E]`` rows are used.
    expert_counts : Tensor
        ``[E]`` int32 selected pairs per expert.
    """

    sorted_pairs: Tensor
    block_expert: Tensor
    expert_offsets: Tensor
    expert_counts: Tensor


def align_experts(expert_ids: Tensor, num_active: Tensor, num_experts: int, block_m: int) -> Alignment:
    """Group a routing's (token, slot) pairs by expert for a grouped GEMM, without host synchronisation.

    Output sizes are static upper bounds (see
    :func:`prunepath_ops.reference.sparse_ffn.align_bounds`): ``B_max =
    (T*K + min(E, T*K) * (block_m - 1)) // block_m`` blocks of ``block_m`` rows.
    Only slots ``j < num_active[t]`` are read (``num_active`` is clamped to ``[0, K]``).
    The order within an expert is token order, so the result is deterministic.

    Parameters
    ----------
    expert_ids : Tensor
        ``[T, K]`` int32, as :func:`prunepath_ops.topp_route` returns it.
    num_active : Tensor
        ``[T]`` int32.
    num_experts : int
        E. Active slots must hold ids in ``[0, E)``: the CPU kernel raises on
        others, the CUDA kernel (which cannot raise without a sync) drops them.
    block_m : int
        Rows per block, >= 1.

    Returns
    -------
    Alignment

    Examples
    --------
    >>> import torch, prunepath_ops
    >>> ids = torch.tensor([[1, 0], [1, -1]], dtype=torch.int32)
    >>> a = prunepath_ops.align_experts(ids, torch.tensor([2, 1], dtype=torch.int32), 2, 2)
    >>> a.sorted_pairs.tolist(), a.block_expert.tolist(), a.expert_offsets.tolist()
    ([1, -1, 0, 2, -1, -1], [0, 1, -1], [0, 2, 4])
    """
    return Alignment(*torch.ops.prunepath.align_experts(expert_ids, num_active, num_experts, block_m))


def align_sizes(num_tokens: int, k: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """``(P_max, B_max)``: the static output sizes of :func:`align_experts`."""
    return align_bounds(num_tokens * k, num_experts, block_m)


@torch.library.register_fake("prunepath::align_experts")
def _align_experts_fake(expert_ids, num_active, num_experts, block_m):
    if expert_ids.dim() != 2 or expert_ids.dtype != torch.int32 or num_active.dtype != torch.int32:
        raise ValueError("align_experts: expert_ids must be int32 [T, K] and num_active int32 [T]")
    if num_active.dim() != 1 or num_active.shape[0] != expert_ids.shape[0]:
        raise ValueError(f"align_experts: num_active must have shape [T] = [{expert_ids.shape[0]}]")
    if num_experts < 1 or not 1 <= block_m <= 4096:
        raise ValueError("align_experts: num_experts must be >= 1 and block_m in [1, 4096]")
    T, K = expert_ids.shape
    p_max, b_max = align_bounds(T * K, num_experts, block_m)
    new = expert_ids.new_empty
    return new((p_max,)), new((b_max,)), new((num_experts + 1,)), new((num_experts,))
