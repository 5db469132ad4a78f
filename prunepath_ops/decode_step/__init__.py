"""The decode step's elementwise work in few launches: residual add + RMSNorm, RoPE of fused q/k/v."""

from prunepath_ops.decode_step.api import add_rms_norm, rope_qkv

__all__ = ["add_rms_norm", "rope_qkv"]
