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
from prunepath_ops.ffn.kernels import apply_act


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
        n = tl.minimum(tl.maximum(tl.load(num_active_ptr), 0), K)
        e = tl.load(expert_ids_ptr + unit, mask=unit < n, other=-1).to(tl.int64)
        active = (unit < n) & (e >= 0) & (e < E)
        e = tl.where(active, e, 0)
        sel = tl.where((offs_t == 0) & active, 1, 0)  # [TP]
        g = tl.where(offs_t == 0, tl.load(gates_ptr + unit, mask=active, other=0.0), 0.0)  # [TP]
    else:
        e = unit
        sel = tl.load(sel_ptr + e * TP + offs_t, mask=t_ok, other=0)  # [TP]
        g = tl.load(table_ptr + e * TP + offs_t, mask=t_ok, other=0.0)  # [TP]
    # Programs of experts no token selected do nothing (most of the grid at decode).
    if tl.max(sel, axis=0) > 0:
        dst = partial_ptr + (unit * NC + chunk) * T * d
        _expert_ffn(x_ptr, w_in_ptr, b_in_ptr, w_down_ptr, dst, e, sel, g, chunk, T, d, stride_x,
                    S, R, TP, GATED, HAS_BIAS, ACT, BLOCK_K, BLOCK_N, USE_DOT, DOT_PREC)  # fmt: skip
    if TRACE:
        row = trace_ptr + (tl.program_id(0) * NC + chunk) * 4
        tl.store(row, _smid().to(tl.int64))
        tl.store(row + 1, t_start)
        tl.store(row + 2, _globaltimer())
        tl.store(row + 3, (tl.max(sel, axis=0) > 0).to(tl.int64))


@triton.jit
def decode_expert_sm_kernel(
    x_ptr,  # [1, d]
    w_in_ptr,  # [E, 2S or S, d]
    b_in_ptr,  # [E, S] or a dummy
    w_down_ptr,  # [E, S, d]
    expert_ids_ptr,  # [1, K] int32
    gates_ptr,  # [1, K] fp32
    num_active_ptr,  # [1] int32
    partial_ptr,  # [K, d] fp32 out (the rows of slots served whole are written)
    tail_ptr,  # [NSM, d] fp32 out when the tail is split (see tail_split): one row per SM
    sched_ptr,  # [NSM + 1] int32, zero at entry: per-SM tickets, then the arrival count
    d,
    E,
    K,
    NSM,
    S: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PDL: tl.constexpr,
    FAKE_SM: tl.constexpr,
    TAIL_MAX: tl.constexpr,
    D_TILE: tl.constexpr,
    HOLD_NS: tl.constexpr,
    SM_BLOCK: tl.constexpr,
):
    """One token, SM-aware: slot j runs on SM ``j % NSM``, as the ``j // NSM % 2``-th program there.

    Launched with 2 x NSM programs, two per SM by their shared memory. With one program per slot
    the block scheduler put two of the first 134 programs on each of 8 SMs and none on 6 (30 % of
    Llama-3-8B's experts; bench/results/decode_expert_diag_h200.md), and the kernel ended with
    those 16, ~4 us after its median program. Here a program reads its SM id, takes a ticket t
    there (an atomic on ``sched[sm]``) and serves slots ``sm + NSM (t + 2 m)``, m = 0, 1, ...
    The slots past the last full wave of NSM (2 of 134 at 30 %, which would double two SMs'
    time) are split into single neurons (``tail_split``) served by the programs of ticket
    ``waves % 2`` on every SM, one row of ``tail`` each. Programs without a whole slot hold their
    SM until every program has arrived (at most HOLD_NS), so that early exits do not let the
    scheduler pile later programs onto a few SMs. Should an SM still get more than two programs,
    the extra ones idle and the last program to arrive serves the duties of the tickets nobody
    took. Each slot (and tail neuron) is served by exactly one program with the same code, so the
    output bits do not depend on the placement. ``FAKE_SM`` (tests, the interpreter): 1 takes
    ``program_id % NSM`` as the SM id, 2 puts every program on SM 0; neither holds.
    """
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    pid = tl.program_id(0)
    n = tl.minimum(tl.maximum(tl.load(num_active_ptr), 0), K)
    if FAKE_SM == 0:
        sm = _smid() % NSM
    elif FAKE_SM == 1:
        sm = pid % NSM
    else:
        sm = pid * 0
    ticket = tl.atomic_add(sched_ptr + sm, 1)  # acq_rel, device scope
    arrived = tl.atomic_add(sched_ptr + NSM, 1)
    n_whole, split = tail_split(n, NSM, S, TAIL_MAX)
    tail_ticket = (n_whole // NSM) % 2
    if FAKE_SM == 0:
        if (ticket >= 2) | (sm + NSM * ticket >= n_whole):  # no whole slot: hold the SM a moment
            t0 = _globaltimer()
            while (tl.load(sched_ptr + NSM, volatile=True) < tl.num_programs(0)) & (_globaltimer() - t0 < HOLD_NS):
                pass
    if ticket < 2:
        _sm_duties(x_ptr, w_in_ptr, b_in_ptr, w_down_ptr, expert_ids_ptr, gates_ptr, partial_ptr, tail_ptr, sm, ticket,
                   n, n_whole, split, tail_ticket, d, E, NSM, S, GATED, HAS_BIAS, ACT, BLOCK_K, BLOCK_N, DOT_PREC,
                   D_TILE)  # fmt: skip
    if arrived == tl.num_programs(0) - 1:  # every ticket is taken: serve those of missing programs
        # One vector load of all SMs' counts (a loop of NSM atomics cost ~80 us of round trips).
        offs_sm = tl.arange(0, SM_BLOCK)
        taken_all = tl.load(sched_ptr + offs_sm, mask=offs_sm < NSM, other=2, volatile=True)
        if tl.min(taken_all, axis=0) < 2:
            _missing_duties(x_ptr, w_in_ptr, b_in_ptr, w_down_ptr, expert_ids_ptr, gates_ptr, partial_ptr, tail_ptr,
                            sched_ptr, n, n_whole, split, tail_ticket, d, E, NSM, S, GATED, HAS_BIAS, ACT, BLOCK_K,
                            BLOCK_N, DOT_PREC, D_TILE)  # fmt: skip


@triton.jit
def _missing_duties(x_ptr, w_in_ptr, b_in_ptr, w_down_ptr, expert_ids_ptr, gates_ptr, partial_ptr, tail_ptr, sched_ptr,
                    n, n_whole, split, tail_ticket, d, E, NSM, S: tl.constexpr, GATED: tl.constexpr,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_PREC: tl.constexpr, D_TILE: tl.constexpr):  # fmt: skip
    """The duties of the tickets no program took (an SM that got fewer than two programs), in SM order."""
    for other in range(0, NSM):
        taken = tl.load(sched_ptr + other, volatile=True)
        for t in range(taken, 2):
            _sm_duties(x_ptr, w_in_ptr, b_in_ptr, w_down_ptr, expert_ids_ptr, gates_ptr, partial_ptr, tail_ptr, other, t,
                       n, n_whole, split, tail_ticket, d, E, NSM, S, GATED, HAS_BIAS, ACT, BLOCK_K, BLOCK_N, DOT_PREC,
                       D_TILE)  # fmt: skip


@triton.jit
def _sm_duties(x_ptr, w_in_ptr, b_in_ptr, w_down_ptr, expert_ids_ptr, gates_ptr, partial_ptr, tail_ptr, sm, t, n,
               n_whole, split, tail_ticket, d, E, NSM, S: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
               ACT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
               D_TILE: tl.constexpr):  # fmt: skip
    """What ticket t on SM sm serves: its whole slots, then (ticket ``tail_ticket``) the SM's tail share."""
    for slot in range(sm + NSM * t, n_whole, 2 * NSM):
        _slot_expert(x_ptr, w_in_ptr, b_in_ptr, w_down_ptr, expert_ids_ptr, gates_ptr, partial_ptr, slot, d, E,
                     S, GATED, HAS_BIAS, ACT, BLOCK_K, BLOCK_N, DOT_PREC)  # fmt: skip
    if split & (t == tail_ticket):
        _tail_share(x_ptr, w_in_ptr, b_in_ptr, w_down_ptr, expert_ids_ptr, gates_ptr, tail_ptr, sm, n - n_whole,
                    n_whole, d, E, NSM, S, GATED, HAS_BIAS, ACT, D_TILE)  # fmt: skip


@triton.jit
def tail_split(n, NSM, S: tl.constexpr, TAIL_MAX: tl.constexpr):
    """``(n_whole, split)``: slots served whole, and whether the rest is split into single neurons.

    The r = n mod NSM slots past the last full wave of NSM would each double an SM's time. When
    they are at most TAIL_MAX neurons per SM (r S <= NSM TAIL_MAX) and there is a full wave
    before them, their neurons are shared out over all NSM SMs instead (stream-K style).
    """
    n_whole = (n // NSM) * NSM
    r = n - n_whole
    split = (n_whole > 0) & (r > 0) & (r * S <= NSM * TAIL_MAX)
    return tl.where(split, n_whole, n), split


@triton.jit
def _tail_share(x_ptr, w_in_ptr, b_in_ptr, w_down_ptr, expert_ids_ptr, gates_ptr, tail_ptr, p, r, first, d, E, NSM,
                S: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                D_TILE: tl.constexpr):  # fmt: skip
    """Share p of the tail's r S neurons (slots first .. first + r - 1): row p of tail, [d] fp32.

    Neuron u is row u % S of slot first + u // S; share p takes u in [p r S / NSM, (p + 1) r S / NSM),
    one whole row of d at a time (a few neurons: all of a row's loads are in flight at once).
    An empty share writes zeros: the reduction sums all NSM rows.
    """
    offs = tl.arange(0, D_TILE)
    d_ok = offs < d
    xv = tl.load(x_ptr + offs, mask=d_ok, other=0.0).to(tl.float32)  # [D_TILE], the token
    rows_in: tl.constexpr = 2 * S if GATED else S
    u0 = (p * r * S) // NSM
    u1 = ((p + 1) * r * S) // NSM
    acc = tl.zeros((D_TILE,), dtype=tl.float32)
    for u in range(u0, u1):
        slot = first + u // S
        row = u % S
        e = tl.load(expert_ids_ptr + slot).to(tl.int64)
        ok = (e >= 0) & (e < E)
        e = tl.where(ok, e, 0)
        g = tl.where(ok, tl.load(gates_ptr + slot), 0.0)
        w_gate = w_in_ptr + (e * rows_in + row) * d
        z = tl.sum(tl.load(w_gate + offs, mask=d_ok, other=0.0).to(tl.float32) * xv, axis=0)
        if HAS_BIAS:
            z += tl.load(b_in_ptr + e * S + row).to(tl.float32)
        h = apply_act(z, ACT)
        if GATED:
            h = h * tl.sum(tl.load(w_gate + S * d + offs, mask=d_ok, other=0.0).to(tl.float32) * xv, axis=0)
        h = tl.where(ok, h * g, 0.0)  # a where, so inf/nan of an invalid slot stay out
        acc += h * tl.load(w_down_ptr + (e * S + row) * d + offs, mask=d_ok, other=0.0).to(tl.float32)
    tl.store(tail_ptr + p * d + offs, acc, mask=d_ok)  # p * d < NSM * TAIL_MAX_D: no overflow


@triton.jit
def _slot_expert(x_ptr, w_in_ptr, b_in_ptr, w_down_ptr, expert_ids_ptr, gates_ptr, partial_ptr, slot, d, E,
                 S: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """The one token's slot ``slot``: its expert's whole FFN (R = S) into row ``slot`` of partial."""
    TP: tl.constexpr = 16
    offs_t = tl.arange(0, TP)
    e = tl.load(expert_ids_ptr + slot).to(tl.int64)
    active = (e >= 0) & (e < E)
    e = tl.where(active, e, 0)
    sel = tl.where((offs_t == 0) & active, 1, 0)  # [TP]
    g = tl.where(offs_t == 0, tl.load(gates_ptr + slot, mask=active, other=0.0), 0.0)  # [TP]
    row = e * 0 + slot  # int64: slot * d may pass 2^31
    if active:
        _expert_ffn(x_ptr, w_in_ptr, b_in_ptr, w_down_ptr, partial_ptr + row * d, e, sel, g, 0, 1, d,
                    d, S, S, TP, GATED, HAS_BIAS, ACT, BLOCK_K, BLOCK_N, True, DOT_PREC)  # fmt: skip


@triton.jit
def _expert_ffn(x_ptr, w_in_ptr, b_in_ptr, w_down_ptr, dst, e, sel, g, chunk, T, d, stride_x,
                S: tl.constexpr, R: tl.constexpr, TP: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                ACT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr,
                DOT_PREC: tl.constexpr):  # fmt: skip
    """Chunk ``chunk`` (R neurons) of expert e for the tokens ``sel`` marks, gates ``g`` [TP]: ``[T, d]`` fp32 at dst.

    Streams the R gate (and R up) rows once for every token, applies the activation and the gate in
    registers, then streams the R down rows; rows of tokens that did not select e are not written.
    """
    offs_t = tl.arange(0, TP)
    t_ok = offs_t < T
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


@triton.jit
def _globaltimer():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _smid():
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def decode_reduce_kernel(
    partial_ptr,  # [E, NC, T, d] fp32
    expert_ids_ptr,  # [T, K] int32
    num_active_ptr,  # [T] int32
    b_out_ptr,  # [d] or a dummy
    y_ptr,  # [T, d] out, dtype of x
    tail_ptr,  # [NSM, d] fp32 (TAIL_MAX > 0: decode_expert_sm_kernel's tail rows)
    T,
    K,
    E,
    d,
    stride_y,
    NSM,
    SLOT_GRID: tl.constexpr,
    TAIL_MAX: tl.constexpr,
    S: tl.constexpr,
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
    if TAIL_MAX > 0:  # the slots past the last full wave come as NSM tail rows
        n, split = tail_split(n, NSM, S, TAIL_MAX)
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
    if TAIL_MAX > 0:
        if split:  # then the tail rows, in SM order
            pdl_wait(PDL)
            for p0 in range(0, NSM, BLOCK_J):
                pp = p0 + tl.arange(0, BLOCK_J)
                rows = tl.load(tail_ptr + pp[:, None] * d + cols[None, :], mask=(pp < NSM)[:, None] & col_ok[None, :],
                               other=0.0)  # fmt: skip
                acc += tl.sum(rows, axis=0)
    if HAS_BIAS:
        acc += tl.load(b_out_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    pdl_wait(PDL)  # a token without slots skipped the loop; nothing is written before the wait
    tl.store(y_ptr + t * stride_y + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)
