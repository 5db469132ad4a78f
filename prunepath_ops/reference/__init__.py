"""Readable pure-PyTorch semantics of every op: the executable specification.

Tests compare the kernels against these functions, benchmarks use them as the
"what a user would write" baseline, and the package falls back to them where no
kernel exists.
"""

from prunepath_ops.reference.routing import (
    GATE_MODES,
    routing_probabilities,
    topp_gates,
    topp_route,
)

__all__ = ["GATE_MODES", "routing_probabilities", "topp_gates", "topp_route"]
