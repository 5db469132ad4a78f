"""Token streams from a text file, split by line ranges (SPEC data: WikiText-2 ``valid.txt``).

The shared data set is ``shared/data/wikitext-2/valid.txt`` (3,760 lines); the convention is the
first 80% of its lines for router training / calibration and the last 20% for evaluation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

DEFAULT_TEXT = Path("shared") / "data" / "wikitext-2" / "valid.txt"
TRAIN_SPLIT = (0.0, 0.8)
EVAL_SPLIT = (0.8, 1.0)


class TextTokens(NamedTuple):
    """A tokenized line range of a text file.

    Attributes
    ----------
    tokens : Tensor
        ``[N]`` int64, the lines' text (newlines kept) tokenized as one stream, no special tokens.
    first_line, stop_line : int
        The 0-based half-open line range ``[first_line, stop_line)`` that was read
        (1-based: lines ``first_line + 1`` to ``stop_line``).
    num_lines : int
        Lines in the whole file.
    path : str
    """

    tokens: Tensor
    first_line: int
    stop_line: int
    num_lines: int
    path: str

    def describe(self) -> str:
        """E.g. ``'valid.txt lines 1-3008 of 3760 (346,000 tokens)'`` (1-based, inclusive)."""
        name = os.path.basename(self.path)
        return (
            f"{name} lines {self.first_line + 1}-{self.stop_line} of {self.num_lines} ({self.tokens.numel():,} tokens)"
        )


def line_range(num_lines: int, split: tuple[float, float]) -> tuple[int, int]:
    """The 0-based half-open range ``[floor(a * N), floor(b * N))`` of a split ``(a, b)`` of N lines.

    Adjacent splits (``(0, 0.8)`` and ``(0.8, 1)``) are disjoint and cover every line.

    Examples
    --------
    >>> line_range(3760, (0.0, 0.8)), line_range(3760, (0.8, 1.0))
    ((0, 3008), (3008, 3760))
    """
    a, b = split
    if not 0.0 <= a <= b <= 1.0:
        raise ValueError(f"line_range: split must satisfy 0 <= a <= b <= 1; got {split}")
    return int(a * num_lines), int(b * num_lines)


def _encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:  # an encode() without that keyword
            return list(tokenizer.encode(text))
    return list(tokenizer(text))  # a plain callable str -> ids


def load_text_tokens(path: str | os.PathLike | None, tokenizer, split: tuple[float, float] = TRAIN_SPLIT) -> TextTokens:
    """Tokenize the lines ``split`` (fractions of the file's LINES) of a UTF-8 text file into one stream.

    Parameters
    ----------
    path : str or PathLike, optional
        The text file; None: :func:`find_default_text` (raises if it is absent).
    tokenizer
        A Hugging Face tokenizer (``encode(text, add_special_tokens=False)``) or any callable
        ``str -> list[int]``.
    split : (float, float)
        ``(a, b)``: lines ``[floor(a*N), floor(b*N))`` of the N lines. Default ``(0.0, 0.8)`` (the
        training / calibration part); ``(0.8, 1.0)`` is the evaluation part.

    Returns
    -------
    TextTokens
        The int64 stream and the line range used (``.describe()`` says it in words).
    """
    if path is None:
        path = find_default_text()
        if path is None:
            raise FileNotFoundError(f"load_text_tokens: no path given and no {DEFAULT_TEXT} found")
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    first, stop = line_range(len(lines), split)
    ids = _encode(tokenizer, "".join(lines[first:stop]))
    return TextTokens(torch.tensor(ids, dtype=torch.long), first, stop, len(lines), path)


def find_default_text() -> str | None:
    """``shared/data/wikitext-2/valid.txt`` in a parent of the package directory or of the working directory.

    Returns None when neither has one.
    """
    starts = [Path(__file__).resolve().parent, Path.cwd().resolve()]
    for start in starts:
        for directory in (start, *start.parents):
            candidate = directory / DEFAULT_TEXT
            if candidate.is_file():
                return str(candidate)
    return None
