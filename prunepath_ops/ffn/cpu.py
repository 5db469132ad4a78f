"""Sparse routed FFN as a PyTorch composite for the CPU (``backend="torch"``): only the selected experts' weights are read.

The default CPU backend is the C++ kernel ``torch.ops.prunepath.expert_ffn``
(csrc/include/prunepath/expert_ffn_cpu.h); this composite stays as a second,
independent implementation and a benchmark baseline.

Legend: T tokens, E experts, S expert width, d hidden, K slots per token, P selected (token, slot) pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_nn
from torch import Tensor

from prunepath_ops.reference.sparse_ffn import activation

# Below this many pairs the first layer gathers the selected experts' weights and runs one
# batched GEMV; above it, one GEMM per expert over the tokens that chose it reuses each
# weight block across tokens.
_GATHER_MAX_PAIRS = 64


def _first_layer_by_expert(x: Tensor, tok: Tensor, exp: Tensor, w_in: Tensor, b_in: Tensor | None) -> Tensor:
    """``[P, rows]`` pre-activations, one GEMM per expert that some pair selected."""
    out = torch.empty(tok.shape[0], w_in.shape[1], dtype=torch.float32)
    order = torch.sort(exp, stable=True).indices  # pairs grouped by expert
    experts, counts = torch.unique_consecutive(exp[order], return_counts=True)
    start = 0
    for e, c in zip(experts.tolist(), counts.tolist(), strict=True):
        rows = order[start : start + c]
        z = x.index_select(0, tok[rows]) @ w_in[e].t()  # [c, rows]
        if b_in is not None:
            z = z + b_in[e]
        out[rows] = z.float()
        start += c
    return out


def sparse_ffn_torch(
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
) -> Tensor:
    """Routed FFN on packed weights, reading only the selected experts (host-synchronising).

    Same contract as :func:`prunepath_ops.reference.sparse_ffn`. The first layer
    is a gathered batched GEMV (few pairs) or one GEMM per selected expert (many);
    the second layer is an ``embedding_bag`` over the selected down-projection rows
    weighted by ``gate * h``, which sums each token's experts in slot order.

    Returns
    -------
    Tensor
        ``[T, d]`` in the dtype of ``x``.
    """
    T, d = x.shape
    K = expert_ids.shape[1]
    E, S, _ = w_down.shape
    valid = torch.arange(K)[None, :] < num_active.long().clamp(0, K)[:, None]  # [T, K]
    tok, slot = torch.nonzero(valid, as_tuple=True)  # [P] in token-major, slot order
    if tok.numel() == 0:
        y = torch.zeros(T, d, dtype=x.dtype)
        return y + b_out if b_out is not None else y
    exp = expert_ids[tok, slot].long()  # [P]
    if bool(((exp < 0) | (exp >= E)).any()):
        raise ValueError(f"sparse_ffn: an active slot holds an expert id outside [0, {E})")
    if tok.numel() <= _GATHER_MAX_PAIRS:
        w = w_in.index_select(0, exp)  # [P, rows, d]
        z = torch.bmm(w, x.index_select(0, tok).unsqueeze(-1)).squeeze(-1).float()  # [P, rows]
        if b_in is not None:
            z = z + b_in.index_select(0, exp).float()
    else:
        z = _first_layer_by_expert(x, tok, exp, w_in, b_in)
    h = activation(z[:, :S], act) * z[:, S:] if gated else activation(z, act)  # [P, S]
    h = h * gates[tok, slot].float()[:, None]
    neurons = (exp[:, None] * S + torch.arange(S)).flatten()  # [P * S] rows of w_down viewed [F, d]
    offsets = torch.zeros(T, dtype=torch.long)
    offsets[1:] = torch.cumsum(valid.sum(dim=1) * S, 0)[:-1]
    y = F_nn.embedding_bag(
        neurons, w_down.view(E * S, d), offsets, mode="sum", per_sample_weights=h.flatten().to(w_down.dtype)
    )  # [T, d]
    if b_out is not None:
        y = y + b_out
    return y.to(x.dtype)
