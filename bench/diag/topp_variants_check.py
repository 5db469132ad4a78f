#!/usr/bin/env python
"""Correctness of every CUDA ``topp_route`` kernel variant, on the GPU.

For each variant (``PRUNEPATH_TOPP_KERNEL``, read once per process, so one subprocess per variant)
the same problems are routed: random logits for several T and E in {1, 7, 32, 33, 48, 255, 448, 512,
513, 1000, 1024} (plus 2048 and 4096), fp32 / bf16 / fp16, tau in {0.1, 0.5, 0.9, 1.05} as a float,
a per-token tau tensor (with a NaN) and a one-element tensor, min_experts / max_experts, every gate
mode, ties (quantised logits), rows with NaN, -inf and +inf. Each result must

1. match the reference (``prunepath_ops.testing.assert_route_matches_reference``: exact ids and
   num_active except where a cumulative sum lies within 1e-6 of tau or two different logits have
   nearly equal probabilities; gates to fp32 rounding; exact padding);
2. match the CPU kernel on every row that is not ambiguous in that sense;
3. match the ``warp`` variant (the original kernel) bit for bit in ids, gates and num_active, except
   rows near tau (the kernels group the double-precision cumulative sum differently).

Exit status 1 on any failure.

    python bench/diag/topp_variants_check.py                         # all variants, ~1-2 min each
    python bench/diag/topp_variants_check.py --variants lean,rank --quick
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

import prunepath_ops
from prunepath_ops import reference
from prunepath_ops.reference.routing import sanitize_logits
from prunepath_ops.testing import TAU_BAND, assert_route_matches_reference

VARIANTS = ("warp", "lean", "rank", "block", "auto")
E_VALUES = (1, 7, 32, 33, 48, 255, 448, 512, 513, 1000, 1024, 2048, 4096)
T_CYCLE = (1, 5, 37, 130, 300)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TAUS = (0.1, 0.5, 0.9, 1.05)
GATES = reference.GATE_MODES


def make_problems(quick: bool) -> list[dict]:
    """Deterministic list of problems (same on every variant)."""
    gen = torch.Generator().manual_seed(2026)
    problems = []
    i = 0
    e_values = (1, 33, 448, 1000, 4096) if quick else E_VALUES
    for E in e_values:
        for dtype in DTYPES:
            for tau in TAUS:
                i += 1
                T = T_CYCLE[i % len(T_CYCLE)]
                scale = (0.01, 1.0, 2.0, 8.0)[i % 4]
                logits = torch.randn(T, E, generator=gen) * scale
                kind = i % 7
                if kind == 1:  # ties: few distinct values
                    logits = logits.round()
                elif kind == 2 and T > 1:  # special rows
                    logits[0] = float("nan")
                    logits[-1] = float("-inf")
                    if T > 2:
                        logits[1, ::3] = float("nan")
                    if T > 3:
                        logits[2, :: max(1, E // 4)] = float("inf")
                K = None if i % 5 else max(1, E // 3)
                min_experts = (1, 0, 3, 1, E // 2)[i % 5]
                min_experts = min(min_experts, E if K is None else K)
                tau_arg: float | torch.Tensor = tau
                if i % 6 == 3:  # per-token tensor, one NaN
                    tau_arg = torch.rand(T, generator=gen) * 1.3 - 0.1
                    tau_arg[0] = float("nan")
                elif i % 6 == 4:  # one-element tensor, broadcast
                    tau_arg = torch.full((1,), tau)
                problems.append(
                    dict(
                        name=f"#{i} T={T} E={E} {str(dtype).removeprefix('torch.')} tau={tau_arg if isinstance(tau_arg, float) else 'tensor'} "
                        f"K={K} min={min_experts} gate={GATES[i % 4]} kind={kind}",
                        logits=logits.to(dtype),
                        tau=tau_arg,
                        min_experts=min_experts,
                        max_experts=K,
                        gate=GATES[i % 4],
                    )
                )
    # Long batches: many warps, the lean kernel's deferred pass over several chunks.
    for T, E, dtype, tau in (
        (8192, 448, torch.bfloat16, 0.5),
        (4099, 1000, torch.float32, 0.9),
        (3000, 448, torch.float16, 0.97),
    ):
        logits = torch.randn(T, E, generator=gen) * 2
        logits[::97] = logits[::97].round()  # some rows with ties
        problems.append(
            dict(
                name=f"long T={T} E={E} {str(dtype).removeprefix('torch.')} tau={tau}",
                logits=logits.to(dtype),
                tau=tau,
                min_experts=1,
                max_experts=None,
                gate="sigmoid",
            )
        )
    return problems


def ambiguous_rows(logits: torch.Tensor, tau, n_a: torch.Tensor, n_b: torch.Tensor) -> torch.Tensor:
    """Rows where two correct kernels may differ: a cumulative sum within TAU_BAND of tau, or two different
    logits with probabilities within 1e-6 (relative) inside the kept prefix (the rules of
    ``assert_route_matches_reference``)."""
    logits = logits.cpu()
    T, E = logits.shape
    p = reference.routing_probabilities(logits)
    p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)
    c = torch.cumsum(p_sorted.double(), dim=-1).float()
    if isinstance(tau, torch.Tensor):
        tau_col = tau.cpu().float().reshape(-1, 1).expand(T, 1)
    else:
        tau_col = torch.full((T, 1), float(tau))
    near_tau = ((c - tau_col).abs() <= TAU_BAND).any(dim=-1) & (tau_col[:, 0] < 1)
    g_sorted = sanitize_logits(logits).gather(1, order)
    gap = p_sorted[:, :-1] - p_sorted[:, 1:]
    near = (gap <= 1e-6 * p_sorted[:, :-1]) & (g_sorted[:, :-1] != g_sorted[:, 1:])
    reach = torch.maximum(n_a.cpu(), n_b.cpu()).long().clamp(max=max(E - 1, 0))
    pos = torch.arange(max(E - 1, 0))
    near_tie = (near & (pos[None, :] < reach[:, None])).any(dim=-1) if E > 1 else torch.zeros(T, dtype=torch.bool)
    return near_tau | near_tie, near_tau


def worker(out_path: str, quick: bool, device: str = "cuda") -> int:
    variant = os.environ.get("PRUNEPATH_TOPP_KERNEL", "auto")
    results = []
    failures = 0
    start = time.perf_counter()
    for prob in make_problems(quick):
        x = prob["logits"].to(device)
        tau = prob["tau"].to(device) if isinstance(prob["tau"], torch.Tensor) else prob["tau"]
        kwargs = dict(min_experts=prob["min_experts"], max_experts=prob["max_experts"], gate=prob["gate"])
        record = {"name": prob["name"], "error": None}
        try:
            route = prunepath_ops.topp_route(x, tau, **kwargs)
            ids, gates, n = (t.cpu() for t in route)
            record.update(ids=ids, gates=gates, n=n)
            assert_route_matches_reference(route, x, tau, **kwargs)
            cpu = prunepath_ops.topp_route(prob["logits"], prob["tau"], **kwargs)
            differ = (ids != cpu.expert_ids).any(dim=-1) | (n != cpu.num_active)
            if bool(differ.any()):
                amb, _ = ambiguous_rows(prob["logits"], prob["tau"], n, cpu.num_active)
                bad = differ & ~amb
                assert not bool(bad.any()), (
                    f"differs from the CPU kernel on unambiguous rows {bad.nonzero().flatten().tolist()[:10]}"
                )
        except Exception:  # record and go on: one report with every failure
            record["error"] = traceback.format_exc(limit=4)
            failures += 1
            print(f"[{variant}] FAIL {prob['name']}\n{record['error']}", flush=True)
        results.append(record)
    torch.save({"variant": variant, "results": results}, out_path)
    print(f"[{variant}] {len(results)} problems, {failures} failed, {time.perf_counter() - start:.1f} s", flush=True)
    return 1 if failures else 0


def compare_to_warp(variant: str, mine: list[dict], warp: list[dict], problems: list[dict]) -> list[str]:
    """Bitwise comparison with the original kernel, except rows near tau."""
    errors = []
    for prob, a, b in zip(problems, mine, warp, strict=True):
        if a["error"] or b["error"] or "ids" not in a or "ids" not in b:
            continue
        differ = (a["ids"] != b["ids"]).any(dim=-1) | (a["n"] != b["n"])
        gates_differ = (a["gates"].view(torch.int32) != b["gates"].view(torch.int32)).any(dim=-1)
        if not bool((differ | gates_differ).any()):
            continue
        _, near_tau = ambiguous_rows(prob["logits"], prob["tau"], a["n"], b["n"])
        bad = (differ | gates_differ) & ~near_tau
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            k = int(max(a["n"][r], b["n"][r])) + 1
            errors.append(
                f"{variant} vs warp on {prob['name']}: {int(bad.sum())} rows differ (not near tau); row {r}: "
                f"n {int(a['n'][r])} vs {int(b['n'][r])}, ids {a['ids'][r, :k].tolist()} vs {b['ids'][r, :k].tolist()}"
            )
        else:
            print(f"note: {variant} vs warp on {prob['name']}: {int(differ.sum())} near-tau rows differ (allowed)")
    return errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    ap.add_argument("--quick", action="store_true", help="fewer expert counts")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke test of this script
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.quick, args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    if "warp" not in variants:
        variants = ["warp", *variants]  # the baseline of the bitwise comparison
    problems = make_problems(args.quick)
    runs: dict[str, list[dict] | None] = {}
    errors: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            path = os.path.join(tmp, f"{v}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--device", args.device]
            cmd += ["--quick"] if args.quick else []
            proc = subprocess.run(cmd, env={**os.environ, "PRUNEPATH_TOPP_KERNEL": v}, check=False)
            if not os.path.exists(path):
                errors.append(f"{v}: worker exited with status {proc.returncode} and wrote nothing")
                runs[v] = None
                continue
            runs[v] = torch.load(path)["results"]
            errors += [f"{v}: {r['name']}: {r['error'].strip().splitlines()[-1]}" for r in runs[v] if r["error"]]
    if runs.get("warp") is not None:
        for v in variants:
            if v != "warp" and runs.get(v) is not None:
                errors += compare_to_warp(v, runs[v], runs["warp"], problems)
    print()
    if errors:
        print(f"{len(errors)} FAILURES:")
        for e in errors:
            print(" -", e)
        return 1
    print(f"all {len(variants)} variants x {len(problems)} problems OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
