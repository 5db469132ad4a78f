"""Perplexity against ``s_FFN``: a tau sweep of one PrunePath checkpoint, top-k and static-pruning baselines.

:func:`sweep` evaluates every point with :func:`~prunepath_ops.evaluate.perplexity.perplexity` on the
same tokens; :func:`write_table` writes markdown and CSV; :func:`plot` a PNG (matplotlib, imported
lazily, Agg backend).
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from torch import Tensor, nn

from prunepath_ops.evaluate.baselines import (
    STATIC_METHODS,
    full_dense_ffns,
    neuron_scores,
    static_pruned_ffns,
    swapped_ffns,
    topk_routing,
)
from prunepath_ops.evaluate.perplexity import perplexity
from prunepath_ops.modules import PrunePathMLP

DEFAULT_TAUS = (1.05, 0.99, 0.95, 0.9, 0.8, 0.7)
DEFAULT_TOPK_FRACTIONS = (0.5, 0.33, 0.25, 0.125)  # of E, rounded to whole experts
DEFAULT_STATIC_FRACTIONS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class SweepRow:
    """One evaluated point: ``method`` in {dense, prunepath, topk, static-magnitude, static-wanda}."""

    method: str
    knob: str
    sparsity: float
    ppl: float
    nll: float
    tokens: int
    seconds: float


def default_ks(num_experts: int, fractions: Sequence[float] = DEFAULT_TOPK_FRACTIONS) -> list[int]:
    """Whole-expert k values for the top-k sweep, largest first, no duplicates (e.g. E=48 -> 24, 16, 12, 6)."""
    ks = sorted({max(1, round(f * num_experts)) for f in fractions}, reverse=True)
    return ks


def sweep(
    model: nn.Module,
    tokens: Tensor,
    *,
    taus: Sequence[float] = DEFAULT_TAUS,
    ks: Sequence[int] | None = None,
    static_fractions: Sequence[float] = DEFAULT_STATIC_FRACTIONS,
    static_methods: Sequence[str] = ("wanda",),
    calib_tokens: Tensor | None = None,
    dense: bool = True,
    window: int = 512,
    stride: int = 256,
    batch_size: int = 1,
    max_tokens: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[SweepRow]:
    """Perplexity and ``s_FFN`` of a PrunePath model over tau, and of the top-k and static baselines.

    Parameters
    ----------
    model : Llama
        With :class:`PrunePathMLP` FFNs (a dense model gets only the dense and static points).
        Its taus and expert bounds are restored afterwards.
    tokens : Tensor
        ``[N]`` evaluation tokens.
    taus : sequence of float
        PrunePath points (one checkpoint, tau changed between evaluations).
    ks : sequence of int, optional
        Top-k points; default :func:`default_ks` of the first layer's E. Empty: none.
    static_fractions : sequence of float
        Fractions of neurons removed per layer for the static baselines. Empty: none.
    static_methods : sequence of str
        Any of ``"magnitude"``, ``"wanda"`` (Wanda needs ``calib_tokens``; default the first
        half of ``tokens`` would leak the evaluation text, so it is required).
    calib_tokens : Tensor, optional
        Calibration tokens for Wanda activation norms (disjoint from ``tokens``).
    dense : bool
        Add the dense point (every FFN replaced by its full dense version, gate 1: the source model).
    window, stride, batch_size, max_tokens, progress
        Forwarded to :func:`perplexity`.
    log : callable, optional
        Called with one line per finished point (e.g. ``print``).

    Returns
    -------
    list of SweepRow
        In evaluation order: dense, prunepath (by tau), topk (by k), static (by method, fraction).
    """
    for t in taus:
        if not (t == t and 0.0 <= t <= 1.05):
            raise ValueError(f"sweep: tau must be in [0, 1.05]; got {t}")
    for m in static_methods:
        if m not in STATIC_METHODS:
            raise ValueError(f"sweep: static method must be one of {STATIC_METHODS}; got {m!r}")
    routed = [m for m in model.modules() if isinstance(m, PrunePathMLP)]
    if routed and ks is None:
        ks = default_ks(routed[0].w_down.shape[0])
    ks = list(ks or [])
    if ks and not routed:
        raise ValueError("sweep: top-k points need a model with PrunePathMLP FFNs")
    ppl_kw = dict(window=window, stride=stride, batch_size=batch_size, max_tokens=max_tokens, progress=progress)
    rows: list[SweepRow] = []

    def run(method: str, knob: str) -> None:
        start = time.perf_counter()
        r = perplexity(model, tokens, **ppl_kw)
        row = SweepRow(method, knob, r.sparsity, r.ppl, r.nll, r.tokens, time.perf_counter() - start)
        rows.append(row)
        if log is not None:
            log(f"{method:>16} {knob:>10}  s_FFN {row.sparsity:6.3f}  ppl {row.ppl:10.3f}  ({row.seconds:.1f} s)")

    need_static = bool(static_fractions) and bool(static_methods)
    scores = {}
    if need_static or dense:
        if "wanda" in static_methods and need_static:
            if calib_tokens is None:
                raise ValueError("sweep: the 'wanda' static baseline needs calib_tokens (disjoint from tokens)")
            scores["wanda"] = neuron_scores(model, "wanda", calib_tokens, window=window)
        if "magnitude" in static_methods and need_static:
            scores["magnitude"] = neuron_scores(model, "magnitude")
    if dense:
        with swapped_ffns(model, full_dense_ffns(model)):
            run("dense", "-")
    if routed:
        saved = [m.tau for m in routed]
        try:
            for tau in taus:
                for m in routed:
                    m.tau = float(tau)
                floor = min(m.min_experts for m in routed)
                caps = [
                    m.max_experts for m in routed if m.max_experts is not None and m.max_experts < m.w_down.shape[0]
                ]
                cap = f",max={max(caps)}" if caps else ""
                run("prunepath", f"tau={tau:g}" + (f",min={floor}" if floor > 1 else "") + cap)
        finally:
            for m, t in zip(routed, saved, strict=True):
                m.tau = t
        for k in ks:
            with topk_routing(routed, k):
                run("topk", f"k={k}")
    if need_static:
        for method in static_methods:
            for frac in static_fractions:
                with swapped_ffns(model, static_pruned_ffns(model, scores[method], frac)):
                    run(f"static-{method}", f"frac={frac:g}")
    return rows


_COLUMNS = ("method", "knob", "sparsity", "ppl", "nll", "tokens", "seconds")


def format_table(rows: Sequence[SweepRow]) -> str:
    """The rows as a markdown table (``s_FFN``, perplexity, NLL, tokens, seconds)."""
    lines = [
        "| method | knob | s_FFN | perplexity | NLL | tokens | seconds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.knob} | {r.sparsity:.3f} | {r.ppl:.3f} | {r.nll:.4f} | {r.tokens} | {r.seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[SweepRow], path_md: str | os.PathLike | None, path_csv: str | os.PathLike | None):
    """Write the rows as markdown (``path_md``) and/or CSV (``path_csv``); None skips a format."""
    if path_md is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path_md)), exist_ok=True)
        with open(path_md, "w") as f:
            f.write(format_table(rows))
    if path_csv is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path_csv)), exist_ok=True)
        with open(path_csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=_COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow(asdict(r))


def read_csv(path: str | os.PathLike) -> list[SweepRow]:
    """Rows back from a CSV written by :func:`write_table`."""
    with open(path, newline="") as f:
        return [
            SweepRow(d["method"], d["knob"], float(d["sparsity"]), float(d["ppl"]), float(d["nll"]),
                     int(d["tokens"]), float(d["seconds"]))
            for d in csv.DictReader(f)
        ]  # fmt: skip


_STYLE = {
    "prunepath": dict(marker="o", color="C0", label="PrunePath (tau sweep)"),
    "topk": dict(marker="s", color="C1", label="top-k (same experts)"),
    "static-wanda": dict(marker="^", color="C2", label="static pruning (Wanda)"),
    "static-magnitude": dict(marker="v", color="C3", label="static pruning (magnitude)"),
}


def plot(rows: Sequence[SweepRow], path_png: str | os.PathLike, *, title: str | None = None) -> None:
    """PNG of perplexity (log scale) against ``s_FFN``: one line per method, the dense point as a star."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    try:
        for method in dict.fromkeys(r.method for r in rows):
            pts = sorted((r.sparsity, r.ppl) for r in rows if r.method == method)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if method == "dense":
                ax.plot(xs, ys, marker="*", markersize=14, color="k", linestyle="none", label="dense")
                ax.axhline(ys[0], color="k", linewidth=0.6, linestyle=":")
                continue
            style = _STYLE.get(method, dict(marker="x", label=method))
            ax.plot(xs, ys, linestyle="-", **style)
        ax.set_xlabel("FFN sparsity s_FFN (fraction of experts / neurons skipped)")
        ax.set_ylabel("perplexity")
        finite = [r.ppl for r in rows if r.ppl == r.ppl and r.ppl < float("inf")]
        if finite and max(finite) / max(min(finite), 1e-9) > 20:
            ax.set_yscale("log")
        ax.set_xlim(-0.02, 1.0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title or "Perplexity vs FFN sparsity")
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path_png)), exist_ok=True)
        fig.savefig(path_png)
    finally:
        plt.close(fig)
