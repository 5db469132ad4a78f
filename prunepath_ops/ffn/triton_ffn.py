"""Launchers of the Triton routed-FFN kernels: check shapes, allocate, pick tiles, launch.

Legend: T tokens, E experts, S expert width, d hidden, F = E * S, K slots per token.
Nothing here synchronises with the host: grids are sized from static bounds and the
kernels read the amount of work from the device.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from prunepath_ops.ffn import kernels
from prunepath_ops.ffn._env import DECODE_MAX_TOKENS
from prunepath_ops.ffn._env import interpreting as _interpreting
from prunepath_ops.reference.sparse_ffn import align_bounds
from prunepath_ops.reference.sparse_ffn import align_experts as align_experts_reference


def _align(expert_ids: Tensor, num_active: Tensor, E: int, block_m: int):
    op = getattr(torch.ops.prunepath, "align_experts", None)
    key = "CUDA" if expert_ids.is_cuda else "CPU"
    if op is not None and torch._C._dispatch_has_kernel_for_dispatch_key("prunepath::align_experts", key):
        return op(expert_ids, num_active, E, block_m)
    return align_experts_reference(expert_ids, num_active, E, block_m)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 products (TF32 would cost ~1e-3 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def gate_matrix_t(expert_ids: Tensor, gates: Tensor, num_active: Tensor, E: int) -> Tensor:
    """``[E, T]`` fp32: gate of (token t, expert e) where t selected e among its active slots, else 0."""
    T, K = expert_ids.shape
    valid = torch.arange(K, device=expert_ids.device)[None, :] < num_active.long().clamp(0, K)[:, None]  # [T, K]
    e = torch.where(valid, expert_ids.long(), torch.full_like(expert_ids, E, dtype=torch.long))
    flat = e * T + torch.arange(T, device=expert_ids.device)[:, None]  # [T, K]
    g = torch.where(valid, gates.float(), torch.zeros_like(gates, dtype=torch.float32))
    # Row E collects the inactive slots and is dropped; active slots of a token hold distinct experts.
    out = torch.zeros((E + 1) * T, dtype=torch.float32, device=expert_ids.device)
    return out.scatter_(0, flat.flatten(), g.flatten()).view(E + 1, T)[:E]


def sparse_ffn_prefill_triton(
    x: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    num_active: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_down: Tensor,
    b_out: Tensor | None,
    gated: bool,
    act: str,
    *,
    block_m: int | None = None,
) -> Tensor:
    """Routed FFN for many tokens: grouped up/gate GEMM, then a block-sparse down GEMM.

    Arguments as :func:`prunepath_ops.sparse_ffn` (inputs already validated,
    contiguous). Returns ``[T, d]`` in the dtype of ``x``.
    """
    T, d = x.shape
    K = expert_ids.shape[1]
    E, S, _ = w_down.shape
    y = torch.empty(T, d, dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    interp = _interpreting()
    bm = block_m or (16 if interp else 64)
    sorted_pairs, block_expert, expert_offsets, _ = _align(expert_ids, num_active, E, bm)
    _, b_max = align_bounds(T * K, E, bm)
    h = torch.empty(T, E * S, dtype=x.dtype, device=x.device)  # [T, F], only selected cells written
    dummy = w_down
    grid_up = (max(1, min(b_max, _num_sms(x.device) * 4)),)
    kernels.grouped_up_kernel[grid_up](
        x, w_in, b_in if b_in is not None else dummy, h, sorted_pairs, block_expert, expert_offsets,
        T, d, K, E, x.stride(0),
        S=S, GATED=gated, HAS_BIAS=b_in is not None, ACT=kernels.ACT_CODES[act],
        BLOCK_M=bm, BLOCK_K=16 if interp else 64, DOT_PREC=_dot_precision(x.dtype),
        **({} if interp else {"num_warps": 4, "num_stages": 3}),
    )  # fmt: skip
    gt = gate_matrix_t(expert_ids, gates, num_active, E)  # [E, T]
    bm2, bn = (16, 16) if interp else (64, 128)
    grid_down = (triton.cdiv(T, bm2), triton.cdiv(d, bn))
    kernels.down_blocksparse_kernel[grid_down](
        h, gt, w_down, b_out if b_out is not None else dummy, y, T, d, E, y.stride(0),
        S=S, HAS_BIAS=b_out is not None, BLOCK_M=bm2, BLOCK_N=bn, DOT_PREC=_dot_precision(x.dtype),
        **({} if interp else {"num_warps": 4, "num_stages": 3}),
    )  # fmt: skip
    return y


def sparse_ffn_decode_triton(
    x: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    num_active: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_down: Tensor,
    b_out: Tensor | None,
    gated: bool,
    act: str,
    *,
    split: int | None = None,
    block_d: int | None = None,
) -> Tensor:
    """Routed FFN for 1 to 16 tokens: every selected expert's weights read once for the batch.

    Arguments as :func:`prunepath_ops.sparse_ffn` (inputs already validated,
    contiguous). ``split`` (experts split across programs of one d block) and
    ``block_d`` override the tile choice. Returns ``[T, d]`` in the dtype of ``x``.
    """
    T, d = x.shape
    K = expert_ids.shape[1]
    E, S, _ = w_down.shape
    if T > DECODE_MAX_TOKENS:
        raise ValueError(f"sparse_ffn: the decode path handles T <= {DECODE_MAX_TOKENS} tokens; got {T}")
    if T == 0:
        return torch.empty(0, d, dtype=x.dtype, device=x.device)
    interp = _interpreting()
    tp = triton.next_power_of_2(T)
    use_dot = tp >= 16
    sorted_pairs, block_expert, expert_offsets, _ = _align(expert_ids, num_active, E, tp)
    _, b_max = align_bounds(T * K, E, tp)
    r = 16 if use_dot else min(S, 16)
    hbuf = torch.empty(b_max, tp, S, dtype=torch.float32, device=x.device)  # [blocks, TP, S]
    dummy = w_down
    prec = _dot_precision(x.dtype)
    opts = {} if interp else {"num_warps": 4, "num_stages": 3}
    kernels.decode_up_kernel[(b_max, S // r)](
        x, w_in, b_in if b_in is not None else dummy, gates, hbuf, sorted_pairs, block_expert, expert_offsets,
        T, d, K, E, x.stride(0),
        S=S, R=r, TP=tp, GATED=gated, HAS_BIAS=b_in is not None, ACT=kernels.ACT_CODES[act],
        BLOCK_K=32 if interp else 128, USE_DOT=use_dot, DOT_PREC=prec, **opts,
    )  # fmt: skip
    bd = block_d or (16 if interp else 64)
    n_d = triton.cdiv(d, bd)
    if split is None:
        split = 1 if interp else max(1, min(8, (2 * _num_sms(x.device)) // n_d))
    out = (
        torch.empty(T, d, dtype=x.dtype, device=x.device)
        if split == 1
        else torch.empty(split, T, d, dtype=torch.float32, device=x.device)
    )
    kernels.decode_down_kernel[(n_d, split)](
        hbuf, w_down, b_out if b_out is not None else dummy, out, block_expert, expert_offsets, T, d, E,
        S=S, TP=tp, SPLIT=split, HAS_BIAS=b_out is not None, BLOCK_D=bd, USE_DOT=use_dot, DOT_PREC=prec, **opts,
    )  # fmt: skip
    if split == 1:
        return out
    y = out.sum(dim=0)  # fixed-order reduction over the splits
    if b_out is not None:
        y = y + b_out.float()
    return y.to(x.dtype)
