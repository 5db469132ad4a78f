"""Routed expert FFN (issue 3): packing, token-to-expert alignment, CPU and Triton kernels."""

from prunepath_ops.ffn.align import Alignment, align_experts
from prunepath_ops.ffn.api import sparse_ffn
from prunepath_ops.ffn.packing import EXPERT_WIDTHS, PackedExperts, pack_experts

__all__ = ["EXPERT_WIDTHS", "Alignment", "PackedExperts", "align_experts", "pack_experts", "sparse_ffn"]
