#!/usr/bin/env python
"""Kernel timeline of one graphed decode step (H200 diagnosis): where a layer's time goes.

The end-to-end benchmark gives tokens/s and an eager per-part split; neither says what each
kernel boundary costs inside the CUDA graph, where PDL overlaps a kernel's launch and weight
prefetch with its predecessor. Here the step of ``bench/decode_e2e_gpu.py`` (Llama-3-8B shape,
random weights, batch 1, 512-token prompt, kernel attention, fused elementwise work) is captured
once dense and once PrunePath (tau calibrated per layer to ``--fraction`` active), replayed under
``torch.profiler`` (CUDA activity; graph kernels are reported one by one), and the kernels of
one replay are laid out: each kernel's start, duration and the gap since the previous kernel
ended (negative: it started before, PDL's overlap). Per kernel name: launches per step, mean
duration, mean gap before it; and one middle layer in full.

    python3 bench/diag/decode_step_timeline.py --out /tmp/out       # on the H200, ~2 minutes
    python3 bench/diag/decode_step_timeline.py --self-test           # the analysis on synthetic events, any machine

Sum of the positive gaps = time no kernel of the step ran (launch latency the graph and PDL did
not hide); a fusion that removes a kernel can gain at most its duration plus its gap.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


def kernels_of_trace(path: str) -> list[tuple[str, float, float]]:
    """``(name, start_us, duration_us)`` of every GPU kernel in a chrome trace, in start order."""
    with open(path) as f:
        events = json.load(f)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    out = [(e["name"], float(e["ts"]), float(e.get("dur", 0.0))) for e in events if e.get("cat") == "kernel"]
    return sorted(out, key=lambda k: k[1])


def short(name: str) -> str:
    """A kernel name without template arguments and parameter lists (readable in a table)."""
    name = name.split("(")[0]
    depth, out = 0, []
    for ch in name:
        depth += ch == "<"
        if depth == 0:
            out.append(ch)
        depth -= ch == ">"
    return "".join(out).replace("void ", "").strip()[:70]


def analyse(kernels: list[tuple[str, float, float]], replays: int, n_layers: int) -> dict:
    """One replay's timeline (the middle one) and per-name statistics over all replays.

    ``kernels`` must hold ``replays`` times the same sequence (a graph replays identically).
    """
    if not kernels:
        raise ValueError("no kernel events in the trace (does this torch.profiler report a graph's kernels?)")
    if len(kernels) % replays:
        raise ValueError(f"{len(kernels)} kernels do not split into {replays} equal replays")
    per = len(kernels) // replays
    steps = [kernels[i * per : (i + 1) * per] for i in range(replays)]
    names = [short(k[0]) for k in steps[0]]
    if any([short(k[0]) for k in s] != names for s in steps):
        raise ValueError("the replays do not launch the same kernels in the same order")
    stats = collections.defaultdict(lambda: {"count": 0, "dur": [], "gap": []})
    spans, gaps_pos, busy = [], [], []
    for s in steps:
        t0 = s[0][1]
        spans.append(s[-1][1] + s[-1][2] - t0)
        end = None
        pos = 0.0
        for (_, ts, dur), name in zip(s, names, strict=True):
            gap = 0.0 if end is None else ts - end
            pos += max(gap, 0.0)
            st = stats[name]
            st["dur"].append(dur)
            st["gap"].append(gap)
            end = ts + dur if end is None else max(end, ts + dur)
        gaps_pos.append(pos)
        busy.append(sum(k[2] for k in s))
    for name in names:
        stats[name]["count"] += 1
    table = sorted(
        (
            {
                "kernel": name,
                "per_step": st["count"],
                "mean_us": statistics.fmean(st["dur"]),
                "total_us": statistics.fmean(st["dur"]) * st["count"],
                "mean_gap_us": statistics.fmean(st["gap"]),
            }
            for name, st in stats.items()
        ),
        key=lambda r: -r["total_us"],
    )
    # One middle layer: between consecutive launches of the first kernel launched n_layers times.
    counts = collections.Counter(names)
    marker = next((n for n in names if counts[n] == n_layers), None)
    layer = []
    if marker is not None:
        at = [i for i, n in enumerate(names) if n == marker]
        mid = steps[replays // 2]
        lo, hi = at[(n_layers - 1) // 2], at[(n_layers - 1) // 2 + 1]
        base, end = mid[lo][1], None
        for i in range(lo, hi + 1):
            _, ts, dur = mid[i]
            layer.append({"kernel": names[i], "start_us": ts - base, "dur_us": dur,
                          "gap_us": None if end is None else ts - end})  # fmt: skip
            end = ts + dur
    return {
        "kernels_per_step": per,
        "step_us": statistics.median(spans),
        "busy_us": statistics.median(busy),
        "idle_us": statistics.median(gaps_pos),
        "table": table,
        "layer_marker": marker,
        "layer": layer,
    }


def report_lines(title: str, a: dict) -> list[str]:
    lines = [
        f"## {title}",
        "",
        f"- {a['kernels_per_step']} kernels per step; step {a['step_us']:.0f} us from the first kernel's start to "
        f"the last one's end, kernels busy {a['busy_us']:.0f} us (summed; PDL overlap counts twice), "
        f"no kernel running {a['idle_us']:.0f} us (medians over the replays)",
        "",
        "| kernel | per step | mean us | total us | mean gap before, us |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in a["table"]:
        lines.append(
            f"| `{r['kernel']}` | {r['per_step']} | {r['mean_us']:.2f} | {r['total_us']:.0f} | {r['mean_gap_us']:+.2f} |"
        )
    if a["layer"]:
        lines += ["", f"One middle layer (from one `{a['layer_marker']}` to the next):", "",
                  "| kernel | start us | duration us | gap us |", "|---|---:|---:|---:|"]  # fmt: skip
        for r in a["layer"]:
            gap = "" if r["gap_us"] is None else f"{r['gap_us']:+.2f}"
            lines.append(f"| `{r['kernel']}` | {r['start_us']:.2f} | {r['dur_us']:.2f} | {gap} |")
    return lines + [""]


def profile_replays(decoder, tok, pos, replays: int) -> list[tuple[str, float, float]]:
    for _ in range(3):
        decoder(tok, pos)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            decoder(tok, pos)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        return kernels_of_trace(path)


def self_test() -> int:
    """The analysis on a synthetic trace: 2 layers of 3 kernels + a head kernel, 3 replays."""
    seq = [("head", 2.0), ("a<int>(x)", 1.0), ("b", 3.0), ("c", 2.0), ("a<int>(x)", 1.0), ("b", 3.0), ("c", 2.0)]
    kernels, t = [], 0.0
    for _ in range(3):
        for name, dur in seq:
            kernels.append((name, t, dur))
            t += dur + 0.5  # every kernel starts 0.5 us after the previous one ends
        t += 100.0
    a = analyse(kernels, 3, 2)
    assert a["kernels_per_step"] == 7 and abs(a["busy_us"] - 14.0) < 1e-9 and abs(a["idle_us"] - 3.0) < 1e-9
    assert abs(a["step_us"] - 17.0) < 1e-9, a["step_us"]
    rows = {r["kernel"]: r for r in a["table"]}
    assert rows["b"]["per_step"] == 2 and abs(rows["b"]["total_us"] - 6.0) < 1e-9
    assert abs(rows["head"]["mean_gap_us"]) < 1e-9 and abs(rows["c"]["mean_gap_us"] - 0.5) < 1e-9
    assert a["layer_marker"] == "a" and [r["kernel"] for r in a["layer"]] == ["a", "b", "c", "a"]
    print("\n".join(report_lines("self-test", a)))
    print("self-test passed")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--fraction", type=float, default=0.3, help="experts active in the PrunePath step")
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args()
    if args.self_test:
        return self_test()
    import decode_e2e_gpu as e2e
    from common import environment, header_lines, write_results

    from prunepath_ops.convert.calibrate import calibrate_tau_per_layer, make_measure_fn
    from prunepath_ops.models import GraphedDecoder

    eargs = e2e.parse_args(["--device", "cuda"])
    model = e2e.build_model(eargs)
    cfg = model.config
    gen = torch.Generator(device="cuda").manual_seed(eargs.seed + 2)
    prompt = torch.randint(0, cfg.vocab, (1, eargs.prompt), device="cuda", generator=gen)  # [B, T]
    pos = torch.full((1,), eargs.prompt, dtype=torch.int32, device="cuda")
    results = {}
    with torch.no_grad():
        first = model(prompt, 0, last_only=True)[:, -1].argmax(dim=-1)  # [B]
        decoder = GraphedDecoder(model, "kernel")
        results["dense"] = analyse(profile_replays(decoder, first, pos, args.replays), args.replays, cfg.n_layers)
        del decoder
        mlps = e2e.convert(model, eargs)
        measure = make_measure_fn(mlps, lambda: model(prompt, 0, last_only=True), per_layer=True)
        for m, r in zip(mlps, calibrate_tau_per_layer(measure, len(mlps), 1.0 - args.fraction), strict=True):
            m.tau = r.tau
        first = model(prompt, 0, last_only=True)[:, -1].argmax(dim=-1)
        decoder = GraphedDecoder(model, "kernel")
        key = f"prunepath-{round(args.fraction * 100)}"
        results[key] = analyse(profile_replays(decoder, first, pos, args.replays), args.replays, cfg.n_layers)
    env = environment(argparse.Namespace(device="cuda", peak_tbps=e2e.H200_COPY_TBPS), "torch.profiler (CUDA activity)")
    lines = header_lines("Decode step kernel timeline on NVIDIA H200", env, argparse.Namespace(device="cuda"))
    lines += [
        "- model: as bench/decode_e2e_gpu.py (Llama-3-8B shape, random weights, bf16, batch 1, 512-token prompt, "
        f"kernel attention, fused elementwise work, PDL); one CUDA graph per configuration, {args.replays} replays "
        "under the profiler (its tracing adds some time per kernel)",
        "",
    ]
    for title, a in results.items():
        lines += report_lines(title, a)
    report = "\n".join(lines)
    print(report)
    write_results(args.out, "decode_step_timeline", report, {"env": env, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
