"""Reference decoder models whose FFNs are :class:`~prunepath_ops.PrunePathMLP` modules.

- :mod:`.llama`: a gpt-fast style Llama (RMSNorm, RoPE, GQA, static KV cache, gated FFN);
  with dense FFNs it is the dense oracle.
- :mod:`.decode`: :class:`GraphedDecoder`, the decode step captured in a CUDA graph.
- :mod:`.generate`: greedy and sampled generation through the KV cache (eager or CUDA-graphed).
- :mod:`.loading`: weights from Hugging Face and GGUF files; the embedded SmolLM2 default.
- :mod:`.hf_patch`: swap the FFNs of a loaded ``transformers`` Llama in place.

``transformers`` and ``gguf`` are optional: only the loading and patching functions import them.
"""

from __future__ import annotations

from prunepath_ops.models.decode import GraphedDecoder
from prunepath_ops.models.generate import generate, sample
from prunepath_ops.models.hf_patch import patch_hf_llama, patch_hf_llama_from_checkpoint, unpatch_hf_llama
from prunepath_ops.models.llama import (
    Llama,
    LlamaConfig,
    LlamaMLP,
    prunepath_to_dense,
    set_tau,
    to_dense,
    to_prunepath,
)
from prunepath_ops.models.loading import (
    config_from_hf,
    config_to_hf,
    default_model_path,
    from_gguf,
    from_hf,
    from_hf_state_dict,
    load_tokenizer,
)

__all__ = [
    "GraphedDecoder",
    "Llama",
    "LlamaConfig",
    "LlamaMLP",
    "config_from_hf",
    "config_to_hf",
    "default_model_path",
    "from_gguf",
    "from_hf",
    "from_hf_state_dict",
    "generate",
    "load_tokenizer",
    "patch_hf_llama",
    "patch_hf_llama_from_checkpoint",
    "prunepath_to_dense",
    "sample",
    "set_tau",
    "to_dense",
    "to_prunepath",
    "unpatch_hf_llama",
]
