"""A gpt-fast style Llama decoder whose FFN slots hold dense ``LlamaMLP`` or :class:`PrunePathMLP` modules.

RMSNorm, RoPE (Hugging Face ``rotate_half`` convention, so HF weights load unchanged), grouped-query
attention through SDPA with a static preallocated KV cache, gated SiLU FFN. With dense FFNs and
SDPA attention this model is the dense oracle (no custom ops at all).

Two entry points: :meth:`Llama.forward` (prefill, or any chunk of tokens at shared positions,
attention through SDPA under an explicit mask) and :meth:`Llama.decode_step` (one new token per
sequence at its own position, fixed shapes and no host synchronisation, so a CUDA graph can
capture it; attention through ``kv_decode_attention`` or SDPA).

Legend: B batch, T tokens, d hidden, F FFN width, H heads, Hkv kv heads, D head dim, V vocab,
E experts, S expert width, S_max cache length.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunepath_ops.attention import kv_decode_attention
from prunepath_ops.decode_step import add_rms_norm, decode_linear, rope_qkv
from prunepath_ops.decode_step.ops import cuda_gemv_built
from prunepath_ops.modules import PrunePathMLP
from prunepath_ops.reference.decode_step import rotate_rows


@dataclass
class LlamaConfig:
    """Shape and numerics of a Llama-architecture decoder.

    Attributes
    ----------
    vocab : int
        Vocabulary size V.
    d : int
        Hidden size d.
    n_layers : int
    n_heads : int
        Query heads H.
    n_kv_heads : int
        Key/value heads Hkv (divides H; ``Hkv < H`` is grouped-query attention).
    ffn : int
        FFN width F.
    head_dim : int, optional
        D; default ``d // n_heads``.
    rope_theta : float
        RoPE base.
    norm_eps : float
        RMSNorm epsilon.
    max_seq_len : int
        Longest sequence the RoPE table (and so any KV cache) covers.
    tie_embeddings : bool
        The LM head shares the token embedding matrix.
    """

    vocab: int = 32000
    d: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    ffn: int = 11008
    head_dim: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.d // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def tiny(cls, **overrides) -> LlamaConfig:
        """A small random-weight configuration for tests (GQA 4/2, 2 layers, F=128)."""
        kw = dict(vocab=128, d=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=128, max_seq_len=64)
        kw.update(overrides)
        return cls(**kw)


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, normalised in fp32 and cast back before the weight (as Hugging Face does)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # F.rms_norm is x * rsqrt(mean(x^2) + eps), one fused kernel on CUDA where five
        # elementwise ones ran before (at decode each is a launch: 65 norms per 32-layer step).
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """Precomputed RoPE tables ``cos, signed_sin``, ``[S_max, D]`` each, fp32, halves duplicated.

    ``signed_sin`` is ``sin`` with its first half negated: the sign of Hugging Face's
    ``rotate_half(x) = cat(-x2, x1)`` moves into the table, so :func:`apply_rope` needs no negation.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # [D/2]
    freqs = torch.arange(max_seq_len, dtype=torch.float)[:, None] * inv_freq[None, :]  # [S_max, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [S_max, D]
    sin = emb.sin()
    return emb.cos(), torch.cat((-sin[:, : head_dim // 2], sin[:, head_dim // 2 :]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate ``x [B, T, H, D]`` by the positions' ``cos, signed_sin [T, D]`` (see :func:`rope_tables`).

    Equals Hugging Face's ``x * cos + rotate_half(x) * sin``. One position per sequence (decode):
    ``x [B, H, D]`` with tables ``[B, D]`` gives the same layout. Tables in another dtype than
    ``x`` are cast (callers that apply them to several tensors cast once instead).
    """
    # rotate_rows broadcasts the tables as [T|B, 1, D]: the same formula for prefill and decode.
    return rotate_rows(x, cos.to(x.dtype), signed_sin.to(x.dtype))


class KVCache(nn.Module):
    """Static preallocated key/value cache, ``[B, S_max, Hkv, D]`` each."""

    def __init__(self, batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None) -> None:
        super().__init__()
        shape = (batch, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v [B, T, Hkv, D]`` at positions ``input_pos [T]``; return the whole caches (no host sync)."""
        self.k.index_copy_(1, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(1, input_pos, v.to(self.v.dtype))
        return self.k, self.v

    def write_rows(self, cache_seqlens: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v [B, Hkv, D]`` at row ``cache_seqlens[b]`` of each sequence; return the whole caches."""
        rows = (torch.arange(k.shape[0], device=k.device), cache_seqlens.long())  # one (b, row) pair per sequence
        self.k.index_put_(rows, k.to(self.k.dtype))
        self.v.index_put_(rows, v.to(self.v.dtype))
        return self.k, self.v


# Decode batches up to this size take decode_linear for the attention projections. On the H200 the
# CUDA kernel beats cuBLAS at one token only (bench/results/decode_linear_cuda.md: q/k/v 14.8-15.0
# vs 15.6-15.9 us, output 11.4 vs 13.3-13.5 us; at 2 and 4 tokens 0.64-0.95x).
DECODE_GEMV_MAX_ROWS = 1


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optionally reading and writing a static :class:`KVCache`."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.d, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.d, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.d, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d, bias=False)
        self.kv_cache: KVCache | None = None
        self.qkv_weight: Tensor | None = None
        self._fuse_qkv()
        # decode_fused's two projections through decode_linear (one GEMV launch, PDL) instead of
        # cuBLAS, for batches up to DECODE_GEMV_MAX_ROWS. None: where the package has its CUDA kernel;
        # end to end on the H200 that is within noise of cuBLAS (dense 211.0 -> 212.0 tok/s,
        # PrunePath 30 % 331.2 -> 331.5, bench/results/decode_e2e_cuda_gemv_default.md), while the
        # Triton one lost (0.94x the step). True: decode_linear whatever its backend; False: cuBLAS.
        self.decode_gemv: bool | None = None
        # decode_fused's RoPE inside kv_decode_attention (rotary_cos / rotary_sin: the same bits as
        # rope_qkv, one launch less per layer) when the cache has the activations' dtype; False:
        # rope_qkv, then the op (for A/B timing, bench/decode_e2e_gpu.py --ropeop).
        self.rope_in_attention = True

    # -- one GEMV for q, k and v ---------------------------------------------------------------
    # At decode each projection is a GEMV, and cuBLAS runs the small ones split-K with a reduction
    # kernel of their own: three projections cost ~34 us per 8B layer where one fused GEMV over the
    # same 50 MB needs ~16. The three weights stay parameters under their Hugging Face names
    # (loaders, optimisers and checkpoints see no difference) but are row blocks of one tensor,
    # qkv_weight [(H + 2 Hkv) D, d], which the projection reads.
    def _fuse_qkv(self) -> None:
        projs = (self.q_proj, self.k_proj, self.v_proj)
        fused = torch.cat([p.weight.detach() for p in projs])  # [(H + 2 Hkv) D, d]
        start = 0
        for p in projs:
            rows = p.out_features
            p.weight = nn.Parameter(fused[start : start + rows], requires_grad=p.weight.requires_grad)
            start += rows
        self.qkv_weight = fused

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() give every parameter storage of its own: share it again.
        out = super()._apply(fn, recurse)
        self._fuse_qkv()
        return out

    def __deepcopy__(self, memo):
        # Parameter.__deepcopy__ clones each weight: the copy's three views would not share.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            object.__setattr__(new, key, copy.deepcopy(value, memo))
        new._fuse_qkv()
        return new

    @torch._dynamo.assume_constant_result  # torch.compile evaluates it once, at trace time
    def qkv_fused(self) -> bool:
        """Whether q/k/v still view ``qkv_weight`` (something that replaced a weight tensor unfuses them)."""
        w = self.qkv_weight
        if w is None:
            return False
        base = w.untyped_storage().data_ptr()
        row = w.stride(0) * w.element_size()
        starts = (0, self.q_proj.out_features, self.q_proj.out_features + self.k_proj.out_features)
        return all(
            p.weight.untyped_storage().data_ptr() == base and p.weight.data_ptr() == w.data_ptr() + s * row
            for p, s in zip((self.q_proj, self.k_proj, self.v_proj), starts, strict=True)
        )

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q [..., H D], k [..., Hkv D], v [..., Hkv D]`` of ``x [..., d]``: one GEMV when fused.

        torch.compile evaluates the aliasing check once, when it traces (as CUDA graphs capture
        the module as it is, once).
        """
        if self.qkv_weight is not None and self.qkv_fused():
            qkv = F.linear(x, self.qkv_weight)
            return qkv.split((self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features), -1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor, kv_len: int | None
    ) -> Tensor:
        """``x [B, T, d]`` -> ``[B, T, d]``.

        ``cos, sin [T, D]`` are the RoPE rows of the T positions ``input_pos [T]``; ``mask [T, S_kv]``
        (True = attend) covers the keys: the T new ones without a cache, else the first ``kv_len``
        cache rows (``kv_len`` None: the whole cache).
        """
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)  # [B, T, H D], [B, T, Hkv D] x 2
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), cos, sin)  # [B, T, H, D]
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim), cos, sin)  # [B, T, Hkv, D]
        v = v.view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, S_max, Hkv, D]
            if kv_len is not None:
                k, v = k[:, :kv_len], v[:, :kv_len]  # [B, S_kv, Hkv, D]
        y = attention(q, k.to(q.dtype), v.to(q.dtype), mask)  # [B, T, H, D]
        return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))

    def decode(self, x: Tensor, cos: Tensor, sin: Tensor, cache_seqlens: Tensor, mask: Tensor | None) -> Tensor:
        """One token per sequence: ``x [B, d]`` -> ``[B, d]``, its k/v written at row ``cache_seqlens[b]``.

        ``cos, sin [B, D]`` are the RoPE rows of each sequence's position ``cache_seqlens [B]`` int32.
        ``mask`` None: ``kv_decode_attention`` (appends k/v and reads ``cache_seqlens[b] + 1`` keys);
        else SDPA over the whole cache under ``mask [B, 1, 1, S_max]`` (the dense oracle).
        """
        B = x.shape[0]
        q, k, v = self.project_qkv(x)  # [B, H D], [B, Hkv D] x 2
        q = apply_rope(q.view(B, self.n_heads, self.head_dim), cos, sin)  # [B, H, D]
        k = apply_rope(k.view(B, self.n_kv_heads, self.head_dim), cos, sin)  # [B, Hkv, D]
        v = v.view(B, self.n_kv_heads, self.head_dim)  # [B, Hkv, D]
        if mask is None:
            y = self._attend_cached(q, k, v, cache_seqlens)  # [B, H, D]
        else:
            k_all, v_all = self.kv_cache.write_rows(cache_seqlens, k, v)  # [B, S_max, Hkv, D]
            y = attention(q[:, None], k_all.to(q.dtype), v_all.to(q.dtype), mask)[:, 0]  # [B, H, D]
        return self.o_proj(y.reshape(B, self.n_heads * self.head_dim))

    def decode_fused(self, x: Tensor, cos: Tensor, sin: Tensor, cache_seqlens: Tensor) -> Tensor:
        """:meth:`decode` through ``kv_decode_attention`` with the RoPE of q and k inside it (its ``rotary_cos``).

        ``x [B, d]`` -> ``[B, d]``; ``cos, sin [B, D]`` in the dtype of ``x``. The q/k/v heads are
        views of one projection; with a cache of another dtype than ``x`` they are rotated first
        (:func:`rope_qkv`, one launch) and cast, as :meth:`decode` does.
        """
        B = x.shape[0]
        H, Hkv = self.n_heads, self.n_kv_heads
        gemv = getattr(self, "decode_gemv", None)  # modules pickled before it existed: None
        gemv = B <= DECODE_GEMV_MAX_ROWS and ((x.is_cuda and cuda_gemv_built()) if gemv is None else gemv)
        if self.qkv_weight is not None and self.qkv_fused():
            qkv = (decode_linear if gemv else F.linear)(x, self.qkv_weight)  # [B, (H + 2 Hkv) D]
        else:
            qkv = torch.cat(self.project_qkv(x), dim=-1)
        in_attention = getattr(self, "rope_in_attention", True)  # modules pickled before it existed: True
        if in_attention and qkv.dtype == self.kv_cache.k.dtype:  # the kernel rotates q and k as rope_qkv would
            q, k, v = qkv.view(B, H + 2 * Hkv, self.head_dim).split((H, Hkv, Hkv), dim=1)  # [B, H|Hkv, D] views
            y = self._attend_cached(q, k, v, cache_seqlens, rotary=(cos, sin))  # [B, H, D]
        else:
            heads = rope_qkv(qkv, cos, sin, H, Hkv)  # [B, H + 2 Hkv, D]: q, k rotated; v
            y = self._attend_cached(*heads.split((H, Hkv, Hkv), dim=1), cache_seqlens)  # [B, H, D]
        y = y.reshape(B, H * self.head_dim)  # [B, H D]
        if gemv and self.o_proj.bias is None and self.o_proj.weight.is_contiguous():
            return decode_linear(y, self.o_proj.weight)
        return self.o_proj(y)

    def _attend_cached(
        self, q: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor, rotary: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """``kv_decode_attention`` over the cache, appending ``k, v [B, Hkv, D]``: ``q [B, H, D]`` -> ``[B, H, D]``.

        ``rotary``: ``(cos, sin) [B, D]`` for the op to rotate q and k with (both then in the cache's dtype).
        """
        cache = self.kv_cache
        kv_dtype = cache.k.dtype
        rope = {} if rotary is None else {"rotary_cos": rotary[0], "rotary_sin": rotary[1]}
        return _decode_attention_op()(
            q.to(kv_dtype), cache.k, cache.v, cache_seqlens, k.to(kv_dtype), v.to(kv_dtype), **rope
        ).to(q.dtype)


def _decode_attention_op() -> Callable:
    """The decode attention :meth:`Attention.decode` calls: ``prunepath_ops.kv_decode_attention``.

    A function rather than a direct call so tests can swap in the readable reference and the
    end-to-end benchmark a profiled wrapper (the reference reads ``cache_seqlens`` on the host,
    so only the op can be captured in a CUDA graph; both have the same signature and semantics).
    """
    return kv_decode_attention


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Masked GQA attention through SDPA: ``q [B, T, H, D]``, ``k, v [B, S_kv, Hkv, D]``, ``mask [T, S_kv]``.

    ``mask`` (True = attend) may be anything that broadcasts to ``[B, H, T, S_kv]``, e.g.
    ``[B, 1, 1, S_kv]`` for one decode query per sequence at its own position.

    Query head ``h`` reads kv head ``h // (H / Hkv)`` (Hugging Face ``repeat_kv``). The mask is explicit
    because SDPA's ``is_causal`` aligns the causal diagonal to key 0, which is wrong for queries at
    offset positions (a single decode query would see only key 0). :meth:`Attention.decode` can
    replace it by the decode attention kernel.
    """
    H, Hkv = q.shape[2], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|Hkv, T|S_kv, D]
    if H != Hkv:  # repeat_kv; SDPA's enable_gqa is not on every backend/torch we support
        kt, vt = kt.repeat_interleave(H // Hkv, dim=1), vt.repeat_interleave(H // Hkv, dim=1)
    y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)  # [B, H, T, D]
    return y.transpose(1, 2)


class LlamaMLP(nn.Module):
    """Dense gated FFN ``down(silu(gate(x)) * up(x))``, Hugging Face names (``gate_proj/up_proj/down_proj``)."""

    def __init__(self, d: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, ffn, bias=False)  # [F, d]
        self.up_proj = nn.Linear(d, ffn, bias=False)  # [F, d]
        self.down_proj = nn.Linear(ffn, d, bias=False)  # [d, F]
        self.act_fn = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder layer: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d, config.norm_eps)
        self.ffn: nn.Module = LlamaMLP(config.d, config.ffn)  # LlamaMLP or PrunePathMLP

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor, kv_len) -> Tensor:
        h = x + self.attn(self.attn_norm(x), cos, sin, mask, input_pos, kv_len)
        return h + self.ffn(self.ffn_norm(h))

    def decode(self, x: Tensor, cos: Tensor, sin: Tensor, cache_seqlens: Tensor, mask: Tensor | None) -> Tensor:
        """``x [B, d]`` -> ``[B, d]``, one token per sequence (see :meth:`Attention.decode`)."""
        h = x + self.attn.decode(self.attn_norm(x), cos, sin, cache_seqlens, mask)
        return h + self.ffn(self.ffn_norm(h))

    def decode_fused(
        self,
        h: Tensor,
        delta: Tensor | None,
        cos: Tensor,
        sin: Tensor,
        cache_seqlens: Tensor,
        router_norm: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`decode` with each residual add fused into the next RMSNorm (:func:`add_rms_norm`).

        The layer's input is ``h + delta`` (``delta`` None: ``h``), the previous layer's add left
        pending; returns ``(h', delta')`` whose sum is the layer's output, so the add happens in the
        next layer's first norm (or the final norm). ``router_norm``: a :class:`PrunePathMLP` FFN
        does the FFN's norm in its router kernel (:meth:`PrunePathMLP.forward_after_norm`).
        """
        y, h = add_rms_norm(h, delta, self.attn_norm.weight, self.attn_norm.eps)  # [B, d] x 2
        a = self.attn.decode_fused(y, cos, sin, cache_seqlens)
        if router_norm and isinstance(self.ffn, PrunePathMLP):
            out, h = self.ffn.forward_after_norm(h, a, self.ffn_norm.weight, self.ffn_norm.eps)
            return h, out
        y, h = add_rms_norm(h, a, self.ffn_norm.weight, self.ffn_norm.eps)
        return h, self.ffn(y)


DECODE_ATTENTION = ("kernel", "sdpa")


class Llama(nn.Module):
    """Llama-architecture decoder (embedding, :class:`Block` x n_layers, final RMSNorm, LM head).

    Parameters
    ----------
    config : LlamaConfig
    decode_attn : {"kernel", "sdpa"}
        Default attention of :meth:`decode_step` (settable later as ``model.decode_attn``):
        ``kernel`` is ``prunepath_ops.attention.kv_decode_attention``, which reads each
        sequence's valid cache prefix only; ``sdpa``
        is the dense oracle's masked SDPA over the whole cache. :meth:`forward` always uses SDPA.

    Attributes
    ----------
    fused_decode : bool
        With ``kernel`` attention, :meth:`decode_step` fuses each residual add into the next
        RMSNorm and the RoPE of q and k into one launch (:mod:`prunepath_ops.decode_step`; default
        True). False runs the same modules op by op, as the ``sdpa`` oracle does.
    fused_router_norm : bool
        With ``fused_decode``, each :class:`PrunePathMLP` FFN also takes its RMSNorm into its router
        kernel at batch 1 on CUDA (:func:`prunepath_ops.norm_linear_topp_route`: one launch less per
        layer; the norm's output may differ from :func:`add_rms_norm`'s in the last bit). Default
        False: measured slower on the H200 (0.96x tokens/s at 30 % experts at Llama-3-8B's shape,
        bench/results/decode_e2e_cuda_routernorm.md), since every router block recomputes the norm.

    Examples
    --------
    >>> import torch
    >>> model = Llama(LlamaConfig.tiny()).eval()
    >>> model.setup_cache(batch=1, max_seq_len=16)
    >>> logits = model(torch.tensor([[1, 2, 3]]), 0)  # prefill: positions 0..2
    >>> logits = model(torch.tensor([[4]]), torch.tensor([3]))  # decode: position 3
    >>> logits.shape
    torch.Size([1, 1, 128])
    >>> model.decode_step(torch.tensor([5]), torch.tensor([4], dtype=torch.int32)).shape  # position 4
    torch.Size([1, 128])
    """

    def __init__(self, config: LlamaConfig, decode_attn: str = "kernel") -> None:
        super().__init__()
        self.config = config
        self.decode_attn = decode_attn
        self.fused_decode = True
        self.fused_router_norm = False
        self.embed = nn.Embedding(config.vocab, config.d)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d, config.norm_eps)
        self.lm_head = nn.Linear(config.d, config.vocab, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # [S_max, D]
        self.register_buffer("rope_sin", sin, persistent=False)  # [S_max, D], signed (see rope_tables)
        self.cache_len = 0

    # -- KV cache ----------------------------------------------------------------------------
    def setup_cache(self, batch: int, max_seq_len: int | None = None, dtype=None, device=None) -> None:
        """Preallocate a static KV cache ``[B, S_max, Hkv, D]`` in every layer (zeros).

        Parameters
        ----------
        batch : int
        max_seq_len : int, optional
            Cache length S_max; default (and at most) ``config.max_seq_len``.
        dtype, device : optional
            Default: those of the model's weights.
        """
        c = self.config
        max_seq_len = max_seq_len or c.max_seq_len
        if max_seq_len > c.max_seq_len:
            raise ValueError(f"setup_cache: max_seq_len={max_seq_len} exceeds config.max_seq_len={c.max_seq_len}")
        dtype = dtype or self.embed.weight.dtype
        device = device or self.embed.weight.device
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch, max_seq_len, c.n_kv_heads, c.head_dim, dtype, device)
        self.cache_len = max_seq_len

    def clear_cache(self) -> None:
        """Drop the KV caches (the model then runs cache-free full forwards)."""
        for layer in self.layers:
            layer.attn.kv_cache = None
        self.cache_len = 0

    @property
    def cache_batch(self) -> int:
        kv = self.layers[0].attn.kv_cache
        return 0 if kv is None else kv.k.shape[0]

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self,
        tokens: Tensor,
        input_pos: Tensor | int | None = None,
        last_only: bool = False,
        last_index: Tensor | None = None,
    ) -> Tensor:
        """Logits of ``tokens [B, T]`` at positions ``input_pos``.

        Parameters
        ----------
        tokens : Tensor
            ``[B, T]`` int token ids.
        input_pos : Tensor or int, optional
            ``[T]`` int64 positions, or the int position of the first token (default 0).
            With a cache, the new keys/values are written at these positions and the queries
            attend to every cache row at or before their own position: an int start attends
            to the valid prefix ``[0, start + T)`` only; a tensor attends over the whole cache
            under the mask (no host synchronisation, shapes fixed: the decode step). Without
            a cache the T tokens attend causally to each other only.
        last_only : bool
            Return only the last position's logits (``[B, 1, V]``), e.g. after a prefill.
        last_index : Tensor, optional
            ``[B]`` int: return only the logits at index ``last_index[b]`` of row b (``[B, 1, V]``),
            e.g. the last real token of each right-padded prompt of a ragged batch.

        Returns
        -------
        Tensor
            ``[B, T, V]`` logits in the model's dtype.
        """
        B, T = tokens.shape
        device = tokens.device
        cached = self.layers[0].attn.kv_cache is not None
        if input_pos is None:
            input_pos = 0
        if isinstance(input_pos, int):
            start = input_pos
            pos = torch.arange(start, start + T, device=device)  # [T]
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # [T, D]
            kv_len = start + T if cached else None
        else:
            pos = input_pos.to(device=device, dtype=torch.long)  # [T]
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # [T, D]
            kv_len = None
        cos, sin = cos.to(self.embed.weight.dtype), sin.to(self.embed.weight.dtype)  # once for all layers
        if cached:
            n_keys = kv_len if kv_len is not None else self.cache_len
            mask = torch.arange(n_keys, device=device)[None, :] <= pos[:, None]  # [T, S_kv]
        else:
            mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # [T, T]
        x = self.embed(tokens)  # [B, T, d]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, pos, kv_len)
        if last_index is not None:
            x = x.gather(1, last_index.long().view(B, 1, 1).expand(B, 1, x.shape[-1]))  # [B, 1, d]
        elif last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))  # [B, T|1, V]

    def decode_step(self, tokens: Tensor, cache_seqlens: Tensor, *, attn: str | None = None) -> Tensor:
        """Logits of one new token per sequence, each at its own position: the CUDA-graph-capturable step.

        Writes the tokens' keys/values at row ``cache_seqlens[b]`` of each sequence's cache, which
        then attends to its first ``cache_seqlens[b] + 1`` rows. Shapes are fixed and nothing is
        read back to the host (so a graph captured once replays for any positions, see
        :class:`~prunepath_ops.models.decode.GraphedDecoder`); ``cache_seqlens`` is not advanced.

        Parameters
        ----------
        tokens : Tensor
            ``[B]`` int token ids, B the batch of :meth:`setup_cache`.
        cache_seqlens : Tensor
            ``[B]`` int32 (other int dtypes are converted): tokens already cached per sequence,
            i.e. the new token's position; sequences may differ (ragged batch). Must stay below
            the cache length (not checked: checking would synchronise).
        attn : {"kernel", "sdpa"}, optional
            Default ``self.decode_attn``.

        Returns
        -------
        Tensor
            ``[B, V]`` logits in the model's dtype.

        Examples
        --------
        >>> import torch
        >>> model = Llama(LlamaConfig.tiny()).eval()
        >>> model.setup_cache(batch=2, max_seq_len=16)
        >>> _ = model(torch.tensor([[1, 2, 3], [4, 5, 0]]), 0)  # right-padded prompts of lengths 3 and 2
        >>> model.decode_step(torch.tensor([6, 7]), torch.tensor([3, 2], dtype=torch.int32)).shape
        torch.Size([2, 128])
        """
        attn = attn or self.decode_attn
        if attn not in DECODE_ATTENTION:
            raise ValueError(f"decode_step: attn must be one of {DECODE_ATTENTION}; got {attn!r}")
        if self.layers[0].attn.kv_cache is None:
            raise RuntimeError("decode_step: call setup_cache first")
        cache_seqlens = cache_seqlens.to(torch.int32)  # what kv_decode_attention takes; a no-op for int32
        dtype = self.embed.weight.dtype  # cast once here, not in each of the 2 x n_layers apply_rope calls
        cos = self.rope_cos.index_select(0, cache_seqlens).to(dtype)  # [B, D]
        sin = self.rope_sin.index_select(0, cache_seqlens).to(dtype)  # [B, D]
        mask = None
        if attn == "sdpa":
            keys = torch.arange(self.cache_len, device=tokens.device)  # [S_max]
            mask = (keys[None, :] <= cache_seqlens[:, None])[:, None, None, :]  # [B, 1, 1, S_max]
        x = self.embed(tokens)  # [B, d]
        if attn == "kernel" and getattr(self, "fused_decode", True) and self._norms_in(dtype):  # older pickles lack it
            # Three launches per layer for the elementwise work instead of ~16 (two residual adds
            # fused into the next norms, RoPE of q and k in one), the same numerics up to rounding.
            h, delta = x, None
            router_norm = getattr(self, "fused_router_norm", False)  # older pickles lack it
            for layer in self.layers:
                h, delta = layer.decode_fused(h, delta, cos, sin, cache_seqlens, router_norm)
            y, _ = add_rms_norm(h, delta, self.norm.weight, self.norm.eps)
            return self.lm_head(y)  # [B, V]
        for layer in self.layers:
            x = layer.decode(x, cos, sin, cache_seqlens, mask)
        return self.lm_head(self.norm(x))  # [B, V]

    def _norms_in(self, dtype: torch.dtype) -> bool:
        """Whether every RMSNorm weight has the activations' dtype (what :func:`add_rms_norm` takes)."""
        norms = [self.norm, *(n for layer in self.layers for n in (layer.attn_norm, layer.ffn_norm))]
        return all(n.weight.dtype == dtype for n in norms)

    # -- FFN conversion ----------------------------------------------------------------------
    def convert_ffns(self, fn: Callable[[int, nn.Module], nn.Module]) -> list[nn.Module]:
        """Replace every layer's FFN by ``fn(layer_index, ffn)``; return the new FFN modules."""
        new = []
        for i, layer in enumerate(self.layers):
            layer.ffn = fn(i, layer.ffn)
            new.append(layer.ffn)
        return new

    def ffns(self) -> list[nn.Module]:
        """The FFN module of every layer."""
        return [layer.ffn for layer in self.layers]


def _per_layer(value, n: int, name: str) -> list:
    if isinstance(value, Tensor) and value.ndim == 2:  # [n_layers, F]
        value = list(value)
    if value is None or not isinstance(value, Sequence):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{name}: expected {n} entries (one per layer), got {len(value)}")
    return list(value)


def to_prunepath(
    model: Llama,
    expert_width: int = 32,
    permutations: Sequence[Tensor] | None = None,
    *,
    tau: float = 1.05,
    gate: str = "sigmoid",
    **kwargs,
) -> list[PrunePathMLP]:
    """Swap every dense :class:`LlamaMLP` of ``model`` for a :class:`PrunePathMLP` (in place).

    Parameters
    ----------
    model : Llama
    expert_width : int
        S, neurons per expert (must divide F).
    permutations : sequence of Tensor, optional
        One ``[F]`` neuron permutation per layer (identity if None): packed neuron ``i`` is dense
        neuron ``permutations[layer][i]``.
    tau : float
        Top-p threshold; ``tau >= 1`` keeps every expert.
    gate : {"sigmoid", "prob", "renorm", "one"}
        ``"one"`` with ``tau >= 1`` reproduces the dense FFN.
    **kwargs
        Forwarded to :meth:`PrunePathMLP.from_dense` (``min_experts``, ``max_experts``, ``path``, ``backend``).

    Returns
    -------
    list of PrunePathMLP
        The new modules, in layer order (set ``.tau`` on them later, or use :func:`set_tau`).
        Routers are zero-initialised.
    """
    perms = _per_layer(permutations, len(model.layers), "to_prunepath: permutations")

    def convert(i: int, ffn: nn.Module) -> nn.Module:
        if isinstance(ffn, PrunePathMLP):
            return ffn
        return PrunePathMLP.from_dense(ffn, expert_width, perms[i], tau=tau, gate=gate, **kwargs)

    return model.convert_ffns(convert)


def prunepath_to_dense(mlp: PrunePathMLP, permutation: Tensor | None = None) -> LlamaMLP:
    """Rebuild a dense :class:`LlamaMLP` from a gated SiLU :class:`PrunePathMLP` (the router is dropped).

    Without ``permutation`` the neurons stay in the packed (expert) order, which computes the same
    function; with it the original dense order is restored.
    """
    if not mlp.gated or mlp.act != "silu" or mlp.b_in is not None or mlp.b_out is not None:
        raise TypeError("prunepath_to_dense: only a bias-free gated SiLU PrunePathMLP maps back to a LlamaMLP")
    E, S, d = mlp.w_down.shape
    with torch.no_grad():
        w_gate = mlp.w_in[:, :S].reshape(E * S, d)  # [F, d]
        w_up = mlp.w_in[:, S:].reshape(E * S, d)  # [F, d]
        w_down = mlp.w_down.reshape(E * S, d)  # [F, d] (down_proj transposed)
        if permutation is not None:
            inv = torch.argsort(permutation.to(w_gate.device))
            w_gate, w_up, w_down = w_gate[inv], w_up[inv], w_down[inv]
        dense = LlamaMLP(d, E * S).to(device=w_gate.device, dtype=w_gate.dtype)
        dense.gate_proj.weight.copy_(w_gate)
        dense.up_proj.weight.copy_(w_up)
        dense.down_proj.weight.copy_(w_down.t())
    return dense


def to_dense(model: Llama, permutations: Sequence[Tensor] | None = None) -> list[LlamaMLP]:
    """Swap every :class:`PrunePathMLP` of ``model`` back for a dense :class:`LlamaMLP` (in place)."""
    perms = _per_layer(permutations, len(model.layers), "to_dense: permutations")

    def convert(i: int, ffn: nn.Module) -> nn.Module:
        return prunepath_to_dense(ffn, perms[i]) if isinstance(ffn, PrunePathMLP) else ffn

    return model.convert_ffns(convert)


def set_tau(modules: Llama | Sequence[nn.Module], tau: float) -> None:
    """Set ``tau`` on every :class:`PrunePathMLP` of a model (or of a list of modules).

    Each module's tau buffer is filled in place, so a decode step captured in a CUDA graph
    (:class:`~prunepath_ops.models.decode.GraphedDecoder`) uses the new value at its next replay.
    """
    mods = modules.modules() if isinstance(modules, nn.Module) else modules
    for m in mods:
        if isinstance(m, PrunePathMLP):
            m.tau = float(tau)
