"""Evaluation text: locating the default text file and tokenizing a line range of it.

Prefers :mod:`prunepath_ops.train.data` (``load_text_tokens``, ``find_default_text``) when that
module is present, so training and evaluation split the text the same way; the fallbacks here
split by lines (``split=(0.8, 1.0)`` = the last 20% of the lines).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

WIKITEXT_RELATIVE = os.path.join("shared", "data", "wikitext-2", "valid.txt")

# A small built-in English text for the offline --fast mode and as a last resort.
BUILTIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. A sparse language model skips most of its feed-forward "
    "neurons for each token. PrunePath groups the neurons into experts of thirty-two, and a small router "
    "scores the experts for every token. The experts that hold most of the probability mass are kept, and "
    "the rest are skipped. Lowering the threshold keeps fewer experts, and the model becomes faster, "
    "while its perplexity rises slowly. Static pruning removes the same neurons for every token instead. "
    "Top-k routing keeps the same number of experts for every token, however easy or hard the token is. "
) * 8


def _candidates() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(here))
    out = []
    env = os.environ.get("PRUNEPATH_TEXT")
    if env:
        out.append(env)
    for base in (os.getcwd(), repo):
        out.append(os.path.join(base, "..", WIKITEXT_RELATIVE))
        out.append(os.path.join(base, WIKITEXT_RELATIVE))
    return [os.path.normpath(p) for p in out]


def default_text_path() -> str | None:
    """``../shared/data/wikitext-2/valid.txt`` (from the working directory or the repository), or the
    text :func:`prunepath_ops.train.data.find_default_text` finds; None when there is none.
    ``$PRUNEPATH_TEXT`` takes precedence."""
    for p in _candidates():
        if os.path.isfile(p):
            return p
    try:
        from prunepath_ops.train.data import find_default_text
    except ImportError:
        return None
    try:
        return find_default_text()
    except (FileNotFoundError, OSError):
        return None


def _split_lines(text: str, split: tuple[float, float]) -> str:
    lines = text.splitlines(keepends=True)
    lo, hi = (int(round(f * len(lines))) for f in split)
    return "".join(lines[lo:hi])


def text_tokens(path: str | os.PathLike, tokenizer, split: tuple[float, float] = (0.8, 1.0)) -> Tensor:
    """1-D int64 tokens of the ``split`` fraction of ``path``'s lines.

    ``tokenizer``: a Hugging Face tokenizer, or any callable ``str -> list[int]`` (e.g.
    :func:`byte_tokens`). Uses ``prunepath_ops.train.data.load_text_tokens`` when it exists.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file not found: {path}")
    lo, hi = split
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"text split must satisfy 0 <= lo < hi <= 1; got {split}")
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "vocab_size"):
        try:
            from prunepath_ops.train.data import load_text_tokens
        except ImportError:
            load_text_tokens = None
        if load_text_tokens is not None:
            return load_text_tokens(path, tokenizer, split=split).tokens.reshape(-1).long()
    with open(path, encoding="utf-8") as f:
        text = _split_lines(f.read(), split)
    return encode(tokenizer, text)


def encode(tokenizer, text: str) -> Tensor:
    """Tokens of ``text`` (no special tokens) as 1-D int64."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "vocab_size"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(text)
    return torch.tensor(ids, dtype=torch.long)


def byte_tokens(text: str, vocab: int = 128) -> list[int]:
    """A toy tokenizer for the tiny ``--fast`` models: one token per byte, modulo ``vocab``."""
    return [b % vocab for b in text.encode("utf-8")]


def byte_detokenize(ids) -> str:
    """Inverse of :func:`byte_tokens` for ASCII text (other ids become ``?``)."""
    return "".join(chr(i) if 32 <= i < 127 or i == 10 else "?" for i in ids)
