"""Public routing API: :func:`topp_route`."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from prunepath_ops._registration import check_topp_route_args


class Route(NamedTuple):
    """A routing decision for T tokens over E experts, padded to K slots.

    Attributes
    ----------
    expert_ids : Tensor
        ``[T, K]`` int32 selected experts, largest probability first (ties to the
        lower index), -1 in unused slots.
    gates : Tensor
        ``[T, K]`` float32 gate of each selected expert, 0 in unused slots.
    num_active : Tensor
        ``[T]`` int32 number of selected experts per token.
    """

    expert_ids: Tensor
    gates: Tensor
    num_active: Tensor


def topp_route(
    logits: Tensor,
    tau: float | Tensor,
    *,
    min_experts: int = 1,
    max_experts: int | None = None,
    gate: str = "sigmoid",
) -> Route:
    """Select, per token, the smallest set of experts whose probability mass stays below ``tau``.

    Implements SPEC.md section 3: ``p = softmax(logits)`` in fp32, experts sorted
    by ``p`` (largest first, ties to the lower index), inclusive cumulative sum
    ``c``; a token keeps the prefix with ``c < tau`` (strict), at least
    ``min_experts`` and at most ``max_experts`` of them. ``tau >= 1`` keeps every
    expert, ``tau <= 0`` keeps ``min_experts``.

    Parameters
    ----------
    logits : Tensor
        ``[T, E]`` router logits, float32, float16 or bfloat16, on the CPU or a
        CUDA device; any T >= 0, E >= 1 (the CUDA kernel handles E <= 4096). The
        last dimension must be contiguous, else the tensor is copied once.
    tau : float or Tensor
        The threshold. A float is baked into the call; a float32 tensor of shape
        ``[T]`` gives each token its own budget, and a one-element tensor is
        broadcast (use a tensor to change ``tau`` inside a CUDA graph or a
        compiled function without recompiling). A NaN in a tau tensor keeps
        ``min_experts``; a NaN float is rejected.
    min_experts : int, optional
        Lower bound on the experts kept per token, in ``[0, K]``. Default 1: the
        top expert is always kept.
    max_experts : int or None, optional
        Upper bound, in ``[1, E]``; it also sets the width ``K`` of the outputs
        (default ``E``).
    gate : {"sigmoid", "prob", "renorm", "one"}, optional
        ``sigmoid`` of the raw logit (the paper, default), the softmax
        probability, the probability renormalised over the kept set, or 1.

    Returns
    -------
    Route
        ``(expert_ids [T, K] int32, gates [T, K] float32, num_active [T] int32)``,
        on the device of ``logits``.

    Notes
    -----
    A NaN logit counts as -inf. A row whose logits are all -inf or NaN is
    treated as uniform (each expert has probability 1/E, so experts are taken
    in index order); a row holding +inf splits the mass evenly over its +inf
    entries. ``sigmoid`` gates of -inf (or NaN) logits are 0.

    The op is differentiable: gradients reach ``logits`` through the gates
    (the selection itself is piecewise constant). Deterministic: the same
    inputs give the same bits on every run.

    Examples
    --------
    >>> import torch, prunepath_ops
    >>> logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    >>> route = prunepath_ops.topp_route(logits, 0.9, gate="prob")
    >>> route.expert_ids.tolist(), route.num_active.tolist()
    ([[0, 1, -1, -1]], [2])
    """
    if isinstance(tau, Tensor):
        tau_scalar, tau_tensor = 0.0, tau
    elif isinstance(tau, (int, float)):
        tau_scalar, tau_tensor = float(tau), None
        if tau_scalar != tau_scalar:  # NaN (math.isnan breaks torch.compile graphs)
            raise ValueError("topp_route: tau must be a number; got NaN")
    else:
        raise TypeError(f"topp_route: tau must be a float or a float32 tensor; got {type(tau).__name__}")
    # The C++ glue checks the same things; checking here first gives the same
    # messages on every backend and under torch.compile.
    check_topp_route_args(logits, tau_tensor, min_experts, max_experts, gate)
    expert_ids, gates, num_active = torch.ops.prunepath.topp_route(
        logits, tau_scalar, tau_tensor, min_experts, max_experts, gate
    )
    return Route(expert_ids, gates, num_active)
