"""Evaluation (issue 5): sliding-window perplexity with ``s_FFN`` measured on the same tokens, a tau sweep
of one checkpoint, the top-k and static-pruning baselines, and a table and plot of perplexity vs ``s_FFN``.

Import it explicitly (``import prunepath_ops.evaluate``); ``tqdm`` and ``matplotlib`` are imported only
by the functions that need them.
"""

from prunepath_ops.evaluate.baselines import (
    STATIC_METHODS,
    StaticPrunedMLP,
    activation_norms,
    dense_weights,
    full_dense_ffns,
    neuron_scores,
    static_pruned_ffns,
    swapped_ffns,
    topk_routing,
    topk_sparsity,
)
from prunepath_ops.evaluate.perplexity import PerplexityResult, perplexity, windows
from prunepath_ops.evaluate.sweep import SweepRow, default_ks, format_table, plot, read_csv, sweep, write_table

__all__ = [
    "STATIC_METHODS",
    "PerplexityResult",
    "StaticPrunedMLP",
    "SweepRow",
    "activation_norms",
    "default_ks",
    "dense_weights",
    "format_table",
    "full_dense_ffns",
    "neuron_scores",
    "perplexity",
    "plot",
    "read_csv",
    "static_pruned_ffns",
    "swapped_ffns",
    "sweep",
    "topk_routing",
    "topk_sparsity",
    "windows",
    "write_table",
]
