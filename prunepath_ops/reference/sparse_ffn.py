"""Routed expert FFN, SPEC.md sections 1 and 3, in readable PyTorch.

Three oracles and two baselines live here:

- :func:`dense_ffn`: the plain dense FFN from ``nn.Linear``-layout weights;
- :func:`masked_dense_ffn`: the dense FFN with a neuron mask (neurons of
  unselected experts zeroed, selected neurons scaled by their expert's gate);
- :func:`sparse_ffn`: a loop over experts on packed weights, reading only the
  selected experts (the executable specification of the kernels);
- :func:`index_select_ffn`: what a user would write without this library
  (gather the selected experts' rows, then matmuls), a benchmark baseline;
- :func:`align_experts`: the token-to-expert alignment of the grouped GEMM.

Legend for shape comments: T tokens, E experts, S expert width (neurons per
expert), d hidden, F FFN width (E * S), K slots per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_nn
from torch import Tensor

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def activation(z: Tensor, name: str) -> Tensor:
    """The FFN nonlinearity by name: ``silu``, ``gelu`` (exact), ``gelu_tanh`` or ``relu``."""
    if name == "silu":
        return F_nn.silu(z)
    if name == "gelu":
        return F_nn.gelu(z)
    if name == "gelu_tanh":
        return F_nn.gelu(z, approximate="tanh")
    if name == "relu":
        return F_nn.relu(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}; got {name!r}")


def dense_ffn(
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    *,
    w_up: Tensor | None = None,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
    act: str = "silu",
) -> Tensor:
    """The dense FFN in ``nn.Linear`` layout (three ``F.linear`` for a gated FFN).

    Parameters
    ----------
    x : Tensor
        ``[T, d]``.
    w_in : Tensor
        ``[F, d]``: the gate projection ``Wg`` of a gated FFN, ``Wi`` of a plain one.
    w_out : Tensor
        ``[d, F]``: ``Wd`` or ``Wo``.
    w_up : Tensor, optional
        ``[F, d]`` up projection ``Wu``; given for a gated FFN only.
    b_in, b_out : Tensor, optional
        ``[F]`` and ``[d]`` biases (plain FFN).
    act : str
        One of :data:`ACTIVATIONS`.

    Returns
    -------
    Tensor
        ``[T, d]`` in the dtype of ``x``.
    """
    h = activation(F_nn.linear(x, w_in, b_in), act)  # [T, F]
    if w_up is not None:
        h = h * F_nn.linear(x, w_up)
    return F_nn.linear(h, w_out, b_out)


def neuron_mask(expert_ids: Tensor, gates: Tensor, num_active: Tensor, num_experts: int, expert_width: int) -> Tensor:
    """Per-neuron scale of a routing: a selected expert's gate on its S neurons, 0 elsewhere.

    Only slots ``j < num_active[t]`` are read; ids and gates beyond are ignored.

    Returns
    -------
    Tensor
        ``[T, F]`` float32 with ``F = num_experts * expert_width``.
    """
    T, K = expert_ids.shape
    valid = torch.arange(K, device=expert_ids.device)[None, :] < num_active[:, None].long()  # [T, K]
    idx = torch.where(valid, expert_ids.long(), torch.full_like(expert_ids, num_experts, dtype=torch.long))
    per_expert = torch.zeros(T, num_experts + 1, dtype=torch.float32, device=expert_ids.device)  # [T, E+1]
    # Valid slots of one token hold distinct experts, so the scatter writes each cell at most once.
    per_expert.scatter_(1, idx, torch.where(valid, gates.float(), torch.zeros_like(gates, dtype=torch.float32)))
    return per_expert[:, :num_experts].repeat_interleave(expert_width, dim=1)  # [T, F]


def masked_dense_ffn(
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    num_active: Tensor,
    expert_width: int,
    *,
    w_up: Tensor | None = None,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
    act: str = "silu",
) -> Tensor:
    """Dense FFN whose intermediate activations are multiplied by :func:`neuron_mask`.

    Same weights and arguments as :func:`dense_ffn` (permuted so expert ``e``
    owns neurons ``[e*S, (e+1)*S)``) plus a routing. Computes every neuron, so
    it is an oracle, never a fast path.

    Returns
    -------
    Tensor
        ``[T, d]`` in the dtype of ``x``.
    """
    E = w_in.shape[0] // expert_width
    h = activation(F_nn.linear(x, w_in, b_in), act)  # [T, F]
    if w_up is not None:
        h = h * F_nn.linear(x, w_up)
    mask = neuron_mask(expert_ids, gates, num_active, E, expert_width)  # [T, F]
    return F_nn.linear((h.float() * mask).to(x.dtype), w_out, b_out)


def expert_forward(x: Tensor, w_in_e: Tensor, w_down_e: Tensor, b_in_e: Tensor | None, gated: bool, act: str) -> Tensor:
    """One expert on packed weights: ``[n, d] -> [n, d]`` in fp32.

    ``w_in_e`` is ``[2S, d]`` (gate rows, then up rows) when ``gated``, else ``[S, d]``;
    ``w_down_e`` is ``[S, d]`` (the down projection transposed).
    """
    xf = x.float()
    if gated:
        S = w_down_e.shape[0]
        gu = xf @ w_in_e.float().t()  # [n, 2S]
        h = activation(gu[:, :S], act) * gu[:, S:]  # [n, S]
    else:
        z = xf @ w_in_e.float().t()  # [n, S]
        if b_in_e is not None:
            z = z + b_in_e.float()
        h = activation(z, act)
    return h @ w_down_e.float()  # [n, d]


def sparse_ffn(
    x: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    num_active: Tensor,
    w_in: Tensor,
    w_down: Tensor,
    *,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
    gated: bool = True,
    act: str = "silu",
) -> Tensor:
    """Reference routed FFN on packed weights: a loop over the selected experts.

    ``y[t] = sum_{j < num_active[t]} gates[t, j] * FFN_{expert_ids[t, j]}(x[t]) (+ b_out)``,
    accumulated in fp32 in slot order, rounded once to the dtype of ``x``.

    Parameters
    ----------
    x : Tensor
        ``[T, d]``.
    expert_ids, gates, num_active : Tensor
        ``[T, K]`` int, ``[T, K]`` float, ``[T]`` int, as :func:`prunepath_ops.topp_route`
        returns them. Slots ``j >= num_active[t]`` are never read.
    w_in : Tensor
        ``[E, 2S, d]`` (gated: gate rows then up rows) or ``[E, S, d]`` (plain).
    w_down : Tensor
        ``[E, S, d]``: expert ``e``'s slice of the down projection, transposed.
    b_in : Tensor, optional
        ``[E, S]`` first-layer bias (plain FFN).
    b_out : Tensor, optional
        ``[d]``, added once per token.
    gated : bool
        Gated (``act(x Wg^T) * (x Wu^T)``) or plain (``act(x Wi^T + bi)``) FFN.
    act : str
        One of :data:`ACTIVATIONS`.

    Returns
    -------
    Tensor
        ``[T, d]`` in the dtype of ``x``.

    Examples
    --------
    >>> E, S, d = 4, 2, 3
    >>> x = torch.randn(1, d)
    >>> w_in, w_down = torch.randn(E, 2 * S, d), torch.randn(E, S, d)
    >>> ids, g, n = torch.tensor([[2, 0, -1, -1]]), torch.tensor([[0.5, 1.0, 0, 0]]), torch.tensor([2])
    >>> sparse_ffn(x, ids, g, n, w_in, w_down).shape
    torch.Size([1, 3])
    """
    T, d = x.shape
    y = torch.zeros(T, d, dtype=torch.float32, device=x.device)  # [T, d]
    K = expert_ids.shape[1]
    n = num_active.long().clamp(0, K)
    for t in range(T):
        for j in range(int(n[t])):
            e = int(expert_ids[t, j])
            b = None if b_in is None else b_in[e]
            y[t] += float(gates[t, j]) * expert_forward(x[t : t + 1], w_in[e], w_down[e], b, gated, act)[0]
    if b_out is not None:
        y += b_out.float()
    return y.to(x.dtype)


def index_select_ffn(
    x: Tensor, expert_ids: Tensor, gates: Tensor, num_active: Tensor, w_in: Tensor, w_down: Tensor, *, act: str = "silu"
) -> Tensor:
    """Batch-1 gated baseline a user would write: ``index_select`` the selected experts, then matmuls.

    Host-synchronises on ``num_active``; gated FFN, one token.

    Returns
    -------
    Tensor
        ``[1, d]`` in the dtype of ``x``.
    """
    n = int(num_active[0])
    ids = expert_ids[0, :n].long()  # [n]
    S = w_down.shape[1]
    wgu = w_in.index_select(0, ids)  # [n, 2S, d]
    wd = w_down.index_select(0, ids)  # [n, S, d]
    gu = torch.matmul(wgu.reshape(n * 2 * S, -1), x[0])  # [n * 2S]
    gu = gu.view(n, 2, S)
    h = activation(gu[:, 0], act) * gu[:, 1] * gates[0, :n, None].to(x.dtype)  # [n, S]
    return (h.reshape(1, n * S) @ wd.reshape(n * S, -1)).to(x.dtype)


def align_bounds(num_pairs: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """Static sizes ``(P_max, B_max)`` of :func:`align_experts`' padded outputs.

    Each non-empty expert wastes at most ``block_m - 1`` padding rows, and at most
    ``min(E, T*K)`` experts are non-empty, so
    ``B_max = floor((T*K + min(E, T*K) * (block_m - 1)) / block_m)`` blocks and
    ``P_max = B_max * block_m`` rows always suffice.
    """
    blocks = (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m
    return blocks * block_m, blocks


def align_experts(
    expert_ids: Tensor, num_active: Tensor, num_experts: int, block_m: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Group the (token, slot) pairs by expert, each expert's group padded to ``block_m`` rows.

    Same contract as ``torch.ops.prunepath.align_experts``.

    Parameters
    ----------
    expert_ids : Tensor
        ``[T, K]`` int32; only slots ``j < num_active[t]`` are read.
    num_active : Tensor
        ``[T]`` int32, clamped to ``[0, K]``.
    num_experts : int
        E; active slots must hold ids in ``[0, E)``.
    block_m : int
        Rows per block of the grouped GEMM.

    Returns
    -------
    sorted_pairs : Tensor
        ``[P_max]`` int32 flat slot indices ``t * K + j``, grouped by expert in
        increasing expert order, in token order within an expert, -1 in padding.
    block_expert : Tensor
        ``[B_max]`` int32 expert of each ``block_m``-row block, -1 past the last.
    expert_offsets : Tensor
        ``[E + 1]`` int32 padded start row of each expert; ``expert_offsets[E]``
        is the number of rows used.
    expert_counts : Tensor
        ``[E]`` int32 pairs per expert.
    """
    T, K = expert_ids.shape
    E = num_experts
    dev = expert_ids.device
    P_max, B_max = align_bounds(T * K, E, block_m)
    valid = torch.arange(K, device=dev)[None, :] < num_active.long().clamp(0, K)[:, None]  # [T, K]
    key = torch.where(valid, expert_ids.long(), torch.full_like(expert_ids, E, dtype=torch.long)).flatten()  # [T*K]
    counts = torch.zeros(E + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))[:E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    offsets = torch.zeros(E + 1, dtype=torch.long, device=dev)
    offsets[1:] = torch.cumsum(padded, 0)
    # A stable sort by expert keeps the flat (token-major) order within an expert.
    order = torch.sort(key, stable=True).indices  # [T*K]
    sorted_key = key[order]
    seg_start = torch.zeros(E + 1, dtype=torch.long, device=dev)
    seg_start[1 : E + 1] = torch.cumsum(counts, 0)
    rank = torch.arange(T * K, device=dev) - seg_start[sorted_key]
    dest = torch.where(sorted_key < E, offsets[sorted_key.clamp(max=E - 1)] + rank, torch.full_like(rank, P_max))
    sorted_pairs = torch.full((P_max + 1,), -1, dtype=torch.int32, device=dev)
    sorted_pairs.scatter_(0, dest, order.int())
    block_of_expert = torch.arange(B_max, device=dev) * block_m  # start row of each block
    block_expert = torch.searchsorted(offsets[1:], block_of_expert, right=True)  # [B_max]
    block_expert = torch.where(block_of_expert < offsets[E], block_expert, torch.full_like(block_expert, -1)).int()
    return sorted_pairs[:P_max], block_expert, offsets.int(), counts.int()
