#!/usr/bin/env python
"""Where the prefill FFN's time goes at 30 % active, and what bounds its up kernel (H200, issue 3).

Llama-3-8B FFN (d 4096, F 14336, S 32, E 448), bf16, T = 4096, every token keeping 30 % of the
experts at random (``bench/sparse_ffn_gpu.py``'s routing). Three tables, every time from
``triton.testing.do_bench`` (L2 flushed, median) in one process:

1. The whole call (``sparse_ffn_prefill_triton``) under several tile and dense-group settings,
   eager and replayed from one CUDA graph (the difference is what the launches cost when nothing
   else keeps the GPU busy), beside the dense FFN.
2. Its parts alone: alignment, the zero fill of ``H``, the dense-group flags, the up kernel, the
   cuBLAS down projection.
3. What bounds the up kernel: ``gather_dot_kernel`` repeats its loop (the same gathered rows of x,
   the same tiles and pipeline) against N = 16, 32, 64 or 128 weight columns per row and sums
   the accumulator per row instead of writing ``H``. If N = 16 takes about as long as N = 64, the
   gathered bytes bound the kernel (fewer L2 bytes per row is the only lever); if N = 128 takes
   about as long as N = 64, the tensor cores have room for more columns per gathered row. The
   same loop over contiguous rows (no gather) tells what the row indexing costs.

    python3 bench/diag/prefill_up_diag.py --out /tmp/out      # on the H200, ~2 minutes
    python3 bench/diag/prefill_up_diag.py --ncu                # the default call only, for ncu

4. The up kernel's timeline: one launch traced (SM id and ``%globaltimer`` per block), when each SM
   ran out of blocks, the time of full and partial blocks.
5. The up kernel at a few experts per token around the default: whether the number of blocks
   against whole waves of one block per SM shows in its time.
6. The same grouped shape fed by TMA: ``torch._grouped_mm`` (CUTLASS) and cuBLAS on the rows of x
   gathered beforehand (expert-major, the gather not timed): what the up kernel's N = 64 shape
   costs without cp.async gathers, the ceiling of any gather-free design.
7. Ways to zero ``H`` (torch's fill kernel, a Triton store stream, ``cudaMemsetAsync``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from common import capture, environment, header_lines, write_results  # noqa: E402
from sparse_ffn_gpu import dense_fn, fixed_fraction_route, llama3_8b_prefill  # noqa: E402

from prunepath_ops.ffn import triton_ffn  # noqa: E402
from prunepath_ops.ffn.triton_ffn import sparse_ffn_prefill_triton  # noqa: E402
from prunepath_ops.reference.sparse_ffn import align_bounds  # noqa: E402


@triton.jit
def gather_dot_kernel(
    x_ptr,  # [T, d]
    w_ptr,  # [E, N, d]
    out_ptr,  # [P_max] fp32: sum over the N columns of each pair's row
    sorted_pairs_ptr,
    block_expert_ptr,
    expert_offsets_ptr,
    T,
    d,
    K,
    E,
    stride_x,
    N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATHER: tl.constexpr,
):
    """The grouped up kernel's loop (persistent over blocks, gathered rows, one N-wide dot per step)."""
    pid = tl.program_id(0)
    num_blocks = tl.load(expert_offsets_ptr + E) // BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, N)
    for b in range(pid, num_blocks, tl.num_programs(0)):
        e = tl.load(block_expert_ptr + b).to(tl.int64)
        pair = tl.load(sorted_pairs_ptr + b * BLOCK_M + offs_m)
        valid = pair >= 0
        if GATHER:
            tok = tl.where(valid, pair // K, 0).to(tl.int64)
        else:
            tok = ((b * BLOCK_M + offs_m) % T).to(tl.int64)
        w_base = w_ptr + e * N * d
        acc = tl.zeros((BLOCK_M, N), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            kk = k0 + offs_k
            xt = tl.load(x_ptr + tok[:, None] * stride_x + kk[None, :], mask=valid[:, None], other=0.0)
            w = tl.load(w_base + offs_n[None, :] * d + kk[:, None])
            acc = tl.dot(xt, w, acc)
        tl.store(out_ptr + b * BLOCK_M + offs_m, tl.sum(acc, axis=1), mask=valid)


def cuda_memset_async():
    """``cudaMemsetAsync`` from the CUDA runtime torch loaded, or None (ctypes; diagnosis only)."""
    import ctypes
    import glob

    names = ["libcudart.so", "libcudart.so.13", "libcudart.so.12"]
    names += glob.glob(
        os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "**", "libcudart.so*"), recursive=True
    )
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            fn = lib.cudaMemsetAsync
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p]
        fn.restype = ctypes.c_int

        def memset(t: torch.Tensor, fn=fn) -> None:
            err = fn(t.data_ptr(), 0, t.numel() * t.element_size(), torch.cuda.current_stream().cuda_stream)
            if err != 0:
                raise RuntimeError(f"cudaMemsetAsync returned {err}")

        return memset
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--active", type=float, default=0.3)
    ap.add_argument("--warmup", type=float, default=25)
    ap.add_argument("--rep", type=float, default=150)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the whole-call settings")
    ap.add_argument("--ncu", action="store_true", help="run the default call 3 times and exit (for ncu)")
    args = ap.parse_args()
    from triton.testing import do_bench

    dev = torch.device("cuda")
    T, d = args.tokens, 4096
    w, x, route = llama3_8b_prefill(T, args.active, dev)
    p, E, S = w.packed, w.E, w.S
    K = route.expert_ids.shape[1]

    def call(**kw):
        return sparse_ffn_prefill_triton(x, *route, p.w_in, p.b_in, p.w_down, p.b_out, True, "silu", **kw)

    if args.ncu:
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        return 0

    def timed(fn) -> float:
        return 1e3 * do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")

    env = environment(args, "triton.testing.do_bench (L2 flushed, median)", device="cuda")
    lines = header_lines(
        f"Prefill FFN at {args.active:.0%} active: parts and bounds, {torch.cuda.get_device_name()}", env, args
    )
    lines += [f"- T = {T}, Llama-3-8B FFN (d 4096, F 14336, S 32, E 448), bf16, random routing "
              f"(bench/sparse_ffn_gpu.py's fixed_fraction_route, seed 0)", ""]  # fmt: skip
    payload: dict = {"env": env, "calls": {}, "parts": {}, "gather": {}}

    ref = call()
    dense = dense_fn(w)
    settings = {
        "default": {},
        "swap_ab off": {"swap_ab": False},
        "w16": {"num_warps": 16},
        "w16, swap_ab off": {"num_warps": 16, "swap_ab": False},
        "dense groups off": {"dense_group_fraction": 2.0},
    }
    # Settings timed in interleaved rounds (machine drift and do_bench's spread fall on all alike);
    # each cell: the median over the rounds, and the range.
    fns, diffs = {}, {}
    for name, kw in settings.items():
        try:
            out = call(**kw)
            diffs[name] = float((out.float() - ref.float()).abs().max())
            fns[name] = (lambda kw=kw: call(**kw), capture(lambda kw=kw: call(**kw))[0])
        except Exception as exc:  # a tile that does not fit in shared memory
            diffs[name] = f"{type(exc).__name__}: {str(exc)[:80]}"
    times = {name: ([], []) for name in fns}
    dense_times = []
    for _ in range(args.rounds):
        dense_times.append(timed(lambda: dense(x)))
        for name, (eager_fn, graph_fn) in fns.items():
            times[name][0].append(timed(eager_fn))
            times[name][1].append(timed(graph_fn))
    dense_us = statistics.median(dense_times)
    lines += ["## 1. The whole call", "",
              f"{args.rounds} interleaved rounds; median (min-max) over the rounds. Dense FFN (3 x F.linear): "
              f"{dense_us:.1f} us ({min(dense_times):.1f}-{max(dense_times):.1f})", "",
              "| setting | eager us | graphed us | vs dense (eager) | vs dense (graphed) | max abs diff vs default |",
              "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name in settings:
        if name not in fns:
            lines.append(f"| {name} | {diffs[name]} | | | | |")
            continue
        eager, graphed = (statistics.median(v) for v in times[name])
        cell = [f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" for v in times[name]]
        payload["calls"][name] = {"eager_us": times[name][0], "graphed_us": times[name][1], "max_abs_diff": diffs[name]}
        lines.append(
            f"| {name} | {cell[0]} | {cell[1]} | {dense_us / eager:.2f}x | {dense_us / graphed:.2f}x | {diffs[name]:.2e} |"
        )
    payload["dense_us"] = dense_times

    # 2. parts alone, with the default tiles
    bm, bk, stages, warps = triton_ffn._prefill_tiles(2, 2 * S, False)
    align = triton_ffn._align(route.expert_ids, route.num_active, E, bm)
    sorted_pairs, block_expert, expert_offsets, expert_counts = align
    _, b_max = align_bounds(T * K, E, bm)
    h = torch.zeros(T, E * S, dtype=x.dtype, device=dev)
    group = triton_ffn._dense_group_config(2, 2 * S, False)[1]
    flags = triton_ffn.dense_group_flags(route.expert_ids, route.num_active, expert_counts, group, 0.9)[0]

    def up():
        triton_ffn.launch_grouped_up(
            x, p.w_in, None, route.gates, h, (sorted_pairs, block_expert, expert_offsets), flags, b_max,
            gated=True, act="silu", gate_in_h=True, one_dot=True, swap_ab=True, group=group,
            tiles=(bm, bk, stages, warps),
        )  # fmt: skip

    y = torch.empty(T, d, dtype=x.dtype, device=dev)
    parts = {
        "align_experts (3 kernels)": lambda: triton_ffn._align(route.expert_ids, route.num_active, E, bm),
        "zero fill of H [T, F] (triton_ffn.zero_fill)": lambda: triton_ffn.zero_fill(h),
        "dense-group flags + slot map": lambda: triton_ffn.dense_group_flags(
            route.expert_ids, route.num_active, expert_counts, group, 0.9
        ),
        "grouped_up_kernel (swap_ab)": up,
        "down: torch.mm(H, Wd) (cuBLAS)": lambda: torch.mm(h, p.w_down.view(E * S, d), out=y),
    }
    pairs = int(expert_counts.sum())
    blocks = int(expert_offsets[E]) // bm
    lines += ["", "## 2. The parts alone (default tiles; median of 3 interleaved rounds)", "",
              f"pairs {pairs}, blocks of {bm} rows {blocks} (padding {blocks * bm / pairs - 1:.1%})", "",
              "| part | eager us | graphed us |", "|---|---:|---:|"]  # fmt: skip
    part_times = {name: ([], []) for name in parts}
    graphs = {name: capture(fn)[0] for name, fn in parts.items()}
    for _ in range(3):  # interleaved rounds; the median of each
        for name, fn in parts.items():
            part_times[name][0].append(timed(fn))
            part_times[name][1].append(timed(graphs[name]))
    for name, (eager_v, graphed_v) in part_times.items():
        eager, graphed = statistics.median(eager_v), statistics.median(graphed_v)
        payload["parts"][name] = {"eager_us": eager, "graphed_us": graphed, "rounds": [eager_v, graphed_v]}
        lines.append(f"| {name} | {eager:.1f} | {graphed:.1f} |")
    # Every kernel of the default call, from the profiler (their sum against the call's time
    # shows the gaps between them).
    from torch.profiler import ProfilerActivity, profile

    n_prof = 10
    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n_prof):
            call()
        torch.cuda.synchronize()
    kern = sorted(
        (
            (e.key, e.device_time_total / n_prof, e.count // n_prof)
            for e in prof.key_averages()
            if e.device_time_total > 0
        ),
        key=lambda r: -r[1],
    )
    lines += ["", f"Kernels of one default call (torch.profiler, mean of {n_prof} eager calls):", "",
              "| kernel | launches per call | us per call |", "|---|---:|---:|"]  # fmt: skip
    for name, us, cnt in kern:
        lines.append(f"| `{name[:90]}` | {cnt} | {us:.1f} |")
    lines.append(f"| sum | | {sum(r[1] for r in kern):.1f} |")
    payload["kernels"] = [{"name": n, "us": u, "launches": c} for n, u, c in kern]
    up_us = payload["parts"]["grouped_up_kernel (swap_ab)"]["graphed_us"]
    x_bytes = pairs * d * 2
    w_bytes = blocks * 2 * S * d * 2
    lines += ["", f"up kernel: gathered x {x_bytes / 1e9:.2f} GB + weight tiles {w_bytes / 1e9:.2f} GB "
              f"-> {(x_bytes + w_bytes) / up_us / 1e6:.2f} TB/s from L2; "
              f"{2 * pairs * 2 * S * d / up_us / 1e6:.0f} TFLOP/s on the selected pairs"]  # fmt: skip

    # 3. what bounds the up kernel
    lines += ["", "## 3. The up kernel's loop against N weight columns per gathered row", "",
              "| N | rows | block_m | stages | us | x + W GB | TB/s (x + W) | TFLOP/s (valid rows) |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    cases = [(16, True, 256, 4), (32, True, 256, 4), (64, True, 256, 4), (128, True, 256, 3), (64, False, 256, 4)]
    wn = {}
    for n, gather, cbm, cst in cases:
        if n not in wn:
            wn[n] = (torch.randn(E, n, d, device=dev) * 0.02).to(torch.bfloat16)
        al = triton_ffn._align(route.expert_ids, route.num_active, E, cbm)
        sp, be, eo, _ = al
        _, cb_max = align_bounds(T * K, E, cbm)
        out = torch.empty(sp.numel(), dtype=torch.float32, device=dev)
        grid = (max(1, min(cb_max, triton_ffn._num_sms(dev) * 4)),)

        def g(n=n, gather=gather, cbm=cbm, cst=cst, sp=sp, be=be, eo=eo, out=out, grid=grid):
            gather_dot_kernel[grid](x, wn[n], out, sp, be, eo, T, d, K, E, x.stride(0), N=n, BLOCK_M=cbm,
                                    BLOCK_K=64, GATHER=gather, num_warps=8, num_stages=cst)  # fmt: skip

        try:
            us = timed(capture(g)[0])
        except Exception as exc:
            lines.append(
                f"| {n} | {'gathered' if gather else 'contiguous'} | {cbm} | {cst} | {type(exc).__name__} | | | |"
            )
            continue
        nb = int(eo[E]) // cbm
        gb = (pairs * d * 2 + nb * n * d * 2) / 1e9
        payload["gather"][f"N{n}_{'g' if gather else 'c'}_bm{cbm}_s{cst}"] = {"us": us, "gb": gb}
        lines.append(f"| {n} | {'gathered' if gather else 'contiguous'} | {cbm} | {cst} | {us:.1f} | {gb:.2f} | "
                     f"{gb / us * 1e3:.2f} | {2 * pairs * n * d / us / 1e6:.0f} |")  # fmt: skip
    # 4. the up kernel's timeline, one traced launch (after the untraced timings above)
    n_sm = triton_ffn._num_sms(dev)
    trace = torch.zeros(b_max, 4, dtype=torch.int64, device=dev)

    def up_traced():
        triton_ffn.launch_grouped_up(
            x, p.w_in, None, route.gates, h, (sorted_pairs, block_expert, expert_offsets), flags, b_max,
            gated=True, act="silu", gate_in_h=True, one_dot=True, swap_ab=True, group=group,
            tiles=(bm, bk, stages, warps), trace=trace,
        )  # fmt: skip

    for _ in range(3):
        up_traced()
    torch.cuda.synchronize()
    tr = trace[:blocks].cpu()
    t0, t_end = int(tr[:, 1].min()), int(tr[:, 2].max())
    sms = sorted(set(tr[:, 0].tolist()))
    last_end = {sm: int(tr[tr[:, 0] == sm, 2].max()) - t0 for sm in sms}
    n_tiles = {sm: int((tr[:, 0] == sm).sum()) for sm in sms}
    busy = {sm: int((tr[tr[:, 0] == sm, 2] - tr[tr[:, 0] == sm, 1]).sum()) for sm in sms}
    span = t_end - t0
    dur = (tr[:, 2] - tr[:, 1]).double() / 1e3  # us per tile
    full = tr[:, 3] == bm
    ends = sorted(last_end.values())
    lines += ["", "## 4. The up kernel's timeline (one launch traced: SM id and %globaltimer per block)", "",
              f"- {blocks} blocks on {len(sms)} SMs ({n_sm} on the device): {blocks / n_sm:.2f} blocks per SM; "
              f"blocks per SM {min(n_tiles.values())}-{max(n_tiles.values())}",
              f"- span {span / 1e3:.1f} us; SMs busy {sum(busy.values()) / (len(sms) * span):.1%} of it",
              f"- the first SM to run out of blocks finished at {ends[0] / 1e3:.1f} us, the median SM at "
              f"{ends[len(ends) // 2] / 1e3:.1f}, the last at {ends[-1] / 1e3:.1f} (the tail: "
              f"{(ends[-1] - ends[len(ends) // 2]) / 1e3:.1f} us after the median SM)",
              f"- time per block: full ({int(full.sum())}) median {dur[full].median():.1f} us; partial "
              f"({int((~full).sum())}, {float(tr[~full, 3].double().mean()) if (~full).any() else 0:.0f} valid rows on "
              f"average) median {dur[~full].median() if (~full).any() else float('nan'):.1f} us",
              "", "SMs by the time they finished their last block:", "",
              "| finished by (us) | SMs |", "|---:|---:|"]  # fmt: skip
    edges = [span * f for f in (0.85, 0.9, 0.92, 0.94, 0.96, 0.98, 1.0)]
    prev = 0
    for edge in edges:
        cnt = sum(1 for v in ends if prev < v <= edge) if prev else sum(1 for v in ends if v <= edge)
        lines.append(f"| {edge / 1e3:.1f} | {cnt} |")
        prev = edge
    payload["timeline"] = {"span_ns": span, "last_end_ns": last_end, "tiles": n_tiles, "busy_ns": busy}

    # 5. waves: the up kernel against experts per token around the default (tile count vs SMs)
    lines += ["", "## 5. The up kernel against experts per token (blocks against whole waves of one block per SM)", "",
              "| experts/token | pairs | blocks | blocks / SMs | up kernel us (graphed) | us per 1000 pairs |",
              "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    n0 = int(route.num_active[0])
    for n in range(n0 - 4, n0 + 5, 2):
        r2 = fixed_fraction_route(T, E, n / E, dev, 0)
        al = triton_ffn._align(r2.expert_ids, r2.num_active, E, bm)
        nb = int(al[2][E]) // bm
        npairs = int(al[3].sum())

        def up2(r2=r2, al=al):
            triton_ffn.launch_grouped_up(
                x, p.w_in, None, r2.gates, h, al[:3], None, b_max, gated=True, act="silu", gate_in_h=True,
                one_dot=True, swap_ab=True, group=group, tiles=(bm, bk, stages, warps),
            )  # fmt: skip

        us = statistics.median(timed(capture(up2)[0]) for _ in range(3))
        payload.setdefault("waves", []).append({"n": n, "pairs": npairs, "blocks": nb, "us": us})
        lines.append(f"| {n} | {npairs} | {nb} | {nb / n_sm:.2f} | {us:.1f} | {us / npairs * 1e3:.3f} |")

    # 6. ceilings of the N = 64 grouped shape: TMA-fed GEMMs on rows gathered beforehand
    lines += ["", "## 6. The same grouped shape fed by TMA (rows of x gathered beforehand, not timed)", "",
              "What the up kernel's shape (N = 64 weight columns per expert, 4.5 GB of rows) costs when the rows",
              "are contiguous and a CUTLASS/cuBLAS kernel loads them with TMA: the ceiling of a gather-free design.", "",
              "| kernel | us | TFLOP/s (selected pairs) |", "|---|---:|---:|"]  # fmt: skip
    h = wn = None  # free what the parts above held
    torch.cuda.empty_cache()
    tok = torch.repeat_interleave(torch.arange(T, device=dev), route.num_active.long())  # [P] token per pair
    ids_flat = route.expert_ids[torch.arange(K, device=dev)[None, :] < route.num_active[:, None].long()]
    order = torch.sort(ids_flat.long() * T + tok, stable=True).indices
    x_sorted = x[tok[order]]  # [P, d], expert-major
    ends = torch.cumsum(torch.bincount(ids_flat.long(), minlength=E), 0).to(torch.int32)
    w_t = p.w_in.view(E, 2 * S, d).transpose(1, 2)  # [E, d, 2S]
    ceil = {}
    if hasattr(torch, "_grouped_mm"):
        ceil["torch._grouped_mm (CUTLASS grouped GEMM, TMA), per-expert weights"] = lambda: torch._grouped_mm(
            x_sorted, w_t, offs=ends
        )
    ceil["torch.mm (cuBLAS), one [d, 64] weight for every row"] = lambda: torch.mm(x_sorted, w_t[0])
    ceil["torch.mm (cuBLAS), one [d, 128] weight for every row"] = lambda: torch.mm(
        x_sorted, p.w_in.view(E, 2 * S, d)[:2].reshape(4 * S, d).t()
    )

    def graphed_rows(fns: dict, key: str, cell) -> None:
        """Each of ``fns`` timed graphed into ``payload[key]`` and a table row ``| name | us | cell(name, us) |``."""
        for name, fn in fns.items():
            try:
                us = timed(capture(fn)[0])
            except Exception as exc:  # e.g. torch._grouped_mm's layout checks
                lines.append(f"| {name} | {type(exc).__name__}: {str(exc)[:60]} | |")
                continue
            payload.setdefault(key, {})[name] = us
            lines.append(f"| {name} | {us:.1f} | {cell(name, us)} |")

    graphed_rows(
        ceil, "tma_ceiling", lambda name, us: f"{2 * pairs * (4 if '128' in name else 2) * S * d / us / 1e6:.0f}"
    )
    x_sorted = None
    torch.cuda.empty_cache()

    # 7. ways to zero H
    hz = torch.empty(T, E * S, dtype=x.dtype, device=dev)
    nbytes = hz.numel() * hz.element_size()
    fills = {
        "torch.zeros": lambda: torch.zeros(T, E * S, dtype=x.dtype, device=dev),
        "Tensor.zero_": lambda: hz.zero_(),
        "triton_ffn.zero_fill (Triton store stream, 8192 per program)": lambda: triton_ffn.zero_fill(hz),
    }
    memset = cuda_memset_async()
    if memset is not None:
        fills["cudaMemsetAsync"] = lambda: memset(hz)
    lines += [
        "",
        f"## 7. Zeroing H ({nbytes / 1e6:.0f} MB)",
        "",
        "| method | graphed us | TB/s written |",
        "|---|---:|---:|",
    ]
    graphed_rows(fills, "zero_fill", lambda name, us: f"{nbytes / us / 1e6:.2f}")
    report = "\n".join(lines) + "\n"
    print(report)
    write_results(args.out, "prefill_up_diag", report, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
