"""Triton kernel bodies of the routed expert FFN (launchers: :mod:`prunepath_ops.ffn.triton_ffn`).

Legend: T tokens, E experts, S expert width, d hidden, F = E * S, K slots per token,

Prefill (many tokens), two kernels:
  1. ``grouped_up_kernel``: (token, slot) pairs grouped by expert (``align_experts``),
     one ``BLOCK_M``-row block of one expert at a time: ``h = act(x Wg_e^T) * (x Wu_e^T)``
     (or ``act(x Wi_e^T + bi_e)``), written to ``H[t, e*S:(e+1)*S]`` of a ``[T, F]``
     buffer; only selected cells are written, and only selected cells are read.
  2. ``down_blocksparse_kernel``: ``y = (gate * H) Wd`` as a block-sparse GEMM over
     (token block, d block) tiles, looping over the experts in index order and skipping
     an expert no token of the tile selected. The fp32 accumulator lives in registers, so
     the reduction over a token's experts needs no atomics and is bitwise reproducible.
     Per-pair outputs (``[pairs, d]``, vLLM-style) would need ``T * n * d`` floats: 9 GB
     at T=4096 with 134 of 448 experts active, hence the dense-tile formulation.

Dense expert groups (routings where most tokens keep most experts, up to ``tau >= 1``): the
grouped kernel gathers a token's row of x once per selected expert, so its L2 traffic grows with
the pairs at N = 2S columns per gathered row. ``dense_group_up_kernel`` computes a group of G
experts that at least a given fraction of the (token, expert) cells selected as a plain GEMM
over all tokens (N = 2 x G S columns per row of x, unselected cells written as zeros), and the
grouped kernel skips those experts' blocks whole. ``dense_group_flags_kernel`` marks the groups
on the device from the alignment's per-expert counts, so nothing syncs. A whole group rather than a (token block, group) tile: blocks
of the grouped kernel span several token blocks, and a block computed for a few unmasked rows
cost more than either kernel alone (bench/results/dense_groups_prefill.md).

Down projection alternative (``down="mm"``): the up kernel multiplies h by the token's gate
(``GATE_IN_H``) into a zero-filled ``H``, and ``y = H Wd`` is one cuBLAS GEMM. At prefill
sizes with routings that are not clustered by token, every tile of tokens selects nearly
every expert, so the block-sparse kernel does the dense work anyway, at a lower fraction of
peak than cuBLAS; the GEMM is deterministic and accumulates in fp32 as well.

Decode (1 to 16 tokens): :mod:`prunepath_ops.ffn.decode_kernels`.
"""

from __future__ import annotations

import triton
import triton.language as tl

ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


@triton.jit
def apply_act(z, ACT: tl.constexpr):
    """The FFN nonlinearity on an fp32 tile (codes in ``ACT_CODES``)."""
    if ACT == 0:
        out = z * tl.sigmoid(z)
    elif ACT == 1:
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        out = 0.5 * z * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh(u) = 2 sigmoid(2u) - 1
    else:
        out = tl.maximum(z, 0.0)
    return out


@triton.jit
def _globaltimer():
    """The SM's ``%globaltimer`` (ns; diagnostic traces)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _smid():
    """The id of the SM running this program (diagnostic traces)."""
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def grouped_up_kernel(
    x_ptr,  # [T, d]
    w_in_ptr,  # [E, 2S or S, d]
    b_in_ptr,  # [E, S] or a dummy
    gates_ptr,  # [T, K] fp32, read when GATE_IN_H
    h_ptr,  # [T, F] out, dtype of x
    sorted_pairs_ptr,  # [P_max] int32, t * K + j, -1 padded
    block_expert_ptr,  # [B_max] int32, -1 past the end
    expert_offsets_ptr,  # [E + 1] int32
    group_flags_ptr,  # [ceil(E / G)] int8, 1 = the group's experts done by dense_group_up_kernel; read if DENSE_GROUPS
    trace_ptr,  # [B_max, 4] int64 (TRACE only): per block, SM id, start and end %globaltimer, valid rows
    T,
    d,
    K,
    E,
    stride_x,
    S: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    GATE_IN_H: tl.constexpr,
    ONE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DENSE_GROUPS: tl.constexpr,
    G: tl.constexpr,
    SWAP_AB: tl.constexpr,
    TRACE: tl.constexpr = False,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_blocks = tl.load(expert_offsets_ptr + E) // BLOCK_M
    F = E * S
    offs_m = tl.arange(0, BLOCK_M)
    # A persistent loop: the grid is sized from the static bound, the work from the device count.
    for b in range(pid, num_blocks, num_programs):
        if TRACE:
            t_start = _globaltimer()
        e = tl.load(block_expert_ptr + b).to(tl.int64)
        pair = tl.load(sorted_pairs_ptr + b * BLOCK_M + offs_m)
        valid = pair >= 0
        tok = tl.where(valid, pair // K, 0).to(tl.int64)
        # A dense group's cells are dense_group_up_kernel's (the K loop pipelines the same with
        # this branch around it: bench/diag/triton_compile_check.py).
        done = tl.load(group_flags_ptr + e // G) if DENSE_GROUPS else 0
        if done == 0:
            _grouped_up_block(
                x_ptr, w_in_ptr, b_in_ptr, gates_ptr, h_ptr, pair, valid, tok, e, d, stride_x, F,
                S, GATED, HAS_BIAS, ACT, GATE_IN_H, ONE_DOT, BLOCK_M, BLOCK_K, DOT_PREC, SWAP_AB,
            )  # fmt: skip
        if TRACE:
            row = trace_ptr + b.to(tl.int64) * 4
            tl.store(row, _smid().to(tl.int64))
            tl.store(row + 1, t_start)
            tl.store(row + 2, _globaltimer())
            tl.store(row + 3, tl.sum(valid.to(tl.int64), axis=0))


@triton.jit
def _grouped_up_block(
    x_ptr,
    w_in_ptr,
    b_in_ptr,
    gates_ptr,
    h_ptr,
    pair,
    valid,
    tok,
    e,
    d,
    stride_x,
    F,
    S: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    GATE_IN_H: tl.constexpr,
    ONE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """One ``BLOCK_M``-pair block of expert ``e``: ``H[tok, e*S:(e+1)*S]`` for its valid rows."""
    rows_in = 2 * S if GATED else S
    offs_k = tl.arange(0, BLOCK_K)
    offs_s = tl.arange(0, S)
    w_base = w_in_ptr + e * rows_in * d
    if GATED and ONE_DOT:
        # Gate and up rows are adjacent in w_in: one N = 2S dot fills the tensor cores better
        # than two N = S dots; the accumulator is split in registers afterwards.
        # SWAP_AB: the transposed product, [2S, BLOCK_M] = W_e x^T: the weight rows are the MMA's
        # M (64 for S = 32) and the gathered tokens its N (up to 256), so each wgmma reads its
        # shared-memory operands once instead of re-reading the weight tile for every 64 rows of
        # tokens: -28 to -64 us of a ~1.45 ms call at T = 4096, 30 % (bench/results/
        # prefill_up_diag.md, "Session 22" in bench/results/README.md).
        offs_2s = tl.arange(0, 2 * S)
        acc = tl.zeros((2 * S, BLOCK_M) if SWAP_AB else (BLOCK_M, 2 * S), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < d
            xt = tl.load(x_ptr + tok[:, None] * stride_x + kk[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
            if SWAP_AB:
                w = tl.load(w_base + offs_2s[:, None] * d + kk[None, :], mask=k_ok[None, :], other=0.0)
                acc = tl.dot(w, tl.trans(xt), acc, input_precision=DOT_PREC)
            else:
                w = tl.load(w_base + offs_2s[None, :] * d + kk[:, None], mask=k_ok[:, None], other=0.0)
                acc = tl.dot(xt, w, acc, input_precision=DOT_PREC)
        if SWAP_AB:
            acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (2, S, BLOCK_M)), (2, 1, 0)))  # [BLOCK_M, S] each
        else:
            acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, S)), (0, 2, 1)))
    else:
        acc_g = tl.zeros((BLOCK_M, S), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, S), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < d
            xt = tl.load(x_ptr + tok[:, None] * stride_x + kk[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
            # Weights loaded as [BLOCK_K, S] so the dot needs no transpose.
            wg = tl.load(w_base + offs_s[None, :] * d + kk[:, None], mask=k_ok[:, None], other=0.0)
            acc_g = tl.dot(xt, wg, acc_g, input_precision=DOT_PREC)
            if GATED:
                wu = tl.load(w_base + (S + offs_s[None, :]) * d + kk[:, None], mask=k_ok[:, None], other=0.0)
                acc_u = tl.dot(xt, wu, acc_u, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc_g += tl.load(b_in_ptr + e * S + offs_s).to(tl.float32)[None, :]
    h = apply_act(acc_g, ACT)
    if GATED:
        h = h * acc_u
    if GATE_IN_H:
        h = h * tl.load(gates_ptr + pair, mask=valid, other=0.0)[:, None]
    dst = h_ptr + tok[:, None] * F + e * S + offs_s[None, :]
    tl.store(dst, h.to(h_ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def zero_fill_kernel(ptr, n, BLOCK: tl.constexpr):
    """Zeros ``n`` elements from ``ptr``, BLOCK per program.

    The prefill's ``[T, F]`` intermediate is zero-filled before the up kernel: this store stream
    wrote 117 MB in 30 us (3.9 TB/s), torch.zeros' fill kernel in 39 us (3.0 TB/s) (H200,
    bench/results/prefill_up_diag_s23_call1.md, section 5).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(ptr + offs, tl.zeros((BLOCK,), dtype=ptr.dtype.element_ty), mask=offs < n)


@triton.jit
def dense_group_flags_kernel(
    expert_counts_ptr,  # [E] int32 pairs per expert (align_experts)
    group_flags_ptr,  # [num_groups] int8 out
    dense_list_ptr,  # [num_groups + 1] int32 out: the dense groups in increasing order, their number last
    T,
    E,
    num_groups,  # ceil(E / G)
    fraction,  # fp32: dense from this fraction of the group's T x (experts in it) cells selected
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """1 where expert group g holds at least ``fraction`` of its cells (and one), else 0; one program.

    Also the compact list of those groups, so that dense_group_up_kernel's programs walk only them.
    """
    found = 0
    for g0 in range(0, num_groups, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        g_ok = g < num_groups
        e = g[:, None] * G + tl.arange(0, G)[None, :]
        total = tl.sum(tl.load(expert_counts_ptr + e, mask=g_ok[:, None] & (e < E), other=0), axis=1)
        width = tl.minimum(E - g * G, G)
        dense = g_ok & (total > 0) & (total.to(tl.float32) >= fraction * (T * width).to(tl.float32))
        tl.store(group_flags_ptr + g, dense.to(tl.int8), mask=g_ok)
        d32 = dense.to(tl.int32)
        tl.store(dense_list_ptr + found + tl.cumsum(d32, axis=0) - 1, g, mask=dense)
        found += tl.sum(d32, axis=0)
    tl.store(dense_list_ptr + num_groups, found)


@triton.jit
def slot_map_kernel(
    expert_ids_ptr,  # [T, K] int32
    num_active_ptr,  # [T] int32
    group_flags_ptr,  # [ceil(E / G)] int8
    slot_map_ptr,  # [T, E] int32 out: 1 + the slot of (t, e) for e in a dense group, 0 if t did not select it
    T,
    K,
    E,
    num_groups,  # ceil(E / G)
    G: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """The slot map's rows (a grid-stride loop over tokens), in the cells of dense groups (the only ones read).

    Nothing to do, and nothing written, when no group is dense (the common case at moderate
    densities), so the map needs no fill beforehand; a grid of a few programs per SM, not one per
    token, so that this case costs one small wave. Ids outside ``[0, E)`` are skipped. An
    atomic max, so a routing that breaks the contract (an expert twice among a token's active
    slots) still gives the same map every run (the later slot).
    """
    offs_g = tl.arange(0, BLOCK_G)
    any_dense = tl.max(tl.load(group_flags_ptr + offs_g, mask=offs_g < num_groups, other=0).to(tl.int32), axis=0)
    if any_dense > 0:
        for t32 in range(tl.program_id(0), T, tl.num_programs(0)):
            t = t32 + tl.zeros((), dtype=tl.int64)  # int64 offsets (t * E, t * K); a plain int when interpreted
            for e0 in range(0, E, BLOCK_J):
                e = e0 + tl.arange(0, BLOCK_J)
                ok = e < E
                ok = ok & (tl.load(group_flags_ptr + e // G, mask=ok, other=0) != 0)
                tl.store(slot_map_ptr + t * E + e, tl.zeros((BLOCK_J,), dtype=tl.int32), mask=ok)
            # The zeros above before the atomics below (other threads of this program may own them).
            tl.debug_barrier()
            n = tl.minimum(tl.maximum(tl.load(num_active_ptr + t), 0), K)
            for j0 in range(0, K, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                ok = j < n
                e = tl.load(expert_ids_ptr + t * K + j, mask=ok, other=-1)
                ok = ok & (e >= 0) & (e < E)
                ok = ok & (tl.load(group_flags_ptr + e // G, mask=ok, other=0) != 0)
                tl.atomic_max(slot_map_ptr + t * E + e, j + 1, mask=ok, sem="relaxed")


@triton.jit
def dense_group_up_kernel(
    x_ptr,  # [T, d]
    w_in_ptr,  # [E, 2S or S, d]
    b_in_ptr,  # [E, S] or a dummy
    gates_ptr,  # [T, K] fp32, read when GATE_IN_H
    slot_map_ptr,  # [T, E] int32: 1 + the slot of (t, e) among t's active slots, 0 = not selected (dense groups)
    dense_list_ptr,  # [num_groups + 1] int32: the dense groups, their number last (dense_group_flags_kernel)
    h_ptr,  # [T, F] out, dtype of x
    T,
    d,
    K,
    E,
    num_groups,  # ceil(E / G)
    stride_x,
    S: tl.constexpr,
    G: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    GATE_IN_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Tiles (token block, experts ``[G g, G g + G)``) of H as GEMM tiles, for the dense groups g only.

    A grid-stride loop over (dense group, token block) pairs, token blocks fastest (the programs
    running together share a group's weights): with no dense group the programs exit at once (a
    grid over every group and token block spent 8.6 us on programs that only read their flag,
    bench/results/prefill_up_diag_s23_call3.md). Every cell of a tile is written: the selected ones
    as the grouped kernel writes them, the others as zeros (their product is never formed).
    """
    m_tiles = tl.cdiv(T, BLOCK_M)
    num_dense = tl.load(dense_list_ptr + num_groups)
    for w in range(tl.program_id(0), num_dense * m_tiles, tl.num_programs(0)):
        pid_m = w % m_tiles
        pid_g = tl.load(dense_list_ptr + w // m_tiles)
        F = E * S
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        rows64 = rows.to(tl.int64)
        e0 = pid_g * G
        # Column c of the tile is neuron c % S of expert e0 + c // S: its gate row (its only row
        # in a plain FFN) and its up row in w_in. Two N = G S dots rather than one over the
        # interleaved rows, so the epilogue needs no reshape (whose scratch would not fit beside
        # the pipeline's shared memory).
        offs_c = tl.arange(0, G * S)
        expert = e0 + offs_c // S  # [G S]
        c_ok = expert < E
        if GATED:
            w_row = expert.to(tl.int64) * (2 * S) + offs_c % S
        else:
            w_row = expert.to(tl.int64) * S + offs_c % S
        offs_k = tl.arange(0, BLOCK_K)
        acc_g = tl.zeros((BLOCK_M, G * S), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, G * S), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < d
            xt = tl.load(
                x_ptr + rows64[:, None] * stride_x + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
            w_ok = c_ok[None, :] & k_ok[:, None]
            wg = tl.load(w_in_ptr + w_row[None, :] * d + kk[:, None], mask=w_ok, other=0.0)
            acc_g = tl.dot(xt, wg, acc_g, input_precision=DOT_PREC)
            if GATED:
                wu = tl.load(w_in_ptr + (w_row + S)[None, :] * d + kk[:, None], mask=w_ok, other=0.0)
                acc_u = tl.dot(xt, wu, acc_u, input_precision=DOT_PREC)
        if HAS_BIAS:
            acc_g += tl.load(b_in_ptr + e0 * S + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        h = apply_act(acc_g, ACT)
        if GATED:
            h = h * acc_u
        ok = row_ok[:, None] & c_ok[None, :]
        slot = tl.load(slot_map_ptr + rows64[:, None] * E + expert[None, :], mask=ok, other=0)  # [M, G S]
        sel = slot > 0
        if GATE_IN_H:
            h = h * tl.load(gates_ptr + rows64[:, None] * K + slot - 1, mask=ok & sel, other=0.0)
        h = tl.where(sel, h, 0.0)
        dst = h_ptr + rows64[:, None] * F + e0 * S + offs_c[None, :]
        tl.store(dst, h.to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def down_blocksparse_kernel(
    h_ptr,  # [T, F], read only where the gate is non-zero
    gates_t_ptr,  # [E, T] fp32, 0 where token t did not select expert e
    w_down_ptr,  # [E, S, d]
    b_out_ptr,  # [d] or a dummy
    y_ptr,  # [T, d] out
    T,
    d,
    E,
    stride_y,
    S: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    F = E * S
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < T
    col_ok = cols < d
    offs_s = tl.arange(0, S)
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Experts in index order: a fixed summation order whatever the routing.
    for e in range(0, E):
        g = tl.load(gates_t_ptr + e * T + rows, mask=row_ok, other=0.0)  # [BLOCK_M]
        sel = g != 0.0
        if tl.max(sel.to(tl.int32), axis=0) > 0:
            h = tl.load(h_ptr + rows64[:, None] * F + e * S + offs_s[None, :], mask=sel[:, None], other=0.0)
            a = (h.to(tl.float32) * g[:, None]).to(w_down_ptr.dtype.element_ty)
            w = tl.load(w_down_ptr + e * S * d + offs_s[:, None] * d + cols[None, :], mask=col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(b_out_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dst = y_ptr + rows64[:, None] * stride_y + cols[None, :]
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
