"""CUDA-graph decoding: :meth:`Llama.decode_step` captured once and replayed for every new token.

At batch 1 a decode step of an 8B model launches hundreds of small kernels; replaying them as
one graph removes the host's launch cost, which is otherwise a large share of the step time.

Legend: B batch, V vocab.
"""

from __future__ import annotations

import torch
from torch import Tensor


class GraphedDecoder:
    """:meth:`~prunepath_ops.models.llama.Llama.decode_step` in a CUDA graph, replayed once per token.

    Parameters
    ----------
    model : Llama
        On a CUDA device, with its KV cache set up (:meth:`Llama.setup_cache`): the graph reads
        and writes those cache tensors, so a new ``setup_cache``, swapped FFN modules or new
        weights tensors need a new decoder. ``tau`` of the :class:`~prunepath_ops.PrunePathMLP`
        FFNs may change at any time (it lives in a device buffer the graph reads); their
        ``gate``, ``min_experts`` and ``max_experts`` are fixed at capture.
    attn : {"kernel", "sdpa"}, optional
        Attention of the captured step (default ``model.decode_attn``). ``kernel`` needs the
        fused ``prunepath_ops.attention.kv_decode_attention``: its reference reads
        ``cache_seqlens`` on the host, which a graph cannot capture.
    warmup : int
        Eager steps before the capture, on a side stream as PyTorch requires, so that lazy
        initialisation, Triton compilation and autotuning, and cuBLAS workspace allocation
        happen outside the graph.
    compile : bool
        Capture ``torch.compile(model.decode_step, fullgraph=True)`` instead of the eager step:
        Inductor fuses the elementwise work between the ops (RMSNorm, RoPE, residuals, SiLU of
        the dense FFN), which the graph alone replays as hundreds of small kernels; the custom
        ops (attention, routing, sparse FFN) stay opaque. Compilation happens in the warm-up
        (tens of seconds for a 32-layer model).

    Notes
    -----
    The warm-up steps write the keys/values of token 0 at the last cache row of every sequence
    (position ``S_max - 1``); a decode step at that position overwrites the row before reading
    it, so the decoder may be built before or after the prefill, unless a prompt fills the
    whole cache.

    Examples
    --------
    >>> decoder = GraphedDecoder(model)  # doctest: +SKIP
    >>> logits = model(prompt, 0, last_only=True)[:, -1]  # prefill, [B, V]  # doctest: +SKIP
    >>> pos = torch.full((B,), prompt.shape[1], dtype=torch.int32, device="cuda")  # doctest: +SKIP
    >>> for _ in range(n):  # doctest: +SKIP
    ...     logits = decoder(logits.argmax(-1), pos)  # [B, V], overwritten by the next call
    ...     pos += 1
    """

    def __init__(self, model, attn: str | None = None, *, warmup: int = 3, compile: bool = False) -> None:
        kv = model.layers[0].attn.kv_cache
        if kv is None:
            raise RuntimeError("GraphedDecoder: call model.setup_cache first")
        device = kv.k.device
        if device.type != "cuda":
            raise ValueError(f"GraphedDecoder: CUDA graphs need a CUDA model; the KV cache is on {device}")
        B = model.cache_batch
        self.model, self.attn = model, attn or model.decode_attn
        step = torch.compile(model.decode_step, fullgraph=True, dynamic=False) if compile else model.decode_step
        self.tokens = torch.zeros(B, dtype=torch.long, device=device)  # [B], static input
        self.cache_seqlens = torch.full((B,), model.cache_len - 1, dtype=torch.int32, device=device)  # [B]
        with torch.no_grad():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(max(warmup, 1)):
                    step(self.tokens, self.cache_seqlens, attn=self.attn)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = step(self.tokens, self.cache_seqlens, attn=self.attn)  # [B, V]

    def __call__(self, tokens: Tensor, cache_seqlens: Tensor) -> Tensor:
        """Replay the step for ``tokens [B]`` at positions ``cache_seqlens [B]`` (int32); returns logits ``[B, V]``.

        Same meaning as :meth:`Llama.decode_step`. The returned tensor is the graph's static
        output: the next call overwrites it (clone it to keep it). Nothing synchronises with
        the host: the inputs are copied into the graph's static buffers on the device.
        """
        self.tokens.copy_(tokens)
        self.cache_seqlens.copy_(cache_seqlens)
        self.graph.replay()
        return self.logits
