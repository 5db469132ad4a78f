"""Public routing API: :func:`topp_route`."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from prunepath_ops import _pdl
from prunepath_ops._registration import (
    check_linear_topp_route_args,
    check_norm_linear_topp_route_args,
    check_topp_route_args,
)


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
    inputs give the same bits on every run, and on CUDA whatever the batch
    (every CUDA kernel computes the same bits). The CUDA kernels take ``exp``
    and the sigmoid from the GPU's fast ``exp2`` and reciprocal units:
    probabilities and gates are within a few ulp of the CPU kernel's (gates
    within 1e-6), so the two can select differently only where a cumulative
    sum lies within about 1e-6 of ``tau``.

    Examples
    --------
    >>> import torch, prunepath_ops
    >>> logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    >>> route = prunepath_ops.topp_route(logits, 0.9, gate="prob")
    >>> route.expert_ids.tolist(), route.num_active.tolist()
    ([[0, 1, -1, -1]], [2])
    """
    tau_scalar, tau_tensor = _split_tau(tau, "topp_route")
    # The C++ glue checks the same things; checking here first gives the same
    # messages on every backend and under torch.compile.
    check_topp_route_args(logits, tau_tensor, min_experts, max_experts, gate)
    expert_ids, gates, num_active = torch.ops.prunepath.topp_route(
        logits, tau_scalar, tau_tensor, min_experts, max_experts, gate
    )
    return Route(expert_ids, gates, num_active)


def _split_tau(tau: float | Tensor, op: str) -> tuple[float, Tensor | None]:
    if isinstance(tau, Tensor):
        return 0.0, tau
    if isinstance(tau, (int, float)):
        if tau != tau:  # NaN (math.isnan breaks torch.compile graphs)
            raise ValueError(f"{op}: tau must be a number; got NaN")
        return float(tau), None
    raise TypeError(f"{op}: tau must be a float or a float32 tensor; got {type(tau).__name__}")


def linear_topp_route(
    x: Tensor,
    weight: Tensor,
    tau: float | Tensor,
    *,
    min_experts: int = 1,
    max_experts: int | None = None,
    gate: str = "sigmoid",
    tickets: Tensor | None = None,
    pdl: bool | None = None,
) -> tuple[Tensor, Route]:
    """Router projection and top-p routing in one call: ``topp_route(F.linear(x, weight), tau)``.

    Made for decoding (a few tokens per call), where the router's cost is launch latency, not
    bytes: on CUDA one kernel computes the logits (each block a few rows of ``weight``) and the
    block that completes a token's row routes it with :func:`topp_route`'s rank kernel, so
    the routing is bit-identical to :func:`topp_route` on the returned logits. On the CPU it
    is that composition. The grid has one set of row blocks per token, so it pays at one token per
    call (H200, Llama-3-8B router: 7.0 us against 11.7 for the composition) and loses from about four
    (14.5 against 12.0 us; ``bench/results/router_decode_cuda.md``): use ``F.linear`` and
    :func:`topp_route` there.

    Parameters
    ----------
    x : Tensor
        ``[T, d]`` hidden states, float32, float16 or bfloat16, unit inner stride.
    weight : Tensor
        ``[E, d]`` contiguous router weight in the dtype of ``x`` (``nn.Linear(d, E).weight``);
        the CUDA kernel takes ``E <= 1024``.
    tau, min_experts, max_experts, gate
        As for :func:`topp_route`.
    tickets : Tensor, optional
        CUDA scratch: an int32 vector of at least T zeros, one arrival counter per token, which
        the kernel leaves at zero. Keep one per caller (a module buffer) to save a memset per
        call; two calls must not share one concurrently (different streams). Default: zeros
        allocated per call.
    pdl : bool, optional
        Programmatic dependent launch on CUDA (sm_90+): the weight loads start while the
        previous kernel finishes. Default :func:`prunepath_ops._pdl.use_pdl`.

    Returns
    -------
    logits : Tensor
        ``[T, E]`` in the dtype of ``x``: fp32 dot products rounded once, like ``F.linear``'s
        output (the summation order differs from cuBLAS, so a logit can differ in its last bit).
    route : Route
        ``(expert_ids, gates, num_active)`` as :func:`topp_route` returns for ``logits``.

    Notes
    -----
    Inference only: no gradient flows through this op (train with ``router`` then
    :func:`topp_route`). NaN/inf in ``x`` or ``weight`` give NaN/inf logits, routed as
    :func:`topp_route` documents. Deterministic: a fixed summation order, same bits every run.

    Examples
    --------
    >>> import torch, prunepath_ops
    >>> x, w = torch.randn(2, 16), torch.randn(6, 16)
    >>> logits, route = prunepath_ops.linear_topp_route(x, w, 0.7)
    >>> torch.equal(route.expert_ids, prunepath_ops.topp_route(x @ w.T, 0.7).expert_ids)
    True
    """
    tau_scalar, tau_tensor = _split_tau(tau, "linear_topp_route")
    check_linear_topp_route_args(x, weight, tau_tensor, min_experts, max_experts, gate, tickets)
    use_pdl = _pdl.resolve(pdl, x.device)  # False off CUDA
    logits, expert_ids, gates, num_active = torch.ops.prunepath.linear_topp_route(
        x, weight, tau_scalar, tau_tensor, min_experts, max_experts, gate, tickets, use_pdl
    )
    return logits, Route(expert_ids, gates, num_active)


def norm_linear_topp_route(
    x: Tensor,
    residual: Tensor | None,
    norm_weight: Tensor,
    weight: Tensor,
    tau: float | Tensor,
    *,
    eps: float = 1e-5,
    min_experts: int = 1,
    max_experts: int | None = None,
    gate: str = "sigmoid",
    tickets: Tensor | None = None,
    pdl: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Route]:
    """The decode step's residual add and RMSNorm in front of :func:`linear_topp_route`, in one call.

    ``h = x + residual``, ``y = norm_weight * rms_norm(h)`` with the numerics of
    :func:`prunepath_ops.decode_step.add_rms_norm`, then ``linear_topp_route(y, weight, tau)``. On
    CUDA one kernel: every router block recomputes the row's mean square (16 KB of L2 reads at
    d = 4096) while its router rows stream, and the token's first block writes ``h`` and ``y`` for
    the kernels after it; a decode layer launches one kernel less than with ``add_rms_norm``. On the
    CPU it is that composition.

    Parameters
    ----------
    x : Tensor
        ``[T, d]`` contiguous, float32, float16 or bfloat16 (the residual stream).
    residual : Tensor or None
        ``[T, d]`` contiguous, dtype and device of ``x`` (the sublayer output to add); None: ``h = x``.
    norm_weight : Tensor
        ``[d]`` contiguous RMSNorm weight in the dtype of ``x``.
    weight : Tensor
        ``[E, d]`` router weight, as for :func:`linear_topp_route`.
    tau, min_experts, max_experts, gate, tickets, pdl
        As for :func:`linear_topp_route`.
    eps : float
        Added to the mean square (finite, non-negative).

    Returns
    -------
    y : Tensor
        ``[T, d]``: the normalised input the router saw (feed it to the FFN). On CUDA it may differ
        from :func:`~prunepath_ops.decode_step.add_rms_norm`'s in the last bit (another summation
        order of the mean square); logits and routing are those of this ``y``.
    h : Tensor
        ``[T, d]``: ``x + residual`` (a new tensor), the residual stream after the add.
    logits : Tensor
        ``[T, E]`` router logits of ``y``, as :func:`linear_topp_route` returns them.
    route : Route
        ``(expert_ids, gates, num_active)`` for ``logits``.

    Notes
    -----
    Inference only (no gradient). NaN/inf propagate as in :func:`~prunepath_ops.decode_step.add_rms_norm`
    (a NaN in a row of ``h`` makes that row of ``y`` NaN) and then as :func:`topp_route` documents.
    Deterministic: fixed summation orders, the same bits every run.

    Examples
    --------
    >>> import torch, prunepath_ops
    >>> from prunepath_ops.decode_step import add_rms_norm
    >>> x, r, nw, w = torch.randn(2, 16), torch.randn(2, 16), torch.ones(16), torch.randn(6, 16)
    >>> y, h, logits, route = prunepath_ops.norm_linear_topp_route(x, r, nw, w, 0.7)
    >>> y_ref, h_ref = add_rms_norm(x, r, nw)
    >>> torch.equal(y, y_ref), torch.equal(route.expert_ids, prunepath_ops.linear_topp_route(y_ref, w, 0.7)[1].expert_ids)
    (True, True)
    """
    tau_scalar, tau_tensor = _split_tau(tau, "norm_linear_topp_route")
    eps = float(eps)
    check_norm_linear_topp_route_args(
        x, residual, norm_weight, eps, weight, tau_tensor, min_experts, max_experts, gate, tickets
    )
    use_pdl = _pdl.resolve(pdl, x.device)  # False off CUDA
    y, h, logits, expert_ids, gates, num_active = torch.ops.prunepath.norm_linear_topp_route(
        x, residual, norm_weight, eps, weight, tau_scalar, tau_tensor, min_experts, max_experts, gate, tickets, use_pdl
    )
    return y, h, logits, Route(expert_ids, gates, num_active)
