"""Triton kernel bodies of split-KV decode attention (launchers: :mod:`prunepath_ops.attention.triton_attention`).

Legend: B sequences, Hq query heads, Hkv key/value heads, G = Hq // Hkv query heads per kv head,
G_PAD = G padded to a power of two >= 16 (the M dimension of ``tl.dot``), D head dim, S_max cache
rows, L_b valid keys of sequence b, NS splits of the key axis, CHUNK keys per split.

Flash-decoding in two kernels:
  1. ``decode_attention_split_kernel``: one program per (sequence b, kv head, split s) reads keys
     ``[s * CHUNK_b, min((s + 1) * CHUNK_b, L_b))`` of kv head h in BLOCK_N-row tiles, once for all
     G query heads that share it (GQA packing: the group's query rows form the M dimension of the
     dot), with an online softmax in fp32 (base 2, the scale folded into one multiply). With one
     split it writes the normalised output directly; otherwise a normalised fp32 partial output
     and its log2-sum-exp. The grid has NS splits per sequence (from S_max); sequence b cuts its own
     L_b keys over them (``sequence_chunk``: CHUNK_b keys each, whole tiles, at least ``min_chunk``), so
     a sequence far shorter than its cache is still spread over many programs, and its cut (hence its
     bits) depends on nothing but its own length. Programs whose chunk starts at or past L_b write nothing.
  2. ``combine_splits_kernel``: one program per (sequence, query head) merges the partials of the
     valid splits ``s < cdiv(L_b, CHUNK_b)`` in split order (bitwise reproducible, no atomics).

With ``BY_LENGTH`` (``triton_attention.SPLIT_BY_LENGTH``) the split of each sequence comes from the
batch's lengths instead of S_max (``length_split_plan``): at most B + cdiv(fill, Hkv) work items
per kv head, run by a grid of Hkv x P programs that loop over them (P no more than fit the GPU at
once), each mapping its item to (sequence, split) from the same plan; a sequence left with one
split writes its output directly and the combine kernel skips it.

Lengths are read on the device; the grid depends only on static sizes (CUDA-graph capturable).
With ``PDL`` (:mod:`prunepath_ops._pdl`) both kernels wait for their predecessor before any memory
access, so the combine's launch overlaps the split kernel's tail; results are bitwise unchanged.
A length outside ``[0, S_max]`` is clamped into it. With ``k_new``/``v_new``, the program whose
chunk holds row ``n = cache_seqlens[b]`` scores the new key from registers and writes both rows
into the caches itself: no other program reads row n, so there is no read-after-write hazard
across programs and no separate append kernel. The row is written only when ``0 <= n < S_max``;
the sequence then attends to ``n + 1`` keys, otherwise to the clamped ``n`` (no new key). With
``HAS_ROPE`` every program rotates its query rows, and the appending program the new key, by the
sequence's ``cos``/``sin`` row as ``rope_qkv`` does (same rounding, same bits), so a decode step
needs no separate RoPE launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from prunepath_ops._pdl import pdl_launch_dependents, pdl_wait


@triton.jit
def clamp_lengths(n, S_max, HAS_NEW: tl.constexpr):
    """``(n_old, L, has_new)`` of raw lengths ``n`` (a scalar or a block): clamped cache rows, keys
    attended, whether the new row is appended."""
    n_old = tl.minimum(tl.maximum(n, 0), S_max)
    if HAS_NEW:
        has_new = (n >= 0) & (n < S_max)
        L = n_old + has_new.to(tl.int32)
    else:
        has_new = n_old < 0  # always False; one return type for both branches
        L = n_old
    return n_old, L, has_new


@triton.jit
def valid_lengths(seqlens_ptr, b, stride_len, S_max, HAS_NEW: tl.constexpr):
    """:func:`clamp_lengths` of sequence ``b``."""
    return clamp_lengths(tl.load(seqlens_ptr + b * stride_len), S_max, HAS_NEW)


@triton.jit
def sequence_chunk(L, num_splits, min_chunk, BLOCK_N: tl.constexpr):
    """Keys per split of a sequence with ``L`` keys in the static plan: ``cdiv(L, num_splits)`` in whole
    BLOCK_N tiles, at least ``min_chunk`` (> 0), so ``cdiv(L, chunk) <= num_splits`` (host mirror:
    ``triton_attention.sequence_split``)."""
    per = (L + num_splits - 1) // num_splits
    return tl.maximum((per + BLOCK_N - 1) // BLOCK_N * BLOCK_N, min_chunk)


@triton.jit
def length_split_plan(
    seqlens_ptr, B, stride_len, S_max, Hkv, fill, min_chunk, max_splits,
    HAS_NEW: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The split plan of every sequence from the batch's lengths (``SPLIT_BY_LENGTH``), as ``[BLOCK_B]`` blocks.

    The batch's keys times Hkv over ``fill`` programs give ``W`` keys per program (at least
    ``min_chunk``); sequence b takes ``n_split_b = clamp(L_b // W, 1, max_splits)`` splits of
    ``chunk_b`` keys (a multiple of BLOCK_N, ``n_split_b * chunk_b >= L_b``) and owns the work items
    ``[first_b, first_b + n_split_b)`` of the grid (``n_split_b`` then lowered to ``cdiv(L_b, chunk_b)``
    where the rounding to whole tiles left a split empty). Every program computes the same plan from the
    same lengths, so no program waits for another. Since ``sum_b n_split_b <= B + fill / Hkv``, a grid
    of ``B + cdiv(fill, Hkv)`` items per kv head covers the batch, and ``cdiv(fill, Hkv)`` partials
    per (sequence, head) hold every split. Returns ``(raw, n_split, chunk, first)``, zeros past B
    (``raw``: the lengths as loaded, so that a program takes its own from the block, not from memory again).
    """
    offs = tl.arange(0, BLOCK_B)
    ok = offs < B
    raw = tl.load(seqlens_ptr + offs * stride_len, mask=ok, other=0)
    _, L, _ = clamp_lengths(raw, S_max, HAS_NEW)
    L = tl.where(ok, L, 0)  # a padding lane's 0 would count one appended key
    total = tl.sum(L.to(tl.int64), axis=0)
    W = tl.maximum((total * Hkv + fill - 1) // fill, min_chunk)
    n_split = tl.where(ok, tl.minimum(tl.maximum(L // W, 1), max_splits), 0).to(tl.int32)
    per = (L + n_split - 1) // tl.maximum(n_split, 1)
    chunk = tl.maximum((per + BLOCK_N - 1) // BLOCK_N * BLOCK_N, BLOCK_N)
    n_split = tl.where(ok, tl.maximum((L + chunk - 1) // chunk, 1), 0).to(tl.int32)  # tile rounding: no empty split
    first = tl.cumsum(n_split, axis=0) - n_split
    return raw, n_split, chunk, first


@triton.jit
def rotate(x, x_swap, cos, sin):
    """RoPE of ``x`` (any shape ending in D) as ``rope_qkv``: ``x * cos`` rounded to x's dtype, plus
    ``swap_halves(x) * sin`` (``sin`` signed, first half negated), rounded once: the same bits."""
    xc = (x.to(tl.float32) * cos).to(x.dtype).to(tl.float32)
    return (xc + x_swap.to(tl.float32) * sin).to(x.dtype)


@triton.jit
def attend_split(
    q_ptr, k_cache_ptr, v_cache_ptr, k_new_ptr, v_new_ptr, out_ptr, lse_ptr, final_ptr,
    b, hk, split, chunk, n_old, L, has_new, n_split_b, Hkv, num_splits, qk_scale,
    stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_nkb, stride_nkh, stride_nvb, stride_nvh, stride_ob, stride_oh, cos_ptr, sin_ptr, stride_cos, stride_sin,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_NEW: tl.constexpr, SINGLE: tl.constexpr, BY_LENGTH: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_ROPE: tl.constexpr,
):  # fmt: skip
    """One work item: keys ``[split * chunk, min((split + 1) * chunk, L))`` of sequence b, kv head hk."""
    b64 = b.to(tl.int64)
    start = split * chunk
    end = tl.minimum(start + chunk, L)
    stop_old = tl.minimum(end, n_old)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < GROUP
    # A split past the end (start >= L) loads nothing and stores nothing: it costs a length read.
    g_act = offs_g < tl.where(start < L, GROUP, 0)
    heads = hk * GROUP + offs_g
    q_rows = q_ptr + b64 * stride_qb + heads[:, None] * stride_qh  # [G_PAD, 1]
    q = tl.load(q_rows + offs_d[None, :], mask=g_act[:, None], other=0.0)  # [G_PAD, D]
    if HAS_ROPE:  # the rows of sequence b's position, as rope_qkv applies them
        cos = tl.load(cos_ptr + b64 * stride_cos + offs_d).to(tl.float32)  # [D]
        sin = tl.load(sin_ptr + b64 * stride_sin + offs_d).to(tl.float32)  # [D] signed
        q_swap = tl.load(q_rows + ((offs_d + D // 2) % D)[None, :], mask=g_act[:, None], other=0.0)
        q = rotate(q, q_swap, cos, sin)
    m = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D], dtype=tl.float32)
    k_base = k_cache_ptr + b64 * stride_kb + hk * stride_kh
    v_base = v_cache_ptr + b64 * stride_vb + hk * stride_vh

    # Every tile holds at least one valid row, so the running max is finite after the first one.
    for n0 in range(start, stop_old, BLOCK_N):
        rows = n0 + offs_n
        r_ok = rows < stop_old
        rows64 = rows.to(tl.int64)
        kt = tl.load(k_base + rows64[None, :] * stride_ks + offs_d[:, None], mask=r_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # [G_PAD, BLOCK_N]
        s = tl.where(r_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        # Masked rows load as 0, never as whatever the cache holds there (NaN * 0 would leak).
        v = tl.load(v_base + rows64[:, None] * stride_vs + offs_d[None, :], mask=r_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m = m_new

    if HAS_NEW:
        if has_new & (n_old >= start) & (n_old < end):
            kn_row = k_new_ptr + b64 * stride_nkb + hk * stride_nkh
            kn = tl.load(kn_row + offs_d)  # [D]
            if HAS_ROPE:
                kn = rotate(kn, tl.load(kn_row + (offs_d + D // 2) % D), cos, sin)
            vn = tl.load(v_new_ptr + b64 * stride_nvb + hk * stride_nvh + offs_d)  # [D]
            s_new = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], axis=1) * qk_scale  # [G_PAD]
            m_upd = tl.maximum(m, s_new)
            alpha_new = tl.exp2(m - m_upd)
            p_new = tl.exp2(s_new - m_upd)
            l_sum = l_sum * alpha_new + p_new
            acc = acc * alpha_new[:, None] + p_new[:, None] * vn.to(tl.float32)[None, :]
            m = m_upd
            new_row = n_old.to(tl.int64)
            tl.store(k_base + new_row * stride_ks + offs_d, kn)
            tl.store(v_base + new_row * stride_vs + offs_d, vn)

    # l = 0 only where nothing was read (L_b = 0, or a split past the end): acc = 0 there, out = 0.
    l_safe = tl.where(l_sum > 0.0, l_sum, 1.0)
    out = acc / l_safe[:, None]
    if SINGLE:
        dst = out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
    else:
        part = g_act
        if BY_LENGTH:  # a one-split sequence's split 0 writes its output (zeros for L_b = 0); no combine
            dst = final_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
            # tl.where, not `g_ok & scalar`: Triton's interpreter rejects a block mask combined with a scalar.
            direct = tl.where((n_split_b == 1) & (split == 0), g_ok, False)
            tl.store(dst, out.to(final_ptr.dtype.element_ty), mask=direct[:, None])
            part = tl.where(n_split_b != 1, part, False)
        row = (b64 * (Hkv * GROUP) + heads) * num_splits + split  # [G_PAD] index into [B, Hq, NS]
        tl.store(out_ptr + row[:, None] * D + offs_d[None, :], out, mask=part[:, None])
        tl.store(lse_ptr + row, m + tl.log2(l_safe), mask=part)


@triton.jit
def decode_attention_split_kernel(
    q_ptr,  # [B, Hq, D]
    k_cache_ptr,  # [B, S_max, Hkv, D], rows n_old of kv head h written when HAS_NEW
    v_cache_ptr,  # [B, S_max, Hkv, D]
    k_new_ptr,  # [B, Hkv, D] or a dummy
    v_new_ptr,  # [B, Hkv, D] or a dummy
    seqlens_ptr,  # [B] int32
    out_ptr,  # [B, Hq, D] dtype of q when SINGLE, else [B, Hq, NS, D] fp32 partials (contiguous)
    lse_ptr,  # [B, Hq, NS] fp32 log2-sum-exp of each partial (unused when SINGLE)
    final_ptr,  # [B, Hq, D] dtype of q: BY_LENGTH's one-split sequences (strides of out when SINGLE)
    cos_ptr,  # [B, D] RoPE cos of each sequence's position (HAS_ROPE), or a dummy
    sin_ptr,  # [B, D] signed sin (first half negated), or a dummy
    B,
    S_max,
    Hkv,
    num_splits,  # NS: the grid's splits, or BY_LENGTH's partials per (sequence, head)
    fill,  # BY_LENGTH: programs the plan aims for (the grid may hold fewer: each then loops over items)
    min_chunk,  # fewest keys per split (> 0)
    qk_scale,  # softmax_scale * log2(e)
    stride_len,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_nkb,
    stride_nkh,
    stride_nvb,
    stride_nvh,
    stride_ob,
    stride_oh,
    stride_cos,
    stride_sin,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_NEW: tl.constexpr,
    SINGLE: tl.constexpr,
    BY_LENGTH: tl.constexpr,
    BLOCK_B: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HAS_ROPE: tl.constexpr,  # rotate q and k_new by cos / sin before attending (and appending)
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    if BY_LENGTH:  # grid (Hkv, P): program p runs work items p, p + P, ... of kv head hk
        hk = tl.program_id(0)
        raw_all, n_split_all, chunk_all, first_all = length_split_plan(
            seqlens_ptr, B, stride_len, S_max, Hkv, fill, min_chunk, num_splits, HAS_NEW, BLOCK_B, BLOCK_N
        )
        offs_b = tl.arange(0, BLOCK_B)
        n_items = tl.sum(n_split_all, axis=0)
        # At most one wave of programs (the launcher sizes P to what fits the GPU at once): a grid
        # past that let the programs that only read the lengths and exit slow the working ones
        # (bench/results/kv_split_plan_parts_item_grid.md).
        # No loop-invariant code motion out of this loop: hoisted, the append path's invariants stay live
        # across the key loop (191 registers for sm_90, 2 programs per SM; 106 without, 3 per SM:
        # bench/results/kv_attention_resources_sm90.md).
        for item in tl.range(tl.program_id(1), n_items, tl.num_programs(1), disable_licm=True):
            # The item is split item - first_b of the last sequence b whose first item is at most it.
            b = tl.sum(((first_all <= item) & (offs_b < B)).to(tl.int32), axis=0) - 1
            mine = offs_b == b
            split = item - tl.sum(tl.where(mine, first_all, 0), axis=0)
            chunk_b = tl.sum(tl.where(mine, chunk_all, 0), axis=0).to(tl.int32)
            n_split_b = tl.sum(tl.where(mine, n_split_all, 0), axis=0)  # 1: the final output is written here
            # The plan's block already holds this length: a second load would add a dependent memory round trip.
            n_old, L, has_new = clamp_lengths(tl.sum(tl.where(mine, raw_all, 0), axis=0), S_max, HAS_NEW)
            attend_split(
                q_ptr, k_cache_ptr, v_cache_ptr, k_new_ptr, v_new_ptr, out_ptr, lse_ptr, final_ptr,
                b, hk, split, chunk_b, n_old, L, has_new, n_split_b, Hkv, num_splits, qk_scale,
                stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                stride_nkb, stride_nkh, stride_nvb, stride_nvh, stride_ob, stride_oh, cos_ptr, sin_ptr, stride_cos,
                stride_sin, GROUP, G_PAD, D, BLOCK_N, HAS_NEW, SINGLE, BY_LENGTH, DOT_PREC, HAS_ROPE,
            )  # fmt: skip
    else:  # grid (B * Hkv, NS)
        pid_bh = tl.program_id(0)
        b = pid_bh // Hkv
        hk = pid_bh % Hkv
        n_old, L, has_new = valid_lengths(seqlens_ptr, b, stride_len, S_max, HAS_NEW)
        attend_split(
            q_ptr, k_cache_ptr, v_cache_ptr, k_new_ptr, v_new_ptr, out_ptr, lse_ptr, final_ptr,
            b, hk, tl.program_id(1), sequence_chunk(L, num_splits, min_chunk, BLOCK_N), n_old, L, has_new, 1,
            Hkv, num_splits, qk_scale,
            stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            stride_nkb, stride_nkh, stride_nvb, stride_nvh, stride_ob, stride_oh, cos_ptr, sin_ptr, stride_cos,
            stride_sin, GROUP, G_PAD, D, BLOCK_N, HAS_NEW, SINGLE, BY_LENGTH, DOT_PREC, HAS_ROPE,
        )  # fmt: skip


@triton.jit
def combine_splits_kernel(
    o_part_ptr,  # [B, Hq, NS, D] fp32
    lse_ptr,  # [B, Hq, NS] fp32
    out_ptr,  # [B, Hq, D], dtype of q
    seqlens_ptr,  # [B] int32
    B,
    S_max,
    Hq,
    Hkv,
    num_splits,
    fill,  # BY_LENGTH: as the split kernel's
    min_chunk,
    stride_len,
    stride_ob,
    stride_oh,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_NEW: tl.constexpr,
    BY_LENGTH: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_launch_dependents(PDL)
    pid = tl.program_id(0)
    b = pid // Hq
    h = pid % Hq
    # The lengths were final before the split kernel started: read them before waiting for it.
    _, L, _ = valid_lengths(seqlens_ptr, b, stride_len, S_max, HAS_NEW)
    if BY_LENGTH:  # the split kernel's plan; a one-split sequence's output is already written
        _, n_split_all, chunk_all, _ = length_split_plan(
            seqlens_ptr, B, stride_len, S_max, Hkv, fill, min_chunk, num_splits, HAS_NEW, BLOCK_B, BLOCK_N
        )
        mine = tl.arange(0, BLOCK_B) == b
        chunk = tl.sum(tl.where(mine, chunk_all, 0), axis=0).to(tl.int32)
        merge = tl.sum(tl.where(mine, n_split_all, 0), axis=0) != 1
    else:
        chunk = sequence_chunk(L, num_splits, min_chunk, BLOCK_N)
    pdl_wait(PDL)
    n_valid = (L + chunk - 1) // chunk  # splits the attention kernel wrote
    if BY_LENGTH:
        n_valid = tl.where(merge, n_valid, 0)
    base = pid.to(tl.int64) * num_splits
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)

    # One pass: a block's log-sum-exps and partials are loaded together (one memory round trip, not
    # a first one for the maximum), and the running sums rescaled when a later block raises the
    # maximum. With one block (n_valid <= BLOCK_S: up to 32 splits) the rescale multiplies zeros
    # and the bits are those of the two-pass merge. Splits in index order, one fixed reduction tree
    # per block: the same bits on every run.
    m = tl.full([], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([D], dtype=tl.float32)
    w_vec = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, n_valid, BLOCK_S):
        sel = s0 + offs_s
        ok = sel < n_valid
        lse = tl.load(lse_ptr + base + sel, mask=ok, other=float("-inf"))
        o = tl.load(o_part_ptr + (base + sel)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no finite score yet: keep exp2's argument finite
        scale = tl.exp2(m - m_ref)
        w = tl.where(ok, tl.exp2(lse - m_ref), 0.0)
        acc = acc * scale + tl.sum(w[:, None] * o, axis=0)
        w_vec = w_vec * scale + w
        m = m_new
    w_sum = tl.sum(w_vec, axis=0)
    out = acc / tl.where(w_sum > 0.0, w_sum, 1.0)  # no valid split (L_b = 0): zeros
    dst = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d
    if BY_LENGTH:
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=tl.where(merge, offs_d < D, False))
    else:
        tl.store(dst, out.to(out_ptr.dtype.element_ty))
