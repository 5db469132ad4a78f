"""Launchers of the Triton routed-FFN kernels: check shapes, allocate, pick tiles, launch.

Legend: T tokens, E experts, S expert width, d hidden, F = E * S, K slots per token.
Nothing here synchronises with the host: grids are sized from static bounds and the
kernels read the amount of work from the device.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from prunepath_ops import _pdl
from prunepath_ops.ffn import decode_kernels, kernels
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


# Below this many bytes Tensor.zero_ zeroes H: torch's fill costs ~10 us of host time per call against
# ~24 us for a Triton launch, more than the Triton stream saves on the GPU (~9 us at 117 MB)
# (H200, bench/results/prefill_host_overhead_smollm2-135m.md, prefill_up_diag_s23_call1.md).
ZERO_FILL_TRITON_MIN_BYTES = 64 << 20


def zero_fill(t: Tensor) -> None:
    """Zero a contiguous tensor: :func:`kernels.zero_fill_kernel` for large ones (3.9 TB/s on the H200 against
    ``Tensor.zero_``'s 3.0), ``Tensor.zero_`` below ``ZERO_FILL_TRITON_MIN_BYTES`` and on the CPU."""
    n = t.numel()
    if n * t.element_size() < ZERO_FILL_TRITON_MIN_BYTES or not (t.is_cuda or _interpreting()):
        t.zero_()
        return
    block = 1024 if _interpreting() else 8192
    kernels.zero_fill_kernel[(triton.cdiv(n, block),)](
        t, n, BLOCK=block, **({} if _interpreting() else {"num_warps": 8})
    )


def _prefill_tiles(elem: int, w_rows: int, interp: bool) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_K, num_stages, num_warps)`` of the prefill up kernel.

    2-byte dtypes with at most 128 weight rows per expert (gated S <= 64): 256 x 64 tiles, 4 stages,
    8 warps. Each tile gathers its tokens' rows of x once per expert whatever BLOCK_M, but reads the
    expert's weights once per tile, so 256 rows halve the weight traffic of 128: the up kernel took
    683-685 us against 728-729 us at 128 x 64 (H200, Llama-3-8B shape, bf16, T = 4096, 30 % active,
    two runs of bench/diag/kernel_profile.py; bench/results/kernel_profile_cuda.md). Otherwise (fp32,
    wide experts, whose stages would crowd the 227 KB of shared memory) the smaller tiles that passed
    every GPU test before the sweeps: 64 x 64, 3 stages, 4 warps.
    """
    if interp:
        return 16, 16, 1, 4
    if elem <= 2 and w_rows <= 128:
        return 256, 64, 4, 8
    return 64, 64, 3, 4


# A group of G experts whose (token, expert) cells are at least this fraction selected is
# computed by kernels.dense_group_up_kernel as a plain GEMM instead of by the grouped kernel.
# From bench/results/dense_groups_prefill.md (H200, Llama-3-8B shape, T = 4096): the grouped
# kernel is as fast or faster up to ~85 % active with random routings; dense groups win above.
DENSE_GROUP_FRACTION = 0.9


def _dense_group_config(elem: int, rows_in: int, interp: bool) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, G, BLOCK_K, num_stages, num_warps)`` of the dense-group up kernel.

    G experts per group so that a tile has 256 weight rows (two N = 128 dots for gated S = 32;
    at least one expert): x is read once per 256 columns instead of once per expert's 2S. The
    tiles are the fastest of bench/results/dense_groups_prefill.md's sweep at 100 % active.
    """
    if interp:
        return 16, max(1, 64 // rows_in), 16, 1, 4
    g = max(1, 256 // rows_in)
    return (128, g, 64, 4, 8) if elem <= 2 else (128, g, 32, 3, 8)


def dense_group_flags(
    expert_ids: Tensor, num_active: Tensor, expert_counts: Tensor, group: int, fraction: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Mark the up projection's dense expert groups on the device.

    ``expert_counts [E]``: pairs per expert (``align_experts``). Returns ``group_flags
    [ceil(E / group)]`` int8 (1 where at least ``fraction`` of the group's T x (experts in it)
    cells are selected, and at least one), ``slot_map [T, E]`` int32 (for experts of flagged
    groups: 1 + the slot of (t, e) among t's active slots, 0 where t did not select e; other
    cells are not written) and ``dense_list [ceil(E / group) + 1]`` int32 (the flagged groups in
    increasing order, their number in the last entry; entries past that number are not written).
    """
    T, K = expert_ids.shape
    E = expert_counts.shape[0]
    dev = expert_ids.device
    slot_map = torch.empty(T, E, dtype=torch.int32, device=dev)
    num_groups = triton.cdiv(E, group)
    flags = torch.empty(num_groups, dtype=torch.int8, device=dev)
    dense_list = torch.empty(num_groups + 1, dtype=torch.int32, device=dev)
    if T == 0:
        return flags.zero_(), slot_map, dense_list.zero_()
    kernels.dense_group_flags_kernel[(1,)](
        expert_counts, flags, dense_list, T, E, num_groups, float(fraction), G=group, BLOCK_G=max(2, 256 // group)
    )
    kernels.slot_map_kernel[(min(T, 4 * _num_sms(dev)),)](
        expert_ids, num_active, flags, slot_map, T, K, E, num_groups, G=group,
        BLOCK_J=min(512, triton.next_power_of_2(max(K, E))), BLOCK_G=triton.next_power_of_2(num_groups),
    )  # fmt: skip
    return flags, slot_map, dense_list


def launch_grouped_up(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    gates: Tensor,
    h: Tensor,
    alignment: tuple[Tensor, Tensor, Tensor],
    group_flags: Tensor | None,
    b_max: int,
    *,
    gated: bool,
    act: str,
    gate_in_h: bool,
    one_dot: bool,
    swap_ab: bool,
    group: int,
    tiles: tuple[int, int, int, int],
    trace: Tensor | None = None,
) -> None:
    """Launch ``kernels.grouped_up_kernel`` into ``h [T, F]`` (the prefill launcher's step 1; also timed alone
    by bench/diag/prefill_up_diag.py).

    ``alignment``: ``(sorted_pairs, block_expert, expert_offsets)`` of :func:`align_experts` with
    ``BLOCK_M = tiles[0]`` and ``b_max`` blocks at most; ``group_flags``: the dense groups to skip
    (:func:`dense_group_flags`), or None; ``tiles``: ``(BLOCK_M, BLOCK_K, num_stages, num_warps)``.
    Diagnostics (bench/diag/prefill_up_diag.py): ``trace`` (int64 ``[b_max, 4]``, GPU only) receives each
    block's SM id, start and end ``%globaltimer`` and valid rows.
    """
    T, d = x.shape
    K = gates.shape[1]
    E = alignment[2].shape[0] - 1
    S = h.shape[1] // E
    bm, bk, stages, warps = tiles
    interp = _interpreting()
    dummy = w_in
    grid = (max(1, min(b_max, _num_sms(x.device) * 4)),)
    kernels.grouped_up_kernel[grid](
        x, w_in, b_in if b_in is not None else dummy, gates, h, *alignment,
        group_flags if group_flags is not None else dummy, trace if trace is not None else dummy, T, d, K, E,
        x.stride(0), S=S, GATED=gated, HAS_BIAS=b_in is not None, ACT=kernels.ACT_CODES[act], GATE_IN_H=gate_in_h,
        ONE_DOT=one_dot, BLOCK_M=bm, BLOCK_K=bk, DOT_PREC=_dot_precision(x.dtype),
        DENSE_GROUPS=group_flags is not None, G=group, SWAP_AB=swap_ab, TRACE=trace is not None,
        **({} if interp else {"num_warps": warps, "num_stages": stages}),
    )  # fmt: skip


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
    down: str = "mm",
    block_m: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    one_dot: bool = True,
    dense_group_fraction: float | None = None,
    swap_ab: bool | None = None,
) -> Tensor:
    """Routed FFN for many tokens: grouped up/gate GEMM, then the down projection.

    Arguments as :func:`prunepath_ops.sparse_ffn` (inputs already validated,
    contiguous). ``down``: ``"mm"`` (gate applied in the up kernel, one cuBLAS GEMM over
    the zero-filled ``[T, F]`` intermediate) or ``"blocksparse"`` (the Triton kernel that
    skips experts no token of a tile selected; wins for routings clustered by token).
    ``block_m``, ``block_k``, ``num_warps``, ``num_stages`` override the up kernel's tiles
    and ``one_dot=False`` computes gate and up with two N = S dots (benchmark sweeps).
    ``dense_group_fraction`` (default ``DENSE_GROUP_FRACTION``; above 1 turns them off): groups
    of G experts with at least this fraction of their (token, expert) cells selected run as a
    plain GEMM over all tokens (:func:`dense_group_flags`, :func:`kernels.dense_group_up_kernel`).
    ``swap_ab``: the up kernel computes ``W_e x^T`` (weight rows as the MMA's M, tokens as its N;
    default: for gated FFNs in 2-byte dtypes, the measured case).
    Active slots must hold distinct experts (``topp_route``'s contract; the grouped kernel would
    add a repeated expert twice, a dense group once). Returns ``[T, d]`` in the dtype of ``x``.
    """
    if down not in ("mm", "blocksparse"):
        raise ValueError(f"sparse_ffn: down must be 'mm' or 'blocksparse'; got {down!r}")
    T, d = x.shape
    K = expert_ids.shape[1]
    E, S, _ = w_down.shape
    y = torch.empty(T, d, dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    interp = _interpreting()
    bm, bk, stages, warps = _prefill_tiles(x.element_size(), (2 * S if gated and one_dot else S), interp)
    bm, bk, stages, warps = block_m or bm, block_k or bk, num_stages or stages, num_warps or warps
    sorted_pairs, block_expert, expert_offsets, expert_counts = _align(expert_ids, num_active, E, bm)
    _, b_max = align_bounds(T * K, E, bm)
    mm = down == "mm"
    # [T, F]: the GEMM reads every cell, so unselected cells must be zeros; the block-sparse
    # kernel reads only selected cells.
    h = torch.empty(T, E * S, dtype=x.dtype, device=x.device)
    if mm:
        zero_fill(h)
    if swap_ab is None:
        swap_ab = gated and one_dot and x.element_size() <= 2
    dummy = w_down
    fraction = DENSE_GROUP_FRACTION if dense_group_fraction is None else dense_group_fraction
    dense = fraction <= 1.0
    gbm, group, gbk, gstages, gwarps = _dense_group_config(x.element_size(), 2 * S if gated else S, interp)
    flags = None  # the dense groups the grouped kernel skips
    if dense:
        flags, slot_map, dense_list = dense_group_flags(expert_ids, num_active, expert_counts, group, fraction)
        # The grouped kernel skips these groups' experts: the two kernels write disjoint cells.
        # A grid-stride loop over the dense groups' tiles: two programs per SM at most.
        tiles = triton.cdiv(T, gbm) * flags.numel()
        kernels.dense_group_up_kernel[(max(1, min(tiles, 2 * _num_sms(x.device))),)](
            x, w_in, b_in if b_in is not None else dummy, gates, slot_map, dense_list, h, T, d, K, E, flags.numel(),
            x.stride(0),
            S=S, G=group, GATED=gated, HAS_BIAS=b_in is not None, ACT=kernels.ACT_CODES[act],
            GATE_IN_H=mm, BLOCK_M=gbm, BLOCK_K=gbk, DOT_PREC=_dot_precision(x.dtype),
            **({} if interp else {"num_warps": gwarps, "num_stages": gstages}),
        )  # fmt: skip
    launch_grouped_up(
        x, w_in, b_in, gates, h, (sorted_pairs, block_expert, expert_offsets), flags, b_max,
        gated=gated, act=act, gate_in_h=mm, one_dot=one_dot, swap_ab=swap_ab, group=group,
        tiles=(bm, bk, stages, warps),
    )  # fmt: skip
    if mm:
        y = torch.mm(h, w_down.view(E * S, d), out=y)  # [T, F] @ [F, d]
        return y if b_out is None else y.add_(b_out)
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
    rows: int | None = None,
    block_k: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_dot: bool | None = None,
    slot_grid_one_token: bool | None = None,
    block_d: int | None = None,
    pdl: bool | None = None,
    trace: Tensor | None = None,
) -> Tensor:
    """Routed FFN for 1 to 16 tokens: every selected expert's weights read once for the batch.

    Three launches (gate table, fused expert FFN, ordered reduction; see
    :mod:`prunepath_ops.ffn.decode_kernels`), no alignment, no host synchronisation.
    Arguments as :func:`prunepath_ops.sparse_ffn` (inputs already validated, contiguous);
    ``rows`` (neurons per program, R), ``block_k``, ``block_n``, ``num_warps``,
    ``num_stages`` override the tile choice and ``use_dot`` the tensor-core path
    (tokens padded to 16 rows; the default for every T: its software-pipelined
    loads stream weights faster than the CUDA-core reduction, see
    bench/results/sparse_ffn_sweep_cuda.md); ``slot_grid_one_token=False`` makes a single
    token go through the gate table like a batch, ``block_d`` sets the reduction's tile,
    ``pdl`` the programmatic dependent launch of the kernels (default :func:`prunepath_ops._pdl.use_pdl`).
    Diagnostics (bench/diag/decode_expert_trace.py): ``trace`` (int64 ``[units * NC, 4]``, GPU only)
    receives each expert program's SM id, start and end ``%globaltimer`` and whether it had work.
    Returns ``[T, d]`` in the dtype of ``x``.
    """
    T, d = x.shape
    K = expert_ids.shape[1]
    E, S, _ = w_down.shape
    if T > DECODE_MAX_TOKENS:
        raise ValueError(f"sparse_ffn: the decode path handles T <= {DECODE_MAX_TOKENS} tokens; got {T}")
    if T == 0:
        return torch.empty(0, d, dtype=x.dtype, device=x.device)
    interp = _interpreting()
    if use_dot is None:
        use_dot = True
    if T > 1 and not use_dot:
        raise ValueError("sparse_ffn: use_dot=False handles a single token only")
    tp = 16 if use_dot else 1  # tensor cores need 16 rows: tokens are padded to 16
    r = rows or min(S, 32)
    if S % r or (use_dot and r < 16):
        raise ValueError(f"sparse_ffn: rows={r} must divide S={S} (and be >= 16 on the tensor-core path)")
    nc = S // r
    dev = x.device
    pdl = _pdl.resolve(pdl, dev)
    launch = {} if interp else {"num_warps": 4, **_pdl.launch_options(pdl)}
    slot_grid = T == 1 and (slot_grid_one_token if slot_grid_one_token is not None else True)
    dummy = w_down
    if slot_grid:
        table = sel = dummy
        units = K
    else:
        table = torch.empty(E, tp, dtype=torch.float32, device=dev)  # [E, TP]
        sel = torch.empty(E, tp, dtype=torch.int32, device=dev)  # [E, TP]
        decode_kernels.decode_gate_table_kernel[(1,)](
            expert_ids, gates, num_active, table, sel, T, K, E, TP=tp, BLOCK=256 if interp else 1024, PDL=pdl,
            **launch,
        )  # fmt: skip
        units = E
    if trace is not None and (
        interp or trace.device != dev or trace.dtype != torch.int64 or trace.shape != (units * nc, 4)
    ):
        raise ValueError(f"sparse_ffn: trace must be an int64 [{units * nc}, 4] tensor on {dev} (and not interpreted)")
    partial = torch.empty(units, nc, T, d, dtype=torch.float32, device=dev)  # selected rows written
    # Tiles from bench/results/sparse_ffn_sweep_cuda.md (H200, Llama-3-8B shape, bf16, 30 % active).
    # One token: each SM holds about one selected expert, so the bytes in flight per program set the
    # bandwidth; the down loop's 512-wide tiles keep as many in flight as the gate/up loop's 256-wide
    # ones (with 256 the down third of the bytes streamed at half the rate: 33.8 against 35.3 us per
    # call in the steady state). 98 KB of shared memory, two programs per SM. fp32 keeps 128-wide
    # tiles, whose 3 stages fit in shared memory.
    wide = T == 1 and x.element_size() <= 2
    bk = block_k or (32 if interp else (256 if wide else 128))
    bn = block_n or (32 if interp else (512 if wide else 128))
    stages = num_stages or 3
    decode_kernels.decode_expert_kernel[(units, nc)](
        x, w_in, b_in if b_in is not None else dummy, w_down, table, sel, expert_ids, gates, num_active, partial,
        trace if trace is not None else dummy, T, d, E, K, x.stride(0),
        SLOT_GRID=slot_grid, S=S, R=r, TP=tp, GATED=gated,
        HAS_BIAS=b_in is not None, ACT=kernels.ACT_CODES[act], BLOCK_K=bk, BLOCK_N=bn, USE_DOT=use_dot,
        DOT_PREC=_dot_precision(x.dtype), PDL=pdl, TRACE=trace is not None,
        **({} if interp else {**launch, "num_warps": num_warps or 4, "num_stages": stages}),
    )  # fmt: skip
    y = torch.empty(T, d, dtype=x.dtype, device=dev)
    # All of a token's slots in one tile (up to 512) and narrow d blocks: one round trip to memory
    # per program and hundreds of programs. 32 slots x 128 columns per program cost 10 us per call
    # in the first end-to-end profile (bench/results/decode_e2e_cuda.md), a quarter of the layer's FFN.
    bj = 16 if interp else min(triton.next_power_of_2(K), 512)
    bd = 32 if interp else (block_d or max(16, min(128, 8192 // bj)))
    decode_kernels.decode_reduce_kernel[(T, triton.cdiv(d, bd))](
        partial, expert_ids, num_active, b_out if b_out is not None else dummy, y, T, K, E, d, y.stride(0),
        SLOT_GRID=slot_grid, NC=nc, HAS_BIAS=b_out is not None, BLOCK_J=bj, BLOCK_D=bd, PDL=pdl,
        **launch,
    )  # fmt: skip
    return y
