"""How good can a router get on this backbone? Routing by each expert's true contribution (issue 5 diagnostic).

An oracle replaces every :class:`~prunepath_ops.PrunePathMLP`'s router: for each token it computes
every expert's output ``y_e = FFN_e(x)`` (dense, so this is a measurement, never a fast path) and
treats ``m_e = ||y_e||_2`` as the expert's weight. PrunePath's rule then runs on the distribution
``m / sum(m)`` (the smallest prefix of experts, heaviest first, whose cumulative share stays below
``tau``; ``topp_route`` of ``log m``), top-k keeps the k heaviest, and the output is the sum of the
kept ``y_e`` (gate one). ``--power a`` runs the rule on ``m ** a`` instead (sharper for a > 1);
``--mass activation`` ranks by the norm of the expert's activations ``h_e`` instead (the quantity
the least-squares routers of ``prunepath convert`` are fitted to predict). Against the trained router's rows of the same script (``--with-router``) it
separates two questions the quality report mixes: is the mass rule (a per-token budget) better than a
fixed count when the ranking is right, and how far is the router's ranking from the right one?

    python bench/diag/oracle_routing.py --checkpoint DIR --text ../shared/data/wikitext-2/valid.txt
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from prunepath_ops import topp_route
from prunepath_ops.__main__ import _load_prunepath, _routed
from prunepath_ops.convert import expert_activation_mass, expert_activations
from prunepath_ops.evaluate import format_table, sweep
from prunepath_ops.evaluate.data import text_tokens
from prunepath_ops.modules import PrunePathMLP


def expert_outputs(mlp: PrunePathMLP, x: Tensor) -> Tensor:
    """``[T, E, d]``: every expert's output for ``x [T, d]`` (gate one, no output bias), fp32."""
    return torch.einsum("tes,esd->ted", expert_activations(mlp, x), mlp.packed.w_down.float())


def oracle_route(mlp: PrunePathMLP, x: Tensor, y_e: Tensor | None = None, *, power: float = 1.0, mass: str = "output"):
    """The module's rule (tau, expert bounds) on ``m ** power / sum(m ** power)``.

    ``m``: the experts' output norms ``||FFN_e(x)||`` (``mass="output"``; ``y_e`` when already
    computed) or activation norms ``||h_e||`` (``"activation"``, what the lstsq routers fit).
    """
    if mass == "activation":
        weight = expert_activation_mass(mlp, x)  # [T, E]
    else:
        weight = (expert_outputs(mlp, x) if y_e is None else y_e).norm(dim=-1)  # [T, E]
    return topp_route(
        power * torch.log(weight), mlp.tau_tensor.to(weight.device), min_experts=mlp.min_experts,
        max_experts=mlp.max_experts, gate="one",
    )  # fmt: skip


def oracle_forward(mlp: PrunePathMLP, x: Tensor, **rule) -> Tensor:
    """The sum of the experts :func:`oracle_route` keeps (gate one), plus the output bias."""
    x2 = x.reshape(-1, x.shape[-1])
    y_e = expert_outputs(mlp, x2)
    ids, _, n = oracle_route(mlp, x2, y_e, **rule)
    E = y_e.shape[1]
    keep = torch.zeros(x2.shape[0], E + 1, dtype=y_e.dtype, device=y_e.device)
    slots = torch.arange(ids.shape[1], device=ids.device)[None, :] < n[:, None]
    keep.scatter_(1, torch.where(slots, ids.long(), E), 1.0)  # padding goes to the extra column
    y = torch.einsum("te,ted->td", keep[:, :E], y_e)
    if mlp.packed.b_out is not None:
        y = y + mlp.packed.b_out.float()
    return y.to(x.dtype).view(x.shape)


@contextmanager
def oracle_routing(mlps: list[PrunePathMLP], *, power: float = 1.0, mass: str = "output") -> Iterator[None]:
    """Within the block every module routes (and reports ``num_active``) by the oracle."""
    for m in mlps:
        m.forward = functools.partial(oracle_forward, m, power=power, mass=mass)
        m.route = functools.partial(oracle_route, m, power=power, mass=mass)
    try:
        yield
    finally:
        for m in mlps:
            del m.forward, m.route


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--taus", default="0.95,0.9,0.85,0.8,0.7")
    ap.add_argument("--ks", default="34,24,14,10")
    ap.add_argument("--max-tokens", type=int, default=2560)
    ap.add_argument("--with-router", action="store_true", help="also the trained router's rows, same tokens")
    ap.add_argument("--power", type=float, default=1.0, help="PrunePath's rule on m ** power (top-k: same ranking)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row")
    ap.add_argument("--mass", choices=("output", "activation"), default="output",
                    help="rank by ||FFN_e(x)|| or by the activation norm ||h_e|| that the lstsq routers fit")  # fmt: skip
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok, _ = _load_prunepath(args.checkpoint, None, False)
    tokens = text_tokens(args.text, tok, (0.8, 1.0))
    taus = [float(t) for t in args.taus.split(",") if t]
    ks = [int(k) for k in args.ks.split(",") if k]
    common = dict(static_fractions=[], max_tokens=args.max_tokens, progress=False)
    if args.with_router:
        start = time.perf_counter()
        rows = sweep(model, tokens, taus=taus, ks=ks, dense=True, **common)
        print(f"\n## trained router ({time.perf_counter() - start:.0f} s)\n\n{format_table(rows)}", flush=True)
    start = time.perf_counter()
    with oracle_routing(_routed(model), power=args.power, mass=args.mass):
        rows = sweep(model, tokens, taus=taus, ks=ks, dense=not (args.with_router or args.no_dense), **common)
    m = "||FFN_e(x)||" if args.mass == "output" else "||h_e||"
    title = f"oracle: experts ranked by {m}, PrunePath's rule on {m} ** {args.power:g}"
    print(f"\n## {title} ({time.perf_counter() - start:.0f} s)\n\n{format_table(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
