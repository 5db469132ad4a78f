"""Router training with the paper's recipe (SPEC.md section 5, issue 5).

- :func:`train_routers` / :class:`TrainConfig`: task loss + entropy + balance (+ gate) losses, warm-up at
  ``tau = 1.05`` then a linear ``tau`` schedule; backbone frozen by default; gradient accumulation.
- :func:`differentiable_ffns`, :func:`record_router_logits`: the pieces, for custom loops.
- :func:`load_text_tokens`, :func:`find_default_text`: token streams from line ranges of a text file.

Import it explicitly (``import prunepath_ops.train``); ``tqdm`` is imported only when a bar is shown.
"""

from prunepath_ops.train.data import (
    EVAL_SPLIT,
    TRAIN_SPLIT,
    TextTokens,
    find_default_text,
    line_range,
    load_text_tokens,
)
from prunepath_ops.train.trainer import (
    StepRecord,
    TrainConfig,
    TrainStats,
    differentiable_ffns,
    evaluate,
    is_finite,
    prunepath_mlps,
    record_router_logits,
    sample_windows,
    train_routers,
)

__all__ = [
    "EVAL_SPLIT",
    "TRAIN_SPLIT",
    "StepRecord",
    "TextTokens",
    "TrainConfig",
    "TrainStats",
    "differentiable_ffns",
    "evaluate",
    "find_default_text",
    "is_finite",
    "line_range",
    "load_text_tokens",
    "prunepath_mlps",
    "record_router_logits",
    "sample_windows",
    "train_routers",
]
