"""Load-time packing of dense (permuted) FFN weights into the expert-major layout of the kernels.

Legend: E experts, S expert width, d hidden, F = E * S FFN width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prunepath_ops.reference.sparse_ffn import ACTIVATIONS

EXPERT_WIDTHS = (16, 32, 64, 128)


@dataclass
class PackedExperts:
    """FFN weights split into E experts of S neurons, expert-major.

    Attributes
    ----------
    w_in : Tensor
        ``[E, 2S, d]`` for a gated FFN (expert ``e``'s S gate rows, then its S up
        rows: one contiguous ``2S x d`` block per expert), ``[E, S, d]`` for a plain one.
    w_down : Tensor
        ``[E, S, d]``: the down projection transposed, so an expert's slice is S
        contiguous rows of length d.
    b_in : Tensor or None
        ``[E, S]`` first-layer bias (plain FFN).
    b_out : Tensor or None
        ``[d]`` output bias, added once per token.
    gated : bool
    act : str
        One of ``silu``, ``gelu``, ``gelu_tanh``, ``relu``.
    """

    w_in: Tensor
    w_down: Tensor
    b_in: Tensor | None
    b_out: Tensor | None
    gated: bool
    act: str

    @property
    def num_experts(self) -> int:
        return self.w_down.shape[0]

    @property
    def expert_width(self) -> int:
        return self.w_down.shape[1]

    @property
    def hidden(self) -> int:
        return self.w_down.shape[2]

    def to(self, *args, **kwargs) -> PackedExperts:
        """Move or cast every tensor, like ``Tensor.to``."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(*args, **kwargs).contiguous()

        return PackedExperts(
            move(self.w_in), move(self.w_down), move(self.b_in), move(self.b_out), self.gated, self.act
        )


def pack_experts(
    w_in: Tensor,
    w_out: Tensor,
    expert_width: int,
    *,
    w_up: Tensor | None = None,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
    permutation: Tensor | None = None,
    act: str = "silu",
) -> PackedExperts:
    """Permute the FFN neurons and pack them into :class:`PackedExperts`.

    Parameters
    ----------
    w_in : Tensor
        ``[F, d]`` gate projection ``Wg`` (gated) or ``Wi`` (plain), ``nn.Linear`` layout.
    w_out : Tensor
        ``[d, F]`` down projection ``Wd`` / ``Wo``.
    expert_width : int
        S, dividing F (16, 32, 64 and 128 are the kernels' tuned widths).
    w_up : Tensor, optional
        ``[F, d]`` up projection ``Wu``: its presence makes the FFN gated.
    b_in : Tensor, optional
        ``[F]`` first-layer bias (plain FFN only).
    b_out : Tensor, optional
        ``[d]`` output bias.
    permutation : Tensor, optional
        ``[F]`` int: packed neuron ``i`` is dense neuron ``permutation[i]``, so
        expert ``e`` owns dense neurons ``permutation[e*S:(e+1)*S]``. Default identity.
    act : str
        Activation, one of ``silu``, ``gelu``, ``gelu_tanh``, ``relu``.

    Returns
    -------
    PackedExperts
        Contiguous tensors in the dtype and on the device of ``w_in``.

    Examples
    --------
    >>> F, d, S = 64, 8, 16
    >>> packed = pack_experts(torch.randn(F, d), torch.randn(d, F), S, w_up=torch.randn(F, d))
    >>> packed.w_in.shape, packed.w_down.shape
    (torch.Size([4, 32, 8]), torch.Size([4, 16, 8]))
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"pack_experts: act must be one of {ACTIVATIONS}; got {act!r}")
    if w_in.dim() != 2 or w_out.dim() != 2:
        raise ValueError(
            f"pack_experts: w_in [F, d] and w_out [d, F] must be 2-D; got {list(w_in.shape)}, {list(w_out.shape)}"
        )
    F, d = w_in.shape
    if tuple(w_out.shape) != (d, F):
        raise ValueError(f"pack_experts: w_out must be [d, F] = [{d}, {F}]; got {list(w_out.shape)}")
    if expert_width < 1 or F % expert_width:
        raise ValueError(f"pack_experts: the expert width S = {expert_width} must divide F = {F}")
    gated = w_up is not None
    if gated and tuple(w_up.shape) != (F, d):
        raise ValueError(f"pack_experts: w_up must be [F, d] = [{F}, {d}]; got {list(w_up.shape)}")
    if gated and b_in is not None:
        raise ValueError("pack_experts: a gated FFN has no first-layer bias")
    if permutation is None:
        permutation = torch.arange(F, device=w_in.device)
    permutation = permutation.to(device=w_in.device, dtype=torch.long)
    if permutation.shape != (F,) or not torch.equal(
        torch.sort(permutation).values, torch.arange(F, device=w_in.device)
    ):
        raise ValueError(f"pack_experts: permutation must be a permutation of range(F = {F})")
    S, E = expert_width, F // expert_width
    wi = w_in.index_select(0, permutation).view(E, S, d)  # [E, S, d]
    if gated:
        wu = w_up.index_select(0, permutation).view(E, S, d)
        wi = torch.cat([wi, wu], dim=1)  # [E, 2S, d]
    w_down = w_out.index_select(1, permutation).t().reshape(E, S, d)  # [E, S, d]
    bi = None if b_in is None else b_in.index_select(0, permutation).view(E, S).contiguous()
    bo = None if b_out is None else b_out.contiguous()
    return PackedExperts(wi.contiguous(), w_down.contiguous(), bi, bo, gated, act)
