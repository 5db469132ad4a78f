"""Background L2 prefetch from Triton kernels (sm_90+), for the decode step's idle memory time.

At batch 1 a decode step alternates kernels that stream weights at full bandwidth with kernels
whose time is latency (the last programs of the sparse expert kernel, the ordered reduction, the
residual add and norm): HBM idles for several microseconds per layer. A kernel that knows which
weight the step reads next can start loading it into L2 in that time: each of its programs, once
its own work is done, issues ``cp.async.bulk.prefetch.L2`` for its share of the bytes. The copy
engine fetches them in the background (no registers, no completion to wait for), and the next
kernel's loads of those bytes hit L2.

A prefetch is a hint: it changes no value, and the hardware may drop it. Only the byte range
given is touched; it must lie inside an allocation (callers pass a tensor's own bytes).
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Alignment and granularity of the bulk prefetch (bytes).
PREFETCH_ALIGN = 16


@triton.jit
def prefetch_l2_part(ptr, nbytes, part, parts, LANES: tl.constexpr):
    """Prefetch into L2 part ``part`` of ``parts`` equal slices of the ``nbytes`` bytes at ``ptr``.

    ``ptr`` must be 16-byte aligned. The slice is split over ``LANES`` elements (one per thread at
    ``LANES = 32 * num_warps``), each a single bulk prefetch of a multiple of 16 bytes; bytes past
    ``nbytes`` (and the last ``nbytes % 16``) are not touched.
    """
    per = tl.cdiv(tl.cdiv(nbytes, parts), 16 * LANES) * (16 * LANES)  # bytes per part
    chunk = per // LANES
    start = part.to(tl.int64) * per + tl.arange(0, LANES).to(tl.int64) * chunk
    size = (tl.minimum(tl.maximum(nbytes - start, 0), chunk) // 16 * 16).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r",
        [ptr.to(tl.pointer_type(tl.int8)) + start, size],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )
