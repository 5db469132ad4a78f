"""Test-session hooks.

``PRUNEPATH_RECORD_TRITON=FILE`` (set by ``.ci/run``): every distinct Triton kernel launch the tests
make in the interpreter is written to FILE, which ``bench/diag/triton_sm90_compile.py`` then
compiles for sm_90 (the interpreter would accept kernels the GPU compiler rejects).
"""

from __future__ import annotations

import os
import sys

_record = os.environ.get("PRUNEPATH_RECORD_TRITON")
if _record and os.environ.get("TRITON_INTERPRET") == "1":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "diag"))
    from triton_sm90_compile import record

    record(_record)
