"""Sliding-window perplexity with the FFN sparsity (SPEC.md section 4) measured on the same tokens.

Legend: N tokens in the text, W window, B windows per batch, T tokens per window, L layers, E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunepath_ops.convert.calibrate import ffn_sparsity, record_num_active
from prunepath_ops.modules import PrunePathMLP


@dataclass(frozen=True)
class PerplexityResult:
    """What :func:`perplexity` returns.

    Attributes
    ----------
    ppl : float
        ``exp(nll)``.
    nll : float
        Mean negative log-likelihood (nats) per scored token.
    tokens : int
        Scored tokens (``N - 1``: every token but the first is predicted once).
    sparsity : float
        ``s_FFN`` over the positions whose logits were scored: measured routing for
        :class:`PrunePathMLP` layers, the module's own ``sparsity`` attribute for static
        layers (e.g. :class:`~prunepath_ops.evaluate.baselines.StaticPrunedMLP`), 0 for dense
        FFNs; the mean over layers.
    """

    ppl: float
    nll: float
    tokens: int
    sparsity: float


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The ``(begin, end, first_scored)`` windows of the Hugging Face sliding-window recipe.

    Each window is ``tokens[begin:end]`` (at most ``window`` long; windows start every ``stride``
    tokens); it scores the predictions of tokens ``first_scored .. end - 1`` (absolute positions),
    i.e. the tokens no earlier window scored. Together the windows score tokens ``1 .. n - 1`` once.

    Examples
    --------
    >>> windows(10, 4, 2)
    [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    >>> windows(8, 4, 4)  # stride == window: non-overlapping chunks, each scores its own tokens 1..T-1
    [(0, 4, 1), (4, 8, 5)]
    """
    if window < 2:
        raise ValueError(f"perplexity: window must be >= 2; got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"perplexity: stride must be in [1, window={window}]; got {stride}")
    if n < 2:
        raise ValueError(f"perplexity: need at least 2 tokens; got {n}")
    out = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _static_sparsity(module: nn.Module) -> float:
    return float(getattr(module, "sparsity", 0.0))


def _ffn_modules(model: nn.Module) -> list[nn.Module]:
    """The FFN of each layer: ``model.ffns()`` for :class:`~prunepath_ops.models.Llama`, else the PrunePathMLPs."""
    if hasattr(model, "ffns"):
        return list(model.ffns())
    return [m for m in model.modules() if isinstance(m, PrunePathMLP)]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: Tensor,
    *,
    window: int = 512,
    stride: int = 256,
    batch_size: int = 1,
    max_tokens: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``tokens`` with a sliding window, and ``s_FFN`` on the same positions.

    The Hugging Face recipe: windows of ``window`` tokens start every ``stride`` tokens; after the
    first, a window scores only its last tokens not scored before (``stride`` of them), so every
    token is predicted once with at least ``window - stride`` tokens of context (see :func:`windows`).

    Parameters
    ----------
    model : nn.Module
        ``model(tokens [B, T]) -> logits [B, T, V]`` (or an output with ``.logits``), e.g.
        :class:`~prunepath_ops.models.Llama` (its KV cache is dropped first: full causal forwards).
    tokens : Tensor
        ``[N]`` int token ids.
    window, stride : int
        ``1 <= stride <= window``; ``stride == window`` is plain non-overlapping chunks.
    batch_size : int
        Windows of equal length per forward call.
    max_tokens : int, optional
        Use only the first ``max_tokens`` tokens.
    progress : bool
        tqdm bar over the windows.

    Returns
    -------
    PerplexityResult
        ``s_FFN`` counts each scored position once (the position whose logits predict a scored
        token), so the overlapping context of the windows is not counted twice.
    """
    from tqdm.auto import tqdm

    tokens = torch.as_tensor(tokens).reshape(-1).long()
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if batch_size < 1:
        raise ValueError(f"perplexity: batch_size must be >= 1; got {batch_size}")
    max_len = getattr(getattr(model, "config", None), "max_seq_len", None)
    if max_len is not None and window > max_len:
        raise ValueError(f"perplexity: window={window} exceeds the model's max_seq_len={max_len}")
    if hasattr(model, "clear_cache"):
        model.clear_cache()
    wins = windows(len(tokens), window, stride)
    device = next(model.parameters()).device
    ffns = _ffn_modules(model)
    routed = [m for m in ffns if isinstance(m, PrunePathMLP)]

    batches: list[list[tuple[int, int, int]]] = []
    for w in wins:  # consecutive windows of one length share a batch (only the last may be shorter)
        if batches and len(batches[-1]) < batch_size and (w[1] - w[0]) == (batches[-1][0][1] - batches[-1][0][0]):
            batches[-1].append(w)
        else:
            batches.append([w])

    nll_sum, scored = 0.0, 0
    masks: list[Tensor] = []
    training = model.training
    model.eval()
    try:
        with record_num_active(routed) as rec:
            bar = tqdm(total=len(wins), desc="perplexity", unit="win", disable=not progress, leave=False)
            for batch in batches:
                T = batch[0][1] - batch[0][0]
                x = torch.stack([tokens[b:e] for b, e, _ in batch]).to(device)  # [B, T]
                logits = _logits(model, x)  # [B, T, V]
                # Position j predicts token j + 1; window (b, e, first) scores positions first - 1 - b .. T - 2.
                pos = torch.arange(T - 1, device=device)
                starts = torch.tensor([first - 1 - b for b, _, first in batch], device=device)
                mask = pos[None, :] >= starts[:, None]  # [B, T - 1]
                lp = F.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
                ).view(len(batch), T - 1)
                nll_sum += float(lp[mask].double().sum())
                scored += int(mask.sum())
                masks.append(torch.cat([mask, torch.zeros(len(batch), 1, dtype=torch.bool, device=device)], 1).cpu())
                bar.update(len(batch))
                if progress:
                    bar.set_postfix(ppl=f"{math.exp(nll_sum / max(scored, 1)):.2f}")
            bar.close()
    finally:
        model.train(training)

    per_layer = []
    if ffns:
        full_mask = torch.cat([m.reshape(-1) for m in masks])
        records = iter(rec)
        for m in ffns:
            if isinstance(m, PrunePathMLP):
                per_layer.append(ffn_sparsity([torch.cat(next(records))], m.w_down.shape[0], full_mask))
            else:
                per_layer.append(_static_sparsity(m))
    sparsity = sum(per_layer) / len(per_layer) if per_layer else 0.0
    nll = nll_sum / scored
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=scored, sparsity=sparsity)
