"""Launcher of the Triton split-KV decode attention: pick tiles and splits, allocate, launch.

Legend: B sequences, Hq query heads, Hkv key/value heads, G = Hq // Hkv, D head dim, S_max cache
rows, NS splits of the key axis, CHUNK keys per split. Nothing here reads a length on the host:
the grid comes from static sizes only, so the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
from torch import Tensor

from prunepath_ops import _pdl
from prunepath_ops.attention import kernels
from prunepath_ops.ffn._env import interpreting as _interpreting

#: Programs per SM the split count aims for when the batch alone does not fill the GPU.
PROGRAMS_PER_SM = 2
#: Fewest keys per split (one tile of 64): at batch 1 a short cache is cut until its programs fill
#: the GPU, since each program's tiles are a chain of dependent loads. In the decode step of
#: bench/decode_e2e_gpu.py (768 cache rows, 8 kv heads) 12 splits of 64 gave 351.8 tok/s at 30 %
#: experts against 340.1 with 3 of 256 (and the dense step 213.4 against 210.0) in one session
#: (bench/results/decode_e2e_cuda_chunk*.md); longer caches reach MAX_CHUNK or the fill target first.
MIN_CHUNK = 64
#: Most keys per split, whatever the batch: bounds the work of one program, so that a few long
#: sequences in a batch of short ones are spread over many SMs instead of finishing last.
MAX_CHUNK = 512
#: Longest cache that is not split when the batch alone gives every SM a program: a split then
#: only adds a partial write and the combine kernel, and a cache this short cannot leave one
#: sequence's programs running long after the others. B = 32 x 8 kv heads, 1280 rows on the H200:
#: 46.1 us in one split against 53.6 us in the three the fill rule made (CUDA graph replays,
#: bench/results/kv_attention_cuda_static_sweep.md, sweep); SDPA given the exact prefix took 46.2 us.
SHORT_CACHE = 2048
#: The grid's second axis (the splits) is limited to 65535 programs.
MAX_SPLITS = 65535
#: Split each sequence by the batch's actual lengths on the device (kernels.length_split_plan)
#: instead of by S_max: True always, False never, None (default) for batches of more than one
#: sequence with caches longer than LONG_CACHE.
#: A batch whose sequences alone fill the GPU then runs one split per sequence (no partials, no
#: merge) while one long sequence among short ones is still cut into many, and a cache allocated
#: far longer than its sequences is cut by what they hold. On the H200 (CUDA graphs, B = 8 / 32 at
#: 4k-16k keys; bench/results/kv_attention_cuda_by_length_nopdl.md against kv_attention_cuda_static_nopdl.md,
#: one run) it took 1.01-1.04x SDPA's best where the static plan took 1.05-1.10x, and the ragged
#: batch 80 us against 95.
SPLIT_BY_LENGTH: bool | None = None
#: Longest cache the default (SPLIT_BY_LENGTH None) still splits by S_max: up to 2k keys the static
#: plan is as fast or faster (B = 32 / 1k: one split, 46 us against the length plan's 50). At B = 1
#: the default keeps the static plan at any length: its one sequence cuts its own keys over the
#: grid's splits (sequence_split) the way the length plan would, without the ~1-1.5 us of planning
#: before the first key is loaded (B = 1 / 16k back to back: 24.5 us against 25.8, one run:
#: bench/results/kv_attention_cuda_per_sequence_cut.md against kv_attention_cuda_length_prealloc.md).
LONG_CACHE = 2048
#: Largest batch the length plan covers (every program reads all B lengths); larger ones split by S_max.
MAX_LENGTH_PLAN_BATCH = 1024

# Programs of the split kernel resident at once per launch configuration (see resident_programs).
_RESIDENT: dict[tuple, int] = {}


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a nominal 4 for the CPU interpreter)."""
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def split_plan(
    B: int,
    Hkv: int,
    S_max: int,
    sms: int,
    block_n: int,
    num_splits: int | None = None,
    *,
    min_chunk: int | None = None,
    max_chunk: int | None = None,
    short_cache: int | None = None,
) -> tuple[int, int]:
    """``(NS, CHUNK)`` from static sizes: how the key axis ``[0, S_max)`` is cut between programs.

    Without ``num_splits``: one split when ``B * Hkv >= sms`` and ``S_max <= short_cache``;
    otherwise enough splits that ``B * Hkv * NS`` reaches ``PROGRAMS_PER_SM * sms`` and that no
    split exceeds ``max_chunk`` keys, but none below ``min_chunk`` keys. ``CHUNK`` is a multiple of
    ``block_n`` and ``NS = cdiv(S_max, CHUNK)``, so the splits cover every row once.

    Examples
    --------
    >>> split_plan(1, 8, 16640, 132, 64)  # one long sequence still fills 132 SMs
    (33, 512)
    >>> split_plan(32, 8, 4352, 132, 64)
    (9, 512)
    >>> split_plan(32, 8, 1280, 132, 64)  # the batch fills the GPU, the cache is short: no split
    (1, 1280)
    """
    # The module constants are read at each call, so a benchmark can try other values.
    min_chunk = MIN_CHUNK if min_chunk is None else min_chunk
    max_chunk = MAX_CHUNK if max_chunk is None else max_chunk
    short_cache = SHORT_CACHE if short_cache is None else short_cache
    if S_max <= 0:
        return 1, block_n
    if num_splits is None and B * Hkv >= sms and S_max <= short_cache:
        num_splits = 1
    if num_splits is None:
        fill = triton.cdiv(PROGRAMS_PER_SM * sms, max(1, B * Hkv))
        by_length = triton.cdiv(S_max, max_chunk)
        num_splits = min(max(fill, by_length), max(1, S_max // min_chunk))
    num_splits = max(1, min(num_splits, triton.cdiv(S_max, block_n), MAX_SPLITS))
    chunk = triton.cdiv(triton.cdiv(S_max, num_splits), block_n) * block_n
    return triton.cdiv(S_max, chunk), chunk


def sequence_split(length: int, num_splits: int, min_chunk: int, block_n: int) -> tuple[int, int]:
    """``(splits used, chunk)`` of one sequence in the static plan (host mirror of ``kernels.sequence_chunk``).

    The grid gives each sequence ``num_splits`` programs (:func:`split_plan`, from S_max); the sequence
    cuts its own ``length`` keys (appended key included) over them: ``cdiv(length, num_splits)`` keys per
    split in whole ``block_n`` tiles, at least ``min_chunk``. A sequence far shorter than its cache is
    then still spread over many programs, and its cut depends on nothing but its own length.

    Examples
    --------
    >>> sequence_split(16384, 33, 64, 64)  # a cache its sequence fills: as the cut of S_max = 16640
    (32, 512)
    >>> sequence_split(1024, 33, 64, 64)  # 1k keys in the same cache: 16 programs of one tile, not 2 of 512
    (16, 64)
    >>> sequence_split(0, 33, 64, 64)  # nothing to read: no split
    (0, 64)
    """
    chunk = max(triton.cdiv(triton.cdiv(max(length, 0), num_splits), block_n) * block_n, min_chunk)
    return triton.cdiv(max(length, 0), chunk), chunk


def length_split_plan(
    lens: list[int], Hkv: int, S_max: int, fill: int, min_chunk: int, max_splits: int, block_n: int,
    has_new: bool = False,
) -> list[tuple[int, int]]:  # fmt: skip
    """Host mirror of the kernels' ``length_split_plan`` (``SPLIT_BY_LENGTH``): ``(n_split_b, chunk_b)`` per sequence.

    ``lens`` are raw ``cache_seqlens`` values, clamped as the op does. For tests and benchmark
    reports; the launch itself never reads lengths on the host.

    Examples
    --------
    >>> length_split_plan([4096] * 32, 8, 4352, 264, 64, 33, 64)[0]  # the batch fills the GPU: one split each
    (1, 4096)
    >>> length_split_plan([16384] + [1000] * 31, 8, 16640, 264, 64, 33, 64)[:2]  # the long one is cut
    [(11, 1536), (1, 1024)]
    """
    L = [min(max(n, 0), S_max) + int(has_new and 0 <= n < S_max) for n in lens]
    W = max(triton.cdiv(sum(L) * Hkv, fill), min_chunk)
    plan = []
    for n in L:
        ns = min(max(n // W, 1), max_splits)
        chunk = max(triton.cdiv(triton.cdiv(n, ns), block_n) * block_n, block_n)
        plan.append((max(triton.cdiv(n, chunk), 1), chunk))
    return plan


def programs_per_sm(shared_bytes: int, num_warps: int, n_regs: int | None, props) -> int:
    """Programs of one kernel an SM holds at once: the least of the shared-memory, thread and register limits.

    ``props`` is a ``torch.cuda.get_device_properties`` result (any object with its fields); a field
    it lacks drops that limit. 1 KB of shared memory per program is reserved by the driver.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> h200 = SimpleNamespace(shared_memory_per_multiprocessor=233472, max_threads_per_multi_processor=2048,
    ...                        regs_per_multiprocessor=65536)
    >>> programs_per_sm(71680, 4, 86, h200)  # the attention kernel's 70 KB at D = 128: shared memory limits
    3
    >>> programs_per_sm(71680, 4, 191, h200)  # 192 x 32 x 4 registers per program: registers limit
    2
    """
    limits = [max(1, getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps))]
    smem = getattr(props, "shared_memory_per_multiprocessor", 0)
    if smem and shared_bytes:
        limits.append(smem // (shared_bytes + 1024))
    regs = getattr(props, "regs_per_multiprocessor", 0)
    if regs and n_regs:
        per_warp = -(-n_regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
        limits.append(regs // (per_warp * num_warps))
    return max(1, min(limits))


def resident_programs(kernel, args: tuple, kwargs: dict, device: torch.device, key: tuple) -> int:
    """Programs of ``kernel`` (launched with ``args``/``kwargs``) resident on ``device`` at once, cached under ``key``.

    Compiles (or finds in Triton's cache) and loads the kernel without launching it, and reads its
    shared memory, warps and registers (for sm_90 the length plan's kernel takes 138 registers
    without an append and 106 with one, 3 programs per SM; before its loop kept its invariants,
    191 with one: 2 per SM, ``bench/results/kv_attention_resources_sm90.md``); the interpreter
    counts one program per nominal SM.
    """
    if key not in _RESIDENT:
        if _interpreting() or device.type != "cuda":
            _RESIDENT[key] = num_sms(device)
        else:
            compiled = kernel.warmup(*args, grid=(1,), **kwargs)
            md = compiled.metadata
            n_regs = None
            try:  # the register count is known once the module is loaded (Triton's CompiledKernel, private)
                compiled._init_handles()
                n_regs = compiled.n_regs
            except Exception:  # another Triton: shared memory and threads only
                pass
            props = torch.cuda.get_device_properties(device)
            _RESIDENT[key] = num_sms(device) * programs_per_sm(md.shared, md.num_warps, n_regs, props)
    return _RESIDENT[key]


def programs_per_head(items: int, resident: int, Hkv: int) -> int:
    """The length plan's programs per kv head: its ``items``, or as many as ``resident`` programs spread over Hkv heads.

    Examples
    --------
    >>> programs_per_head(36, 396, 8)  # every item its own program: 288 of the 396 that fit
    36
    >>> programs_per_head(65, 396, 8)  # one wave: 49 programs per kv head, some loop over two items
    49
    """
    return max(1, min(items, resident // Hkv))


def launch_config(
    B: int,
    Hkv: int,
    S_max: int,
    D: int,
    device: torch.device,
    *,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    split_by_length: bool | None = None,
) -> dict:
    """Tiles and splits the launcher uses for these static sizes; ``None`` arguments take the defaults.

    Returns
    -------
    dict
        ``block_n`` (keys per tile), ``num_splits`` and ``chunk`` (from :func:`split_plan`: the grid's
        splits per sequence and the longest chunk), ``min_chunk`` (fewest keys per split: a sequence
        cuts its own keys over the splits, :func:`sequence_split`; ``block_n`` with a forced
        ``num_splits``), ``num_warps`` and ``num_stages`` of the attention kernel (``None`` under the interpreter),
        ``by_length`` (whether the kernels plan the splits from the lengths: ``split_by_length``, else
        :data:`SPLIT_BY_LENGTH`, whose default None means ``B > 1 and S_max > LONG_CACHE``; never with a forced
        ``num_splits``) and then ``fill`` (programs aimed for), ``min_chunk`` (the plan's),
        ``items`` (most work items per kv head, ``B + cdiv(fill, Hkv)``; the launcher runs them in
        :func:`programs_per_head` programs per kv head) and ``num_splits`` (partials per sequence
        and head, ``cdiv(fill, Hkv)``).
    """
    interp = _interpreting()
    if block_n is None:
        block_n = 16 if interp else (64 if D <= 128 else 32)
    # The interpreter's chunks are a few tiles, so that tiny test caches take the split path too.
    chunks = {"min_chunk": block_n, "max_chunk": 2 * block_n, "short_cache": 0} if interp else {}
    ns, chunk = split_plan(B, Hkv, S_max, num_sms(device), block_n, num_splits, **chunks)
    if interp:
        num_warps = num_stages = None
    else:
        num_warps = num_warps or 4
        num_stages = num_stages or (3 if D <= 128 else 2)
    plan_min = chunks.get("min_chunk", MIN_CHUNK)
    min_chunk = block_n if num_splits is not None else triton.cdiv(plan_min, block_n) * block_n
    cfg = {"block_n": block_n, "num_splits": ns, "chunk": chunk, "min_chunk": min_chunk, "num_warps": num_warps,
           "num_stages": num_stages}  # fmt: skip
    by_length = SPLIT_BY_LENGTH if split_by_length is None else split_by_length
    if by_length is None:
        by_length = B > 1 and S_max > LONG_CACHE
    cfg["by_length"] = bool(by_length) and num_splits is None and 0 < B <= MAX_LENGTH_PLAN_BATCH and S_max > 0
    if cfg["by_length"]:
        fill = PROGRAMS_PER_SM * num_sms(device)
        parts = triton.cdiv(fill, Hkv)
        cfg.update(fill=fill, min_chunk=plan_min, items=B + parts, num_splits=parts, chunk=0)
    return cfg


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 products (TF32 would cost ~1e-3 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device, which need not be the tensors' one.
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def kv_decode_attention_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k_new: Tensor | None,
    v_new: Tensor | None,
    softmax_scale: float | None,
    *,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    block_s: int | None = None,
    pdl: bool | None = None,
    split_by_length: bool | None = None,
    programs: int | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
) -> Tensor:
    """Split-KV decode attention with the Triton kernels; arguments as :func:`prunepath_ops.attention.kv_decode_attention`.

    Inputs must already be validated (:func:`prunepath_ops.attention.ops.check_kv_decode_attention_args`):
    last dims contiguous, D a power of two in [16, 256]. Writes ``k_new``/``v_new`` into the caches
    in place. The keyword arguments override the choice of :func:`launch_config` (for sweeps):
    ``block_n`` keys per tile, ``num_splits`` splits of the key axis (1: one kernel, no combine),
    ``num_warps`` and ``num_stages`` of the attention kernel, ``block_s`` splits per step of the
    combine kernel, ``pdl`` the programmatic dependent launch (default :func:`prunepath_ops._pdl.use_pdl`),
    ``split_by_length`` the device-side split plan from the lengths (default :data:`SPLIT_BY_LENGTH`:
    for B > 1 and caches longer than :data:`LONG_CACHE`; ignored with ``num_splits``). Both kernels
    launch without PDL for B > 1 unless ``pdl=True``. With the length plan a sequence's splits, and
    so the bits of its output, depend on the other sequences' lengths; the same inputs still give
    the same bits. ``programs`` sets the
    length plan's programs per kv head (default: as many as fit the GPU at once, at most the work
    items); it changes which program runs an item, never the bits. ``rotary_cos``/``rotary_sin``
    (``[B, D]``, both or neither) rotate q and ``k_new`` in the kernel, as ``rope_qkv`` would before it.

    Returns
    -------
    Tensor
        ``[B, Hq, D]`` contiguous, dtype of ``q``.
    """
    B, Hq, D = q.shape
    S_max, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    interp = _interpreting()
    cfg = launch_config(
        B, Hkv, S_max, D, q.device, block_n=block_n, num_splits=num_splits, num_warps=num_warps,
        num_stages=num_stages, split_by_length=split_by_length,
    )  # fmt: skip
    ns, by_length, min_chunk = cfg["num_splits"], cfg["by_length"], cfg["min_chunk"]
    # BY_LENGTH: a grid of Hkv x programs, every program planning from all B lengths.
    # Zeros when unused, so that the static plan's kernels are not specialised on B.
    plan_b, fill = (B, cfg["fill"]) if by_length else (0, 0)
    block_b = max(16, triton.next_power_of_2(B)) if by_length else 1
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    has_new = k_new is not None
    dummy = k_cache
    kn, vn = (k_new, v_new) if has_new else (dummy, dummy)
    nk_strides = (kn.stride(0), kn.stride(1)) if has_new else (0, 0)
    nv_strides = (vn.stride(0), vn.stride(1)) if has_new else (0, 0)
    has_rope = rotary_cos is not None
    cos, sin = (rotary_cos, rotary_sin) if has_rope else (dummy, dummy)
    rope_strides = (rotary_cos.stride(0), rotary_sin.stride(0)) if has_rope else (0, 0)
    single = ns == 1 and not by_length
    if single:
        o_part, lse = out, out  # the lse pointer is never used with one split
    else:
        o_part = torch.empty(B, Hq, ns, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, Hq, ns, dtype=torch.float32, device=q.device)
    if B > 1 and pdl is None:
        # Launched early beside the kernel before it, long programs land on whatever slots that
        # kernel frees first and crowd some SMs. Back to back in one graph (the benchmark's steady
        # column) the length plan took 164.7 us per call at B = 32 / 4k with PDL and 126.6 without,
        # 47.3 and 40.0 at B = 8 / 4k; the static plan 44.3 and 34.6 at B = 32 / 1k, and never
        # less without (bench/results/kv_attention_cuda_{by_length,static}_{pdl,nopdl}.md, one session).
        # At B = 1 the one sequence is cut into ~2 programs per SM of a few hundred keys, and PDL's
        # earlier start is worth more (B = 1 / 4k graphed: 17.7 us with it, 18.9 without).
        pdl = False
    pdl = _pdl.resolve(pdl, q.device)
    launch = _pdl.launch_options(pdl)
    opts = {} if interp else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], **launch}
    args = (
        q, k_cache, v_cache, kn, vn, cache_seqlens, o_part, lse, out, cos, sin,
        plan_b, S_max, Hkv, ns, fill, min_chunk, scale * math.log2(math.e), cache_seqlens.stride(0),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *nk_strides, *nv_strides, out.stride(0), out.stride(1), *rope_strides,
    )  # fmt: skip
    meta = dict(
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), D=D, BLOCK_N=cfg["block_n"],
        HAS_NEW=has_new, SINGLE=single, BY_LENGTH=by_length, BLOCK_B=block_b,
        DOT_PREC=_dot_precision(q.dtype), HAS_ROPE=has_rope, PDL=pdl, **opts,
    )  # fmt: skip
    with _device_guard(q.device):
        if by_length:
            # No more programs than the GPU holds at once: a second wave of programs that only read
            # the lengths slowed the working ones by ~15 % (bench/results/kv_split_plan_parts_item_grid.md).
            if programs is None:
                key = (q.device, q.dtype, D, group, has_new, has_rope, block_b, tuple(sorted(opts.items())))
                resident = resident_programs(kernels.decode_attention_split_kernel, args, meta, q.device, key)
                programs = programs_per_head(cfg["items"], resident, Hkv)
            grid = (Hkv, max(1, min(programs, cfg["items"])))
        else:
            grid = (B * Hkv, ns)
        kernels.decode_attention_split_kernel[grid](*args, **meta)
        if not single and not (by_length and ns == 1):  # one partial per sequence: every output written above
            bs = block_s or min(triton.next_power_of_2(ns), 16 if interp else 32)
            kernels.combine_splits_kernel[(B * Hq,)](
                o_part, lse, out, cache_seqlens, plan_b, S_max, Hq, Hkv, ns, fill, min_chunk,
                cache_seqlens.stride(0), out.stride(0), out.stride(1), D=D, BLOCK_S=bs, HAS_NEW=has_new,
                BY_LENGTH=by_length, BLOCK_B=block_b, BLOCK_N=cfg["block_n"], PDL=pdl,
                **({} if interp else {"num_warps": 4 if D >= 128 else 2, **launch}),
            )  # fmt: skip
    return out
