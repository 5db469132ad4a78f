"""Autoregressive generation for :class:`~prunepath_ops.models.llama.Llama`: prefill, then cached decode steps.

Legend: B batch, T tokens (prompt), N new tokens, V vocab.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from prunepath_ops.models.decode import GraphedDecoder


def sample(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row of ``logits [B, V]``; returns ``[B]`` int64.

    Parameters
    ----------
    logits : Tensor
        ``[B, V]`` next-token logits.
    temperature : float
        0: greedy (arg-max). Above 0: sample from ``softmax(logits / temperature)``.
    top_k : int, optional
        Keep only the k most likely tokens before sampling.
    top_p : float, optional
        Nucleus sampling: keep the smallest most-likely prefix whose mass reaches ``top_p``
        (the token that crosses ``top_p`` is kept).
    generator : torch.Generator, optional
        Source of randomness, for reproducible sampling.

    Notes
    -----
    Sampling uses the exponential-race trick (``argmax(p / Exp(1))``), which draws from ``p``
    without ``torch.multinomial`` and without a host synchronisation.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # [B, V]
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(-1)  # [B, V]
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)


@torch.no_grad()
def generate(
    model,
    prompt_tokens: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    max_seq_len: int | None = None,
    prompt_lengths: Tensor | None = None,
    pad_token_id: int = 0,
    attn: str | None = None,
    cuda_graph: bool = False,
    compile: bool = False,
) -> Tensor:
    """Generate ``max_new_tokens`` tokens after ``prompt_tokens`` with the static KV cache.

    The prompt goes through :meth:`Llama.forward` (SDPA, one pass), every new token through
    :meth:`Llama.decode_step` at its sequence's own position.

    Parameters
    ----------
    model : Llama
        The cache is (re)allocated with :meth:`Llama.setup_cache` for batch B and length
        ``max_seq_len`` (default ``T + max_new_tokens``) unless one of that batch and at
        least that length is already set up.
    prompt_tokens : Tensor
        ``[T]`` or ``[B, T]`` int token ids; rows of different lengths are right-padded
        (see ``prompt_lengths``).
    max_new_tokens : int
    temperature, top_k, top_p, generator
        See :func:`sample`; ``temperature=0`` is greedy decoding.
    eos_token_id : int, optional
        Stop once every row has produced it (rows that finished early are filled with it).
        Checking costs one host synchronisation per step; without it the decode loop has none.
    max_seq_len : int, optional
        Cache length to allocate.
    prompt_lengths : Tensor, optional
        ``[B]`` int, the real length of each right-padded prompt row (a ragged batch; default:
        every row is T long). Row b continues after its own ``prompt_lengths[b]`` tokens.
    pad_token_id : int
        Fills the end of the rows of a ragged batch (the columns past ``prompt_lengths[b] + N``).
    attn : {"kernel", "sdpa"}, optional
        Attention of the decode steps (default ``model.decode_attn``).
    cuda_graph : bool
        Capture the decode step once in a CUDA graph (:class:`GraphedDecoder`) and replay it
        per token; CUDA only. Tokens equal those of the eager loop.
    compile : bool
        Run the decode step through ``torch.compile(fullgraph=True)`` (Inductor fuses the
        elementwise work between the custom ops); with ``cuda_graph`` the compiled step is what
        the graph captures. The first call compiles (seconds to a minute).

    Returns
    -------
    Tensor
        ``[B, T + N]`` (or ``[T + N]`` for a 1-D prompt): row b holds its prompt's
        ``prompt_lengths[b]`` tokens, then its new tokens, then ``pad_token_id``. N is
        ``max_new_tokens`` unless every row stopped early at ``eos_token_id``.

    Examples
    --------
    >>> import torch
    >>> from prunepath_ops.models import Llama, LlamaConfig
    >>> model = Llama(LlamaConfig.tiny()).eval()
    >>> generate(model, torch.tensor([1, 2, 3]), 4).shape
    torch.Size([7])
    >>> generate(model, torch.tensor([[1, 2, 3], [4, 5, 0]]), 4, prompt_lengths=torch.tensor([3, 2])).shape
    torch.Size([2, 7])
    """
    squeeze = prompt_tokens.dim() == 1
    tokens = prompt_tokens[None] if squeeze else prompt_tokens  # [B, T]
    B, T = tokens.shape
    device = tokens.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"generate: cuda_graph=True needs CUDA tensors; the prompt is on {device}")
    need = max_seq_len or T + max_new_tokens
    if model.cache_batch != B or model.cache_len < need:
        model.setup_cache(B, need)

    out = torch.full((B, T + max_new_tokens), pad_token_id, dtype=torch.long, device=device)  # [B, T + N]
    if prompt_lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=device)  # [B]
        out[:, :T] = tokens
        logits = model(tokens, 0, last_only=True)  # prefill: [B, 1, V]
    else:
        lengths = torch.as_tensor(prompt_lengths, device=device).long().reshape(B)  # [B]
        if not bool(((lengths >= 1) & (lengths <= T)).all()):  # once, before the decode loop
            raise ValueError(f"generate: prompt_lengths must lie in [1, T = {T}]; got {lengths.tolist()}")
        real = torch.arange(T, device=device)[None, :] < lengths[:, None]  # [B, T]
        out[:, :T] = torch.where(real, tokens, pad_token_id)
        # Right padding is harmless: a real token attends causally to earlier (real) positions
        # only, and each row's decode overwrites or masks out the cache rows of its padding.
        logits = model(tokens, 0, last_index=lengths - 1)  # prefill: [B, 1, V]

    if cuda_graph and max_new_tokens > 1:  # the first new token comes from the prefill
        step = GraphedDecoder(model, attn, compile=compile)
    else:
        decode = torch.compile(model.decode_step, fullgraph=True, dynamic=False) if compile else model.decode_step
        step = functools.partial(decode, attn=attn)
    pick = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    nxt = sample(logits[:, -1], **pick)  # [B]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache_seqlens = lengths.to(torch.int32)  # [B], the position of nxt, advanced on the device
    n = max_new_tokens
    for i in range(max_new_tokens):
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        out.scatter_(1, cache_seqlens.long()[:, None], nxt[:, None])
        if eos_token_id is not None and bool(done.all()):
            n = i + 1
            break
        if i + 1 == max_new_tokens:
            break
        logits = step(nxt, cache_seqlens)  # decode: [B, V]
        nxt = sample(logits, **pick)
        cache_seqlens += 1
    out = out[:, : T + n]
    return out[0] if squeeze else out
