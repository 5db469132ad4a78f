"""Constants and environment queries shared by the dispatcher and the Triton launchers (no triton import)."""

from __future__ import annotations

import os

#: Largest batch the decode kernels take (``path="auto"`` switches to prefill above it).
DECODE_MAX_TOKENS = 16


def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
