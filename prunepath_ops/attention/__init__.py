"""Decode attention over a KV cache (issue 4): split-KV Triton kernels, a vectorised CPU composite, the op."""

from prunepath_ops.attention.api import kv_decode_attention

__all__ = ["kv_decode_attention"]
