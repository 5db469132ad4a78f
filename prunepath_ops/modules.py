"""``nn.Module`` front end: :class:`PrunePathMLP`, a dense FFN turned into a routed expert FFN.

Legend: T tokens, E experts, S expert width, d hidden, F FFN width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prunepath_ops._registration import LINEAR_ROUTE_CUDA_MAX_EXPERTS
from prunepath_ops.decode_step import add_rms_norm
from prunepath_ops.ffn.api import sparse_ffn
from prunepath_ops.ffn.packing import PackedExperts, pack_experts
from prunepath_ops.reference.routing import GATE_MODES, topp_gates
from prunepath_ops.reference.sparse_ffn import activation
from prunepath_ops.routing import linear_topp_route, norm_linear_topp_route, topp_route

# Up to this many tokens per call the CUDA forward routes with the fused linear_topp_route. Its
# grid has one set of row blocks per token, so its time grows with T: on the H200 (Llama-3-8B
# router, bench/results/router_decode_cuda.md) it wins at T = 1 (7.0 vs 11.7 us) and loses at
# T = 4 (14.5 vs 12.0 us).
FUSED_ROUTER_MAX_TOKENS = 1

_ACT_OF_MODULE = {nn.SiLU: "silu", nn.ReLU: "relu"}


def _activation_name(module: nn.Module, default: str) -> str:
    act = getattr(module, "act_fn", None) or getattr(module, "act", None) or getattr(module, "activation", None)
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    for cls, name in _ACT_OF_MODULE.items():
        if isinstance(act, cls):
            return name
    return default


def _dense_weights(mlp: nn.Module) -> dict:
    """Weights of a Llama-style (gate/up/down), fc1/fc2 or GPT-2 (c_fc/c_proj Conv1D) FFN, ``nn.Linear`` layout."""
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return {"w_in": mlp.gate_proj.weight, "w_up": mlp.up_proj.weight, "w_out": mlp.down_proj.weight, "gated": True}
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):
        return {
            "w_in": mlp.fc1.weight,
            "b_in": mlp.fc1.bias,
            "w_out": mlp.fc2.weight,
            "b_out": mlp.fc2.bias,
            "gated": False,
        }
    if hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):  # GPT-2 Conv1D stores weight as [in, out]
        return {
            "w_in": mlp.c_fc.weight.t(), "b_in": mlp.c_fc.bias,
            "w_out": mlp.c_proj.weight.t(), "b_out": mlp.c_proj.bias, "gated": False,
        }  # fmt: skip
    raise TypeError(
        f"PrunePathMLP.from_dense: {type(mlp).__name__} has neither gate_proj/up_proj/down_proj, fc1/fc2 nor c_fc/c_proj"
    )


def expert_gate_mask(
    route: tuple[Tensor, Tensor, Tensor], num_experts: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Per-expert scale ``[T, E]`` of a routing: a selected expert's gate, 0 for the others.

    Differentiable with respect to ``route.gates``; only slots ``j < num_active[t]`` are read.
    ``dtype``: of the result (default float32, the gates' dtype).
    """
    expert_ids, gates, num_active = route
    T, K = expert_ids.shape
    valid = torch.arange(K, device=expert_ids.device)[None, :] < num_active[:, None].long()  # [T, K]
    idx = torch.where(valid, expert_ids.long(), torch.full_like(expert_ids, num_experts, dtype=torch.long))
    src = torch.where(valid, gates.to(dtype), torch.zeros((), dtype=dtype, device=gates.device))  # [T, K]
    # Valid slots of one token hold distinct experts; column E collects the unused slots (zeros).
    mask = torch.zeros(T, num_experts + 1, dtype=dtype, device=gates.device).scatter(1, idx, src)
    return mask[:, :num_experts]  # [T, E]


def straight_through_gates(logits: Tensor, route: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The routing with gates of value 1 whose gradient is that of the selected experts' probabilities.

    Gate ``one`` keeps the dense model's scale (the experts' outputs are not shrunk as by
    ``sigmoid`` gates at initialisation) but passes no gradient to the router; this
    straight-through form has the same forward values and lets the task loss reach the router:
    ``g = 1 + p - stop_gradient(p)`` with ``p`` the softmax probability of a selected expert.

    Parameters
    ----------
    logits : Tensor
        ``[T, E]`` router logits (requiring grad).
    route : Route or tuple
        ``(expert_ids [T, K], gates [T, K], num_active [T])`` of a ``gate="one"`` routing.

    Returns
    -------
    tuple
        ``(expert_ids, gates, num_active)``: gates 1 in the selected slots, 0 elsewhere.

    Examples
    --------
    >>> import torch, prunepath_ops as pp
    >>> logits = torch.randn(3, 8, requires_grad=True)
    >>> route = straight_through_gates(logits, pp.topp_route(logits.detach(), 0.6, gate="one"))
    >>> bool((route[1][route[0] >= 0] == 1).all())
    True
    """
    expert_ids, _, num_active = route
    p = topp_gates(logits, expert_ids, "prob")  # [T, K], 0 in unused slots
    return expert_ids, p - p.detach() + (expert_ids >= 0).to(p.dtype), num_active


def masked_expert_ffn(x: Tensor, route: tuple[Tensor, Tensor, Tensor], packed: PackedExperts) -> Tensor:
    """The routed FFN computed densely on packed weights: every neuron, scaled by its expert's gate.

    ``y = ((act(x Wg^T) * (x Wu^T)) * m) Wd^T (+ b_out)`` with ``m [T, F]`` the gate of a selected
    expert on its S neurons and 0 elsewhere (plain FFN: ``act(x Wi^T + bi)``). Equal in value to
    :func:`prunepath_ops.sparse_ffn` (up to rounding) but built from differentiable PyTorch ops, so
    gradients reach ``x``, the weights and the gates (hence the router logits, through
    :func:`prunepath_ops.topp_route`'s autograd formula). It computes all F neurons: the training path.

    Parameters
    ----------
    x : Tensor
        ``[T, d]``.
    route : Route or tuple
        ``(expert_ids [T, K], gates [T, K], num_active [T])``.
    packed : PackedExperts

    Returns
    -------
    Tensor
        ``[T, d]`` in the dtype of ``x``.
    """
    E, S, d = packed.w_down.shape
    T = x.shape[0]
    w_in = packed.w_in.to(x.dtype)
    if packed.gated:
        gu = x @ w_in.reshape(E * 2 * S, d).t()  # [T, E*2S], expert-major: S gate then S up per expert
        gu = gu.view(T, E, 2, S)
        h = activation(gu[:, :, 0], packed.act) * gu[:, :, 1]  # [T, E, S]
    else:
        z = (x @ w_in.reshape(E * S, d).t()).view(T, E, S)  # [T, E, S]
        if packed.b_in is not None:
            z = z + packed.b_in.to(x.dtype)
        h = activation(z, packed.act)
    acc = torch.promote_types(x.dtype, torch.float32)  # gates applied in fp32 (fp64 for fp64 inputs)
    m = expert_gate_mask(route, E, acc)  # [T, E]
    h = (h.to(acc) * m[:, :, None]).to(x.dtype)  # [T, E, S]
    y = h.reshape(T, E * S) @ packed.w_down.to(x.dtype).reshape(E * S, d)  # [T, d]
    if packed.b_out is not None:
        y = y + packed.b_out.to(x.dtype)
    return y


class PrunePathMLP(nn.Module):
    """Router -> top-p routing -> sparse expert FFN, with ``tau`` settable at any time.

    Parameters
    ----------
    packed : PackedExperts
        The FFN's weights in expert-major layout (see :func:`prunepath_ops.pack_experts`).
    router_weight : Tensor, optional
        ``[E, d]`` router weight; default zeros (the paper's initialisation).
    tau : float
        Top-p threshold; ``tau >= 1`` keeps every expert. Reading ``mlp.tau`` gives a float;
        the value the forward uses lives in the fp32 buffer ``tau_tensor`` ``[1]`` (not saved in
        the state dict), which assigning ``mlp.tau`` fills in place, so a captured CUDA graph
        or a compiled function sees the new value without recapture or recompilation.
    gate : {"sigmoid", "prob", "renorm", "one"}
    min_experts, max_experts : int
        Bounds on the experts kept per token (see :func:`prunepath_ops.topp_route`).
    path, backend : str
        Forwarded to :func:`prunepath_ops.sparse_ffn`.
    differentiable : bool or "auto"
        ``True``: the forward runs :func:`masked_expert_ffn` (every neuron, masked by the gates),
        which autograd differentiates w.r.t. the input, the router and the FFN weights; the
        training path (see :func:`prunepath_ops.train.differentiable_ffns`). ``False`` (default):
        :func:`prunepath_ops.sparse_ffn`, which has no autograd formula (no gradient reaches the
        router through it). ``"auto"``: the differentiable path when grad mode is on and the
        input, the router or an FFN weight requires grad.
    straight_through : bool
        With gate ``one``, the differentiable path's gates are 1 in value but carry the gradient of
        the selected experts' probabilities (:func:`straight_through_gates`), so the task loss
        trains the router; the sparse path and every output value are unchanged.

    Attributes
    ----------
    fused_router : bool
        On CUDA, for one token per call and E <= 1024 (batch-1 decoding), the forward runs the router
        projection and the routing as one kernel (:func:`prunepath_ops.linear_topp_route`) instead
        of ``router`` then :func:`prunepath_ops.topp_route`. Default True; the routing is the same
        function of the logits, the logits may differ from cuBLAS's in their last bit. Forward
        hooks on ``router`` turn it off (they need the module call).

    Examples
    --------
    >>> import torch
    >>> from prunepath_ops.models import LlamaMLP
    >>> dense = LlamaMLP(8, 32)  # d = 8, F = 32
    >>> mlp = PrunePathMLP.from_dense(dense, expert_width=16, tau=0.9)
    >>> mlp.tau = 0.5
    >>> mlp(torch.randn(2, 3, 8)).shape
    torch.Size([2, 3, 8])
    """

    def __init__(
        self,
        packed: PackedExperts,
        router_weight: Tensor | None = None,
        *,
        tau: float = 1.05,
        gate: str = "sigmoid",
        min_experts: int = 1,
        max_experts: int | None = None,
        path: str = "auto",
        backend: str = "auto",
        differentiable: bool | str = False,
        straight_through: bool = False,
    ) -> None:
        super().__init__()
        if gate not in GATE_MODES:
            raise ValueError(f"PrunePathMLP: gate must be one of {GATE_MODES}; got {gate!r}")
        E, d = packed.num_experts, packed.hidden
        self.router = nn.Linear(d, E, bias=False, device=packed.w_in.device, dtype=packed.w_in.dtype)
        with torch.no_grad():
            self.router.weight.copy_(router_weight if router_weight is not None else torch.zeros(E, d))
        self.register_buffer("w_in", packed.w_in)
        self.register_buffer("w_down", packed.w_down)
        self.register_buffer("b_in", packed.b_in)
        self.register_buffer("b_out", packed.b_out)
        self.gated, self.act = packed.gated, packed.act
        tau_tensor = torch.empty(1, dtype=torch.float32, device=packed.w_in.device)
        self.register_buffer("tau_tensor", tau_tensor, persistent=False)
        # Arrival counters of the fused decode router (linear_topp_route), which leaves them zero.
        tickets = torch.zeros(FUSED_ROUTER_MAX_TOKENS, dtype=torch.int32, device=packed.w_in.device)
        self.register_buffer("route_tickets", tickets, persistent=False)
        self.fused_router = True
        self.tau, self.gate, self.min_experts, self.max_experts = tau, gate, min_experts, max_experts
        self.path, self.backend = path, backend
        self.differentiable = differentiable
        self.straight_through = straight_through

    @classmethod
    def from_dense(
        cls,
        mlp: nn.Module,
        expert_width: int,
        permutation: Tensor | None = None,
        *,
        act: str | None = None,
        router_weight: Tensor | None = None,
        **kwargs,
    ) -> PrunePathMLP:
        """Pack a dense FFN module (Llama ``gate/up/down_proj``, ``fc1/fc2`` or GPT-2 ``c_fc/c_proj``).

        ``permutation`` ``[F]`` groups neurons into experts (packed neuron i is dense
        neuron ``permutation[i]``); ``act`` overrides the activation found on the
        module (``act_fn``/``act``/``activation``; default silu for gated, gelu for plain).
        """
        w = _dense_weights(mlp)
        gated = w.pop("gated")
        name = act or _activation_name(mlp, "silu" if gated else "gelu")
        with torch.no_grad():
            packed = pack_experts(
                w["w_in"].detach(), w["w_out"].detach(), expert_width, w_up=w.get("w_up"), b_in=w.get("b_in"),
                b_out=w.get("b_out"), permutation=permutation, act=name,
            )  # fmt: skip
        packed = PackedExperts(*(t.detach() if isinstance(t, Tensor) else t for t in vars(packed).values()))
        return cls(packed, router_weight, **kwargs)

    @property
    def tau(self) -> float:
        """The top-p threshold (a float mirror of ``tau_tensor``, read without a device synchronisation)."""
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        value = float(value)
        if value != value:  # a NaN tensor tau would silently keep min_experts
            raise ValueError("PrunePathMLP: tau must be a number; got NaN")
        self._tau = value
        # An in-place fill keeps the buffer's address, which CUDA graphs captured earlier read.
        # The buffer may have been created under inference mode, where it can only be written.
        with torch.inference_mode(self.tau_tensor.is_inference()):
            self.tau_tensor.fill_(value)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # model.to(torch.bfloat16) casts every float buffer; topp_route needs an fp32 tau (and
        # bf16 would round 0.3 to 0.3008), so rebuild it from the exact float.
        if self.tau_tensor.dtype != torch.float32:
            self.tau_tensor = torch.full((1,), self._tau, dtype=torch.float32, device=self.tau_tensor.device)
        return self

    @property
    def packed(self) -> PackedExperts:
        return PackedExperts(self.w_in, self.w_down, self.b_in, self.b_out, self.gated, self.act)

    def route(self, x: Tensor):
        """The routing of ``x [T, d]`` at the current ``tau``."""
        return self._route(self.router(x))

    def _route(self, logits: Tensor):
        return topp_route(
            logits, self.tau_tensor, min_experts=self.min_experts, max_experts=self.max_experts, gate=self.gate
        )

    def _use_differentiable(self, x: Tensor) -> bool:
        mode = getattr(self, "differentiable", False)  # modules pickled before the attribute existed
        if mode == "auto":
            if not torch.is_grad_enabled():
                return False
            tensors = (x, self.router.weight, self.w_in, self.w_down, self.b_in, self.b_out)
            return any(t is not None and t.requires_grad for t in tensors)
        if not isinstance(mode, bool):
            raise ValueError(f"PrunePathMLP: differentiable must be True, False or 'auto'; got {mode!r}")
        return mode

    def _use_fused_router(self, x: Tensor) -> bool:
        # The decode regime on CUDA, unless something must see the router as a module call
        # (forward hooks, e.g. the trainer's logit capture) or the user turned it off.
        tickets = getattr(self, "route_tickets", None)  # modules pickled before the buffer existed
        return (
            x.is_cuda
            and getattr(self, "fused_router", False)
            and tickets is not None
            and tickets.device == x.device
            and x.shape[0] <= tickets.shape[0]
            and self.router.weight.shape[0] <= LINEAR_ROUTE_CUDA_MAX_EXPERTS
            and self.router.weight.dtype == x.dtype
            and self.router.bias is None
            and not (self.router._forward_hooks or self.router._forward_pre_hooks)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[..., d] -> [..., d]``."""
        x2 = x.reshape(-1, x.shape[-1])
        if not self._use_differentiable(x2) and self._use_fused_router(x2):
            # Router projection and top-p routing in one launch (bit-identical routing of its logits).
            _, route = linear_topp_route(
                x2, self.router.weight, self.tau_tensor, min_experts=self.min_experts,
                max_experts=self.max_experts, gate=self.gate, tickets=self.route_tickets,
            )  # fmt: skip
            return sparse_ffn(x2, route, self.packed, path=self.path, backend=self.backend).view(x.shape)
        logits = self.router(x2)  # [T, E]
        route = self._route(logits)
        if self._use_differentiable(x2):
            if getattr(self, "straight_through", False):  # modules pickled before the attribute existed
                if self.gate != "one":
                    raise ValueError(f"PrunePathMLP: straight_through needs gate='one'; got {self.gate!r}")
                route = straight_through_gates(logits, route)
            y = masked_expert_ffn(x2, route, self.packed)
        else:
            y = sparse_ffn(x2, route, self.packed, path=self.path, backend=self.backend)
        return y.view(x.shape)

    def forward_after_norm(self, x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """This FFN of ``rms_norm(x + residual) * norm_weight``, and ``h = x + residual``.

        ``x, residual [..., d]``, ``norm_weight [d]``; returns ``(ffn_out [..., d], h [..., d])``. Where
        the fused router applies (:meth:`forward`'s decode case on CUDA) the norm runs inside the
        router kernel (:func:`prunepath_ops.norm_linear_topp_route`, one launch less); otherwise
        :func:`prunepath_ops.decode_step.add_rms_norm`, then :meth:`forward`.
        """
        d = x.shape[-1]
        x2, r2 = x.reshape(-1, d), residual.reshape(-1, d)
        if (
            not self._use_differentiable(x2)
            and self._use_fused_router(x2)
            and x2.is_contiguous()
            and r2.is_contiguous()
            and norm_weight.dtype == x.dtype
            and norm_weight.is_contiguous()
        ):
            y, h, _, route = norm_linear_topp_route(
                x2, r2, norm_weight, self.router.weight, self.tau_tensor, eps=eps, min_experts=self.min_experts,
                max_experts=self.max_experts, gate=self.gate, tickets=self.route_tickets,
            )  # fmt: skip
            out = sparse_ffn(y, route, self.packed, path=self.path, backend=self.backend)
            return out.view(x.shape), h.view(x.shape)
        y, h = add_rms_norm(x2, r2, norm_weight, eps)
        return self(y).view(x.shape), h.view(x.shape)

    def extra_repr(self) -> str:
        E, S, d = self.w_down.shape
        return f"d={d}, experts={E}x{S}, gated={self.gated}, act={self.act}, tau={self.tau}, gate={self.gate}"
