"""Fake (meta) kernels and autograd formulas for the ops defined in C++.

The fake kernels validate shapes exactly like the C++ glue so that
``torch.compile`` rejects bad input at trace time with the same messages.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunepath_ops.reference.routing import GATE_MODES, routing_probabilities, sanitize_logits
from prunepath_ops.reference.sparse_ffn import ACTIVATIONS

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FFN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_MAX_EXPERTS = 4096  # kToppRouteCudaMaxExperts in csrc/include/prunepath/topp_route_common.cuh


def check_topp_route_args(
    logits: Tensor, tau_per_token: Tensor | None, min_experts: int, max_experts: int | None, gate: str
) -> int:
    if logits.dim() != 2:
        raise ValueError(f"topp_route: logits must be 2-D [T, E]; got shape {list(logits.shape)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"topp_route: logits must be float32, float16 or bfloat16; got {logits.dtype}")
    T, E = logits.shape
    return check_routing_args(T, E, logits.device, tau_per_token, min_experts, max_experts, gate)


def check_routing_args(
    T: int,
    E: int,
    device: torch.device,
    tau_per_token: Tensor | None,
    min_experts: int,
    max_experts: int | None,
    gate: str,
) -> int:
    """topp_route's checks of a ``[T, E]`` routing on ``device`` (messages as its C++ glue's); returns K."""
    if E < 1:
        raise ValueError(f"topp_route: logits must have at least one expert column (E >= 1); got shape {[T, E]}")
    if device.type == "cuda" and E > CUDA_MAX_EXPERTS:
        raise ValueError(
            f"topp_route: the CUDA kernel handles E <= {CUDA_MAX_EXPERTS}; got E = {E} (the CPU kernel has no limit)"
        )
    K = E if max_experts is None else max_experts
    if not 1 <= K <= E:
        raise ValueError(f"topp_route: max_experts must lie in [1, E = {E}]; got {K}")
    if not 0 <= min_experts <= K:
        raise ValueError(f"topp_route: min_experts must lie in [0, max_experts or E = {K}]; got {min_experts}")
    if gate not in GATE_MODES:
        raise ValueError(f"topp_route: gate must be one of {GATE_MODES}; got {gate!r}")
    if tau_per_token is not None:
        if tau_per_token.dtype != torch.float32:
            raise TypeError(f"topp_route: a tau tensor must be float32; got {tau_per_token.dtype}")
        if tau_per_token.device != device:
            raise ValueError(f"topp_route: the tau tensor is on {tau_per_token.device} but logits are on {device}")
        broadcast = tau_per_token.numel() == 1 and tau_per_token.dim() <= 1
        if not broadcast and not (tau_per_token.dim() == 1 and tau_per_token.shape[0] == T):
            raise ValueError(
                f"topp_route: a tau tensor must have shape [T] = [{T}] (or hold a single value); got shape {list(tau_per_token.shape)}"
            )
    return K


@torch.library.register_fake("prunepath::topp_route")
def _topp_route_fake(logits, tau, tau_per_token, min_experts, max_experts, gate):
    K = check_topp_route_args(logits, tau_per_token, min_experts, max_experts, gate)
    T = logits.shape[0]
    return (
        logits.new_empty((T, K), dtype=torch.int32),
        logits.new_empty((T, K), dtype=torch.float32),
        logits.new_empty((T,), dtype=torch.int32),
    )


LINEAR_ROUTE_CUDA_MAX_EXPERTS = 1024  # kLinearRouteMaxExperts in csrc/include/prunepath/linear_topp_route.cuh


def check_linear_topp_route_inputs(
    x: Tensor, weight: Tensor, tickets: Tensor | None, op: str = "linear_topp_route"
) -> None:
    """The tensor checks of ``prunepath::linear_topp_route``'s C++ glue (``check_linear_topp_route_inputs``)."""
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [T, d]; got shape {list(x.shape)}")
    if x.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16; got {x.dtype}")
    T, d = x.shape
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"{op}: weight must be [E, d] with d = {d}; got shape {list(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight must have the dtype of x ({x.dtype}); got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{op}: weight is on {weight.device} but x is on {x.device}")
    if d > 0 and T > 1 and x.stride(1) != 1:
        raise ValueError(f"{op}: x must have a unit inner stride; got strides {list(x.stride())}")
    if not weight.is_contiguous():
        raise ValueError(f"{op}: weight must be contiguous; got strides {list(weight.stride())}")
    if tickets is not None:
        if tickets.dtype != torch.int32:
            raise TypeError(f"{op}: tickets must be int32; got {tickets.dtype}")
        if tickets.device != x.device:
            raise ValueError(f"{op}: tickets is on {tickets.device} but x is on {x.device}")
        if tickets.dim() != 1 or tickets.shape[0] < T or not tickets.is_contiguous():
            raise ValueError(
                f"{op}: tickets must be a contiguous int32 vector of at least T = {T} zeros; got shape {list(tickets.shape)}"
            )


def _linear_route_k(
    x: Tensor,
    weight: Tensor,
    tau_per_token: Tensor | None,
    min_experts: int,
    max_experts: int | None,
    gate: str,
    op: str,
) -> int:
    E = weight.shape[0]
    if x.device.type == "cuda" and not 1 <= E <= LINEAR_ROUTE_CUDA_MAX_EXPERTS:
        raise ValueError(
            f"{op}: the CUDA kernel handles 1 <= E <= {LINEAR_ROUTE_CUDA_MAX_EXPERTS}; got E = {E} "
            "(route F.linear's output with topp_route instead)"
        )
    return check_routing_args(x.shape[0], E, x.device, tau_per_token, min_experts, max_experts, gate)


def check_linear_topp_route_args(
    x: Tensor,
    weight: Tensor,
    tau_per_token: Tensor | None,
    min_experts: int,
    max_experts: int | None,
    gate: str,
    tickets: Tensor | None,
) -> int:
    """The checks of ``prunepath::linear_topp_route``'s C++ glue, in the same order and words; returns K."""
    check_linear_topp_route_inputs(x, weight, tickets)
    return _linear_route_k(x, weight, tau_per_token, min_experts, max_experts, gate, "linear_topp_route")


def _linear_route_fake_outputs(x: Tensor, E: int, K: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Empty ``logits [T, E]`` (dtype of x), ``expert_ids [T, K]``, ``gates [T, K]``, ``num_active [T]``."""
    T = x.shape[0]
    return (
        x.new_empty((T, E)),
        x.new_empty((T, K), dtype=torch.int32),
        x.new_empty((T, K), dtype=torch.float32),
        x.new_empty((T,), dtype=torch.int32),
    )


@torch.library.register_fake("prunepath::linear_topp_route")
def _linear_topp_route_fake(x, weight, tau, tau_per_token, min_experts, max_experts, gate, tickets, pdl):
    K = check_linear_topp_route_args(x, weight, tau_per_token, min_experts, max_experts, gate, tickets)
    return _linear_route_fake_outputs(x, weight.shape[0], K)


def check_norm_linear_topp_route_args(
    x: Tensor,
    residual: Tensor | None,
    norm_weight: Tensor,
    eps: float,
    weight: Tensor,
    tau_per_token: Tensor | None,
    min_experts: int,
    max_experts: int | None,
    gate: str,
    tickets: Tensor | None,
) -> int:
    """The checks of ``prunepath::norm_linear_topp_route``'s C++ glue, in the same order and words; returns K."""
    op = "norm_linear_topp_route"
    check_linear_topp_route_inputs(x, weight, tickets)
    if not x.is_contiguous():
        raise ValueError(f"{op}: x must be contiguous; got strides {list(x.stride())}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have the shape of x ({list(x.shape)}); got {list(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{op}: residual must have the dtype of x ({x.dtype}); got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"{op}: residual is on {residual.device} but x is on {x.device}")
        if not residual.is_contiguous():
            raise ValueError(f"{op}: residual must be contiguous; got strides {list(residual.stride())}")
    d = x.shape[1]
    if norm_weight.dim() != 1 or norm_weight.shape[0] != d:
        raise ValueError(f"{op}: norm_weight must be [d] with d = {d}; got shape {list(norm_weight.shape)}")
    if norm_weight.dtype != x.dtype:
        raise TypeError(f"{op}: norm_weight must have the dtype of x ({x.dtype}); got {norm_weight.dtype}")
    if norm_weight.device != x.device:
        raise ValueError(f"{op}: norm_weight is on {norm_weight.device} but x is on {x.device}")
    if not norm_weight.is_contiguous():
        raise ValueError(f"{op}: norm_weight must be contiguous")
    if not (eps >= 0.0 and eps != float("inf")):  # NaN fails the first test
        raise ValueError(f"{op}: eps must be finite and >= 0; got {eps}")
    return _linear_route_k(x, weight, tau_per_token, min_experts, max_experts, gate, op)


@torch.library.register_fake("prunepath::norm_linear_topp_route")
def _norm_linear_topp_route_fake(
    x, residual, norm_weight, eps, weight, tau, tau_per_token, min_experts, max_experts, gate, tickets, pdl
):
    K = check_norm_linear_topp_route_args(
        x, residual, norm_weight, eps, weight, tau_per_token, min_experts, max_experts, gate, tickets
    )
    return (x.new_empty(x.shape), x.new_empty(x.shape), *_linear_route_fake_outputs(x, weight.shape[0], K))  # y, h


def check_decode_gemv_args(x: Tensor, weight: Tensor) -> None:
    """The checks of ``prunepath::decode_gemv``'s C++ glue, in the same order and words."""
    op = "decode_gemv"
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [B, K]; got shape {list(x.shape)}")
    if x.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16; got {x.dtype}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weight must be [N, K] with K = {x.shape[1]}; got shape {list(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight must have the dtype of x ({x.dtype}); got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{op}: weight is on {weight.device} but x is on {x.device}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{op}: x must have a unit inner stride; got strides {list(x.stride())}")
    if not weight.is_contiguous():
        raise ValueError(f"{op}: weight must be contiguous; got strides {list(weight.stride())}")
    limit = 2**31 - 1
    if x.shape[0] > limit or weight.shape[0] > limit or x.shape[1] > limit:
        raise ValueError(
            f"{op}: B, N and K must each be below 2^31; got B = {x.shape[0]}, N = {weight.shape[0]}, K = {x.shape[1]}"
        )


@torch.library.register_fake("prunepath::decode_gemv")
def _decode_gemv_fake(x, weight, pdl):
    check_decode_gemv_args(x, weight)
    return x.new_empty((x.shape[0], weight.shape[0]))


def topp_route_backward(grad_gates: Tensor, logits: Tensor, expert_ids: Tensor, gates: Tensor, gate: str) -> Tensor:
    """Gradient of the gates with respect to the logits, selection held fixed.

    Parameters
    ----------
    grad_gates : Tensor
        ``[T, K]`` upstream gradient of ``gates``.
    logits, expert_ids, gates : Tensor
        The op's input ``[T, E]`` and outputs ``[T, K]``.
    gate : str
        The gate mode of the forward call.

    Returns
    -------
    Tensor
        ``[T, E]`` gradient, in the dtype of ``grad_gates`` (fp32 or fp64).
    """
    kept = expert_ids >= 0  # [T, K]
    idx = expert_ids.clamp(min=0).long()  # [T, K]
    dtype = grad_gates.dtype
    grad = torch.zeros(logits.shape, dtype=dtype, device=logits.device)  # [T, E]
    u = torch.where(kept, grad_gates, torch.zeros_like(grad_gates))
    if gate == "one":
        return grad
    if gate == "sigmoid":
        s = torch.sigmoid(sanitize_logits(logits).to(dtype).gather(1, idx))
        return grad.scatter_add_(1, idx, u * s * (1 - s))
    if gate == "prob":
        # d p_a / d g_b = p_a (delta_ab - p_b)
        p = routing_probabilities(logits).to(dtype)  # [T, E]
        up = u * p.gather(1, idx)  # [T, K]
        return grad.scatter_add_(1, idx, up) - p * up.sum(dim=-1, keepdim=True)
    # renorm: the gates are a softmax over the kept logits alone, so
    # d q_a / d g_b = q_a (delta_ab - q_b) for kept b, and 0 for the others.
    q = gates.to(dtype)
    uq = u * q
    return grad.scatter_add_(1, idx, torch.where(kept, uq - q * uq.sum(dim=-1, keepdim=True), torch.zeros_like(uq)))


def _topp_route_setup_context(ctx, inputs, output):
    logits, _tau, _tau_per_token, _min_experts, _max_experts, gate = inputs
    expert_ids, gates, _num_active = output
    ctx.save_for_backward(logits, expert_ids, gates)
    ctx.gate = gate


def _topp_route_autograd_backward(ctx, grad_ids, grad_gates, grad_num_active):
    logits, expert_ids, gates = ctx.saved_tensors
    if grad_gates is None:
        return None, None, None, None, None, None
    grad_logits = topp_route_backward(grad_gates.float(), logits, expert_ids, gates, ctx.gate)
    return grad_logits.to(logits.dtype), None, None, None, None, None


torch.library.register_autograd(
    "prunepath::topp_route", _topp_route_autograd_backward, setup_context=_topp_route_setup_context
)


def check_expert_ffn_args(
    x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out, gated, act, op: str = "expert_ffn"
) -> None:
    """Raise on inconsistent shapes, dtypes or devices of a routed FFN call (messages prefixed by ``op``).

    Shared by the fake kernel of ``expert_ffn`` (same checks as its C++ glue) and by
    ``prunepath::sparse_ffn``. Expert ids are data and are checked by the kernels.
    """
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [T, d]; got shape {list(x.shape)}")
    if x.dtype not in _FFN_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16; got {x.dtype}")
    T, d = x.shape
    if w_down.dim() != 3 or w_down.shape[2] != d:
        raise ValueError(f"{op}: w_down must be [E, S, d = {d}]; got {list(w_down.shape)}")
    E, S, _ = w_down.shape
    if E < 1 or S < 1:
        raise ValueError(f"{op}: w_down must have E >= 1 experts of S >= 1 neurons; got {list(w_down.shape)}")
    rows = 2 * S if gated else S
    if tuple(w_in.shape) != (E, rows, d):
        raise ValueError(
            f"{op}: w_in must be [E, {'2S' if gated else 'S'}, d] = {[E, rows, d]}; got {list(w_in.shape)}"
        )
    if w_in.dtype != x.dtype or w_down.dtype != x.dtype:
        raise TypeError(f"{op}: weights must have the dtype of x ({x.dtype}); got {w_in.dtype}, {w_down.dtype}")
    if expert_ids.dim() != 2 or expert_ids.shape[0] != T or expert_ids.dtype != torch.int32:
        raise ValueError(
            f"{op}: expert_ids must be int32 [T = {T}, K]; got {expert_ids.dtype} {list(expert_ids.shape)}"
        )
    if tuple(gates.shape) != tuple(expert_ids.shape) or gates.dtype != torch.float32:
        raise ValueError(f"{op}: gates must be float32 {list(expert_ids.shape)}; got {gates.dtype} {list(gates.shape)}")
    if tuple(num_active.shape) != (T,) or num_active.dtype != torch.int32:
        raise ValueError(f"{op}: num_active must be int32 [{T}]; got {num_active.dtype} {list(num_active.shape)}")
    if b_in is not None and (gated or tuple(b_in.shape) != (E, S)):
        raise ValueError(f"{op}: b_in is for a plain FFN and must be [E, S] = {[E, S]}")
    if b_out is not None and tuple(b_out.shape) != (d,):
        raise ValueError(f"{op}: b_out must be [d] = [{d}]; got {list(b_out.shape)}")
    for t in (b_in, b_out):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{op}: biases must have the dtype of x ({x.dtype}); got {t.dtype}")
    if act not in ACTIVATIONS:
        raise ValueError(f"{op}: act must be one of {ACTIVATIONS}; got {act!r}")
    tensors = [t for t in (x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"{op}: every tensor must be on {x.device}")


@torch.library.register_fake("prunepath::expert_ffn")
def _expert_ffn_fake(x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out, gated, act, pdl=False):
    check_expert_ffn_args(x, expert_ids, gates, num_active, w_in, b_in, w_down, b_out, gated, act)
    return torch.empty_like(x, memory_format=torch.contiguous_format)
