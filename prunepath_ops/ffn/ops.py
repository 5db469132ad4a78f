"""Registration of ``torch.ops.prunepath.sparse_ffn``: argument checks, backend choice, fake kernel.

One op boundary per call (the whole routed FFN), so ``torch.compile(fullgraph=True)``
sees a single opaque node whose output shape the fake kernel gives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunepath_ops import _pdl
from prunepath_ops._library import define_op
from prunepath_ops._registration import check_expert_ffn_args
from prunepath_ops.ffn._env import DECODE_MAX_TOKENS
from prunepath_ops.ffn._env import interpreting as _interpreting
from prunepath_ops.ffn.cpu import sparse_ffn_torch
from prunepath_ops.reference.sparse_ffn import sparse_ffn as sparse_ffn_reference

PATHS = ("auto", "decode", "prefill")
BACKENDS = ("auto", "cuda", "triton", "cpu", "torch", "reference")

# The CUDA kernel of prunepath::expert_ffn (compiled in CUDA builds only).
CUDA_KERNEL_BUILT = torch._C._dispatch_has_kernel_for_dispatch_key("prunepath::expert_ffn", "CUDA")


def check_sparse_ffn_args(
    x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out, gated, act, path, backend
) -> None:
    """Raise on inconsistent shapes, dtypes or devices (shared by the real and the fake kernel)."""
    check_expert_ffn_args(x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out, gated, act, op="sparse_ffn")
    check_path_backend(path, backend, x.shape[0])


def check_path_backend(path: str, backend: str, num_tokens: int) -> None:
    """Raise on an unknown ``path`` or ``backend``, or ``path='decode'`` above its token limit."""
    if path not in PATHS:
        raise ValueError(f"sparse_ffn: path must be one of {PATHS}; got {path!r}")
    if backend not in BACKENDS:
        raise ValueError(f"sparse_ffn: backend must be one of {BACKENDS}; got {backend!r}")
    if path == "decode" and num_tokens > DECODE_MAX_TOKENS:
        raise ValueError(f"sparse_ffn: path='decode' handles T <= {DECODE_MAX_TOKENS} tokens; got {num_tokens}")


def resolve_backend(backend: str, device: torch.device, num_tokens: int, path: str) -> str:
    """``auto``: on CUDA the CUDA kernel of ``prunepath::expert_ffn`` for one token on the decode
    path (when the extension has it), Triton otherwise; the C++ kernel of ``prunepath::expert_ffn``
    on the CPU.

    ``cuda`` is the CUDA kernel of ``prunepath::expert_ffn``: each token's selected neurons split
    evenly over the SMs, so for one token it beats the Triton decode kernels at low fractions and
    ties with them above (Llama-3-8B shape, bf16, steady state, session 12: 17.1 / 33.3 / 49.2 /
    91.6 us against Triton's 24.7 / 34.0 / 48.7 / 91.6 at 10 / 30 / 50 / 100 % of the experts,
    bench/results/sparse_ffn_cuda_llama3_8b.md); for a batch every token reads its own experts, so
    ``auto`` keeps Triton from two tokens on. ``triton`` on the CPU needs ``TRITON_INTERPRET=1``
    (the tests use it there); ``torch`` (the sparse PyTorch composite) and ``reference`` run anywhere.
    """
    if backend == "auto":
        if device.type != "cuda":
            return "cpu"
        one_token_decode = num_tokens == 1 and resolve_path(path, num_tokens) == "decode"
        return "cuda" if one_token_decode and CUDA_KERNEL_BUILT else "triton"
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise RuntimeError("sparse_ffn: backend='triton' on the CPU needs TRITON_INTERPRET=1")
    if backend == "cuda" and (device.type != "cuda" or not CUDA_KERNEL_BUILT):
        raise RuntimeError(
            f"sparse_ffn: backend='cuda' needs CUDA tensors and a CUDA build of prunepath_ops; got {device}, "
            f"CUDA kernel built: {CUDA_KERNEL_BUILT}"
        )
    if backend in ("cpu", "torch") and device.type != "cpu":
        raise ValueError(f"sparse_ffn: backend={backend!r} needs CPU tensors; got {device}")
    return backend


def resolve_path(path: str, num_tokens: int) -> str:
    """``auto``: the decode kernels up to ``DECODE_MAX_TOKENS`` tokens, the prefill kernels above."""
    if path == "auto":
        return "decode" if num_tokens <= DECODE_MAX_TOKENS else "prefill"
    return path


def sparse_ffn_op(
    x: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    num_active: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_down: Tensor,
    b_out: Tensor | None,
    gated: bool,
    act: str,
    path: str,
    backend: str,
) -> Tensor:
    """Routed expert FFN; see :func:`prunepath_ops.sparse_ffn`."""
    args = (x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out, gated, act)
    check_sparse_ffn_args(*args, path, backend)
    x, expert_ids, gates, num_active = (t.contiguous() for t in (x, expert_ids, gates, num_active))
    w_in, w_down = w_in.contiguous(), w_down.contiguous()
    args = (x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out, gated, act)
    chosen = resolve_backend(backend, x.device, x.shape[0], path)
    if chosen == "reference":
        return sparse_ffn_reference(
            x, expert_ids, gates, num_active, w_in, w_down, b_in=b_in, b_out=b_out, gated=gated, act=act
        )
    if chosen == "cpu":
        return torch.ops.prunepath.expert_ffn(*args)
    if chosen == "cuda":
        return torch.ops.prunepath.expert_ffn(*args, _pdl.use_pdl(x.device))
    if chosen == "torch":
        return sparse_ffn_torch(*args)
    from prunepath_ops.ffn.triton_ffn import sparse_ffn_decode_triton, sparse_ffn_prefill_triton

    if resolve_path(path, x.shape[0]) == "decode":
        return sparse_ffn_decode_triton(*args)
    return sparse_ffn_prefill_triton(*args)


def _sparse_ffn_fake(x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out, gated, act, path, backend):
    check_sparse_ffn_args(x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out, gated, act, path, backend)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


define_op(
    "sparse_ffn(Tensor x, Tensor expert_ids, Tensor gates, Tensor num_active, Tensor w_in, Tensor? b_in, "
    "Tensor w_down, Tensor? b_out, bool gated, str act, str path, str backend) -> Tensor",
    sparse_ffn_op,
    _sparse_ffn_fake,
)
