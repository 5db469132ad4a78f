"""Triton kernel bodies of the decode routed FFN (1 to 16 tokens; launcher: :mod:`.triton_ffn`).

Legend: T tokens, E experts, S expert width, d hidden, K slots per token, TP tokens padded
(1, or 16 for the tensor-core path), R neurons per program, NC = S / R chunks per expert.

At decode the cost is reading weights, so the work is split by weight slice, not by token:

  0. ``decode_gate_table_kernel`` (one program): scatters the routing into a dense
     ``[E, TP]`` table of gates and a ``[E, TP]`` selection mask, so the next kernel learns
     with two tiny loads whether any token chose its expert and with which gate.
  1. ``decode_expert_kernel`` (one program per expert and R-neuron chunk; programs of
     unselected experts exit at once): streams the chunk's R gate and R up rows once for
     every token of the batch, applies the activation and the gate in registers, then
     streams the chunk's R down rows and writes the chunk's ``[T, d]`` contribution to an
     fp32 partial buffer. The intermediate ``h`` never leaves the registers; all programs
     of all selected experts run at once, each reading an equal slice of weights, so every
     SM streams memory.
     With one token (``SLOT_GRID``) program j serves the token's j-th slot instead, and
     kernel 0 is skipped.
  2. ``decode_reduce_kernel`` (one program per token and d block): sums the partials of the
     token's selected experts in its slot order (then chunk order) in fp32, adds the output
     bias, casts. A fixed order, no atomics: bitwise reproducible.

With ``PDL`` (see :mod:`prunepath_ops._pdl`) each kernel waits for the previous one before its
first memory access and lets the next one be scheduled early: the launch gaps between the three
kernels (and the kernels around them in a decode step) shrink, the results stay bitwise the same.

The partials cost ``n_selected * NC * T * d * 4`` bytes written and read (4.4 MB for one
token with 134 of 448 Llama-3-8B experts, against 105 MB of weights), traffic that mostly
stays in the 50 MB L2.
"""

from __future__ import annotations

import triton
import triton.language as tl

from prunepath_ops._pdl import pdl_launch_dependents, pdl_wait
from prunepath_ops.ffn.kernels import _globaltimer, _smid, apply_act


@triton.jit
def decode_gate_table_kernel(
    expert_ids_ptr,  # [T, K] int32
    gates_ptr,  # [T, K] fp32
    num_active_ptr,  # [T] int32
    table_ptr,  # [E, TP] fp32 out: gate of (expert, token), 0 where not selected
    sel_ptr,  # [E, TP] int32 out: 1 where the token selected the expert
    T,
    K,
    E,
    TP: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    # One program, so zeroing then scattering is ordered by a CTA barrier, not a second launch.
    n_cells = E * TP
    for c0 in range(0, n_cells, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        tl.store(table_ptr + c, tl.zeros((BLOCK,), tl.float32), mask=c < n_cells)
        tl.store(sel_ptr + c, tl.zeros((BLOCK,), tl.int32), mask=c < n_cells)
    tl.debug_barrier()
    for t in range(0, T):
        n = tl.minimum(tl.maximum(tl.load(num_active_ptr + t), 0), K)
        for j0 in range(0, K, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            ok = j < n  # slots past num_active are never read as experts
            e = tl.load(expert_ids_ptr + t * K + j, mask=ok, other=0)
            ok = ok & (e >= 0) & (e < E)
            g = tl.load(gates_ptr + t * K + j, mask=ok, other=0.0)
            tl.store(table_ptr + e * TP + t, g, mask=ok)
            tl.store(sel_ptr + e * TP + t, tl.full((BLOCK,), 1, tl.int32), mask=ok)


@triton.jit
def decode_expert_kernel(
    x_ptr,  # [T, d]
    w_in_ptr,  # [E, 2S or S, d]
    b_in_ptr,  # [E, S] or a dummy
    w_down_ptr,  # [E, S, d]
    table_ptr,  # [E, TP] fp32 gates (not read with SLOT_GRID)
    sel_ptr,  # [E, TP] int32 selection (not read with SLOT_GRID)
    expert_ids_ptr,  # [1, K] int32 (SLOT_GRID only)
    gates_ptr,  # [1, K] fp32 (SLOT_GRID only)
    num_active_ptr,  # [1] int32 (SLOT_GRID only)
    partial_ptr,  # [units, NC, T, d] fp32 out (only selected experts' rows are written)
    trace_ptr,  # [units * NC, 4] int64 (TRACE only): SM id, start and end %globaltimer, active
    T,
    d,
    E,
    K,
    stride_x,
    SLOT_GRID: tl.constexpr,
    S: tl.constexpr,
    R: tl.constexpr,
    TP: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PDL: tl.constexpr,
    TRACE: tl.constexpr,
):
    # With PDL the reduction's programs are scheduled once all of these started, and wait there.
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    if TRACE:
        t_start = _globaltimer()
    unit = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    NC: tl.constexpr = S // R
    offs_t = tl.arange(0, TP)
    t_ok = offs_t < T
    if SLOT_GRID:
        # One token: program j serves its j-th slot directly, no gate table (and one launch) needed.
        # The slot's expert and gate are loaded together with num_active (the grid has exactly K
        # programs, so the loads stay in the row), not after it: one memory round trip before the
        # weights stream instead of two. A slot past num_active is never used as an expert.
        n = tl.minimum(tl.maximum(tl.load(num_active_ptr), 0), K)
        e = tl.load(expert_ids_ptr + unit).to(tl.int64)
        g_slot = tl.load(gates_ptr + unit)
        active = (unit < n) & (e >= 0) & (e < E)
        e = tl.where(active, e, 0)
        sel = tl.where((offs_t == 0) & active, 1, 0)  # [TP]
        g = tl.where((offs_t == 0) & active, g_slot, 0.0)  # [TP]
    else:
        e = unit
        sel = tl.load(sel_ptr + e * TP + offs_t, mask=t_ok, other=0)  # [TP]
        g = tl.load(table_ptr + e * TP + offs_t, mask=t_ok, other=0.0)  # [TP]
    # Programs of experts no token selected do nothing (most of the grid at decode).
    if tl.max(sel, axis=0) > 0:
        rows_in: tl.constexpr = 2 * S if GATED else S
        offs_r = chunk * R + tl.arange(0, R)
        offs_k = tl.arange(0, BLOCK_K)
        w_gate = w_in_ptr + e * rows_in * d + offs_r[:, None] * d  # [R, 1] row starts
        w_up = w_gate + S * d
        if USE_DOT:
            acc_g = tl.zeros((TP, R), dtype=tl.float32)
            acc_u = tl.zeros((TP, R), dtype=tl.float32)
        else:
            acc_g = tl.zeros((R,), dtype=tl.float32)
            acc_u = tl.zeros((R,), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < d
            wg = tl.load(w_gate + kk[None, :], mask=k_ok[None, :], other=0.0)  # [R, BLOCK_K]
            if GATED:
                wu = tl.load(w_up + kk[None, :], mask=k_ok[None, :], other=0.0)  # [R, BLOCK_K]
            if USE_DOT:
                xt = tl.load(
                    x_ptr + offs_t[:, None] * stride_x + kk[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0
                )
                acc_g = tl.dot(xt, tl.trans(wg), acc_g, input_precision=DOT_PREC)  # [TP, R]
                if GATED:
                    acc_u = tl.dot(xt, tl.trans(wu), acc_u, input_precision=DOT_PREC)
            else:
                xv = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K], token 0
                acc_g += tl.sum(wg.to(tl.float32) * xv[None, :], axis=1)
                if GATED:
                    acc_u += tl.sum(wu.to(tl.float32) * xv[None, :], axis=1)
        if HAS_BIAS:
            b = tl.load(b_in_ptr + e * S + offs_r).to(tl.float32)
            if USE_DOT:
                acc_g += b[None, :]
            else:
                acc_g += b
        h = apply_act(acc_g, ACT)
        if GATED:
            h = h * acc_u
        # Rows of tokens that did not choose e are zeroed with a where, so inf/nan stay out.
        if USE_DOT:
            h = tl.where(sel[:, None] != 0, h * g[:, None], 0.0)  # [TP, R]
            a = h.to(w_in_ptr.dtype.element_ty)
        else:
            h = tl.sum(tl.where(sel[:, None] != 0, h[None, :] * g[:, None], 0.0), axis=0)  # [R]
        w_down = w_down_ptr + e * S * d + offs_r[:, None] * d  # [R, 1] row starts
        offs_n = tl.arange(0, BLOCK_N)
        dst = partial_ptr + (unit * NC + chunk) * T * d
        for n0 in range(0, d, BLOCK_N):
            nn = n0 + offs_n
            n_ok = nn < d
            wd = tl.load(w_down + nn[None, :], mask=n_ok[None, :], other=0.0)  # [R, BLOCK_N]
            if USE_DOT:
                out = tl.dot(a, wd, input_precision=DOT_PREC)  # [TP, BLOCK_N]
                # Only rows of tokens that selected e: the reduction reads no others.
                tl.store(dst + offs_t[:, None] * d + nn[None, :], out, mask=(sel != 0)[:, None] & n_ok[None, :])
            else:
                out = tl.sum(wd.to(tl.float32) * h[:, None], axis=0)  # [BLOCK_N]
                tl.store(dst + nn, out, mask=n_ok)
    if TRACE:
        row = trace_ptr + (tl.program_id(0) * NC + chunk) * 4
        tl.store(row, _smid().to(tl.int64))
        tl.store(row + 1, t_start)
        tl.store(row + 2, _globaltimer())
        tl.store(row + 3, (tl.max(sel, axis=0) > 0).to(tl.int64))


@triton.jit
def decode_reduce_kernel(
    partial_ptr,  # [E, NC, T, d] fp32
    expert_ids_ptr,  # [T, K] int32
    num_active_ptr,  # [T] int32
    b_out_ptr,  # [d] or a dummy
    y_ptr,  # [T, d] out, dtype of x
    T,
    K,
    E,
    d,
    stride_y,
    SLOT_GRID: tl.constexpr,
    NC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_launch_dependents(PDL)
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    n = tl.minimum(tl.maximum(tl.load(num_active_ptr + t), 0), K)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # The token's slots in order, BLOCK_J at a time: the summation order depends only on the routing.
    for j0 in range(0, n, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        ok = j < n
        e = tl.load(expert_ids_ptr + t * K + j, mask=ok, other=0).to(tl.int64)
        ok = ok & (e >= 0) & (e < E)
        unit = j.to(tl.int64) if SLOT_GRID else e  # partials are indexed by slot or by expert
        # The routing was final before the expert kernel started (it waited for its producer), so
        # only the partials wait for the expert kernel: one memory round trip after it ends, not three.
        pdl_wait(PDL)
        for c in range(NC):
            rows = (unit * NC + c) * T + t  # [BLOCK_J]
            p = tl.load(partial_ptr + rows[:, None] * d + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.sum(p, axis=0)
    if HAS_BIAS:
        acc += tl.load(b_out_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    pdl_wait(PDL)  # a token without slots skipped the loop; nothing is written before the wait
    tl.store(y_ptr + t * stride_y + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)
