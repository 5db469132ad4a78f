"""Training-free router (MoEfication-style): least-squares prediction of each expert's activation mass.

Legend: N calibration tokens, E experts, S expert width, d hidden.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunepath_ops.modules import PrunePathMLP
from prunepath_ops.reference.sparse_ffn import activation


@torch.no_grad()
def expert_activations(mlp: PrunePathMLP, x: Tensor) -> Tensor:
    """``[N, E, S]`` float32: the S values each expert feeds into its down projection.

    ``act(x Wg_e^T) * (x Wu_e^T)`` (gated) or ``act(x Wi_e^T + bi_e)`` (plain), for
    ``x [N, d]`` (the FFN's inputs), every expert, dense.

    Examples
    --------
    >>> from prunepath_ops.models import LlamaMLP
    >>> dense = LlamaMLP(8, 32)  # d = 8, F = 32
    >>> expert_activations(PrunePathMLP.from_dense(dense, 16), torch.randn(5, 8)).shape
    torch.Size([5, 2, 16])
    """
    E, S, d = mlp.w_down.shape
    xf = x.reshape(-1, d).float()
    w_in = mlp.w_in.float()  # [E, S or 2S, d]
    z = torch.einsum("nd,esd->nes", xf, w_in)  # [N, E, S or 2S]
    if mlp.gated:
        return activation(z[..., :S], mlp.act) * z[..., S:]
    return activation(z + mlp.b_in.float() if mlp.b_in is not None else z, mlp.act)


@torch.no_grad()
def expert_activation_mass(mlp: PrunePathMLP, x: Tensor, *, norm: str = "l2") -> Tensor:
    """Each expert's activation mass on each token: a norm of :func:`expert_activations` over its S values.

    Parameters
    ----------
    mlp : PrunePathMLP
    x : Tensor
        ``[N, d]`` calibration hidden states (the FFN's inputs).
    norm : {"l2", "l1"}
        L2 norm or sum of absolute values over the expert's S neurons.

    Returns
    -------
    Tensor
        ``[N, E]`` float32.

    Examples
    --------
    >>> from prunepath_ops.models import LlamaMLP
    >>> dense = LlamaMLP(8, 32)  # d = 8, F = 32
    >>> expert_activation_mass(PrunePathMLP.from_dense(dense, 16), torch.randn(5, 8)).shape
    torch.Size([5, 2])
    """
    if norm not in ("l2", "l1"):
        raise ValueError(f"expert_activation_mass: norm must be 'l2' or 'l1'; got {norm!r}")
    h = expert_activations(mlp, x)
    return h.norm(dim=-1) if norm == "l2" else h.abs().sum(-1)


@torch.no_grad()
def fit_router_lstsq(
    mlp: PrunePathMLP,
    x: Tensor,
    *,
    norm: str = "l2",
    ridge: float = 1e-3,
    log_mass: bool = False,
    assign: bool = True,
) -> Tensor:
    """Fit the bias-free router ``Wr [E, d]`` so that ``x Wr^T`` predicts each expert's activation mass.

    Solves the ridge least-squares problem
    ``min ||x Wr^T - M||^2 + ridge * trace(x^T x) / d * ||Wr||^2`` in float64,
    with ``M = expert_activation_mass(mlp, x)``. The ridge is relative to the mean
    squared input, so it means the same at any scale of x.

    Parameters
    ----------
    mlp : PrunePathMLP
    x : Tensor
        ``[N, d]`` calibration inputs of this layer (N >= d advisable).
    norm : {"l2", "l1"}
        Mass of an expert: L2 norm or sum of absolute activations.
    ridge : float
        Relative Tikhonov regularisation (>= 0).
    log_mass : bool
        Predict ``log(M + eps)`` instead: then ``softmax(x Wr^T)`` is
        proportional to the predicted mass, so top-p keeps the experts that carry
        a ``tau`` share of it.
    assign : bool
        Copy the result into ``mlp.router.weight``.

    Returns
    -------
    Tensor
        ``[E, d]`` in the router's dtype, on its device.

    Examples
    --------
    >>> from prunepath_ops.models import LlamaMLP
    >>> dense = LlamaMLP(8, 32)  # d = 8, F = 32
    >>> mlp = PrunePathMLP.from_dense(dense, 16)
    >>> fit_router_lstsq(mlp, torch.randn(64, 8)).shape, bool(mlp.router.weight.abs().sum() > 0)
    (torch.Size([2, 8]), True)
    """
    if ridge < 0:
        raise ValueError(f"fit_router_lstsq: ridge must be >= 0; got {ridge}")
    E, S, d = mlp.w_down.shape
    xf = x.reshape(-1, d)
    target = expert_activation_mass(mlp, xf, norm=norm).double()  # [N, E]
    if log_mass:
        target = torch.log(target + 1e-6)
    X = xf.double()
    gram = X.t() @ X  # [d, d]
    lam = ridge * gram.diagonal().mean().clamp_min(1e-30)
    gram = gram + lam * torch.eye(d, dtype=gram.dtype, device=gram.device)
    w = torch.linalg.solve(gram, X.t() @ target).t()  # [E, d]
    w = w.to(device=mlp.router.weight.device, dtype=mlp.router.weight.dtype)
    if assign:
        mlp.router.weight.copy_(w)
    return w
