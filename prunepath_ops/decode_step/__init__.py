"""The decode step in few launches: residual add + RMSNorm, RoPE of fused q/k/v, the projections' GEMV."""

from prunepath_ops.decode_step.api import add_rms_norm, decode_linear, rope_qkv

__all__ = ["add_rms_norm", "decode_linear", "rope_qkv"]
