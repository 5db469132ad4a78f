"""Readable pure-PyTorch semantics of every op: the executable specification.

Tests compare the kernels against these functions, benchmarks use them as the
"what a user would write" baseline, and the package falls back to them where no
kernel exists.
"""

from prunepath_ops.reference.attention import kv_decode_attention
from prunepath_ops.reference.decode_step import add_rms_norm, decode_linear, rope_qkv
from prunepath_ops.reference.routing import (
    GATE_MODES,
    linear_topp_route,
    norm_linear_topp_route,
    routing_probabilities,
    topp_gates,
    topp_route,
)
from prunepath_ops.reference.sparse_ffn import (
    ACTIVATIONS,
    align_experts,
    dense_ffn,
    index_select_ffn,
    masked_dense_ffn,
    neuron_mask,
    sparse_ffn,
)

__all__ = [
    "ACTIVATIONS",
    "GATE_MODES",
    "add_rms_norm",
    "align_experts",
    "decode_linear",
    "dense_ffn",
    "index_select_ffn",
    "kv_decode_attention",
    "linear_topp_route",
    "masked_dense_ffn",
    "neuron_mask",
    "norm_linear_topp_route",
    "rope_qkv",
    "routing_probabilities",
    "sparse_ffn",
    "topp_gates",
    "topp_route",
]
