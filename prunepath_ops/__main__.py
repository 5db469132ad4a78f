"""Command line: ``python -m prunepath_ops demo`` (also installed as ``prunepath``).

``demo`` shows the library end to end on the CPU in a few seconds: a dense SwiGLU FFN
is cut into 32-neuron experts, a router scores them, ``topp_route`` picks each token's
experts for several ``tau``, and the sparse FFN is compared with the dense one.
``info`` prints the build's backends.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

import prunepath_ops as pp
from prunepath_ops import reference


class _SwiGLU(nn.Module):
    """A Llama-style FFN (the layout PrunePathMLP.from_dense understands)."""

    def __init__(self, d: int, F: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, F, bias=False)
        self.up_proj = nn.Linear(d, F, bias=False)
        self.down_proj = nn.Linear(F, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _show_routing(logits: torch.Tensor, tau: float) -> None:
    route = pp.topp_route(logits, tau, gate="prob")
    print(f"\ntopp_route(logits [{logits.shape[0]}, {logits.shape[1]}], tau={tau}, gate='prob'):")
    p = reference.routing_probabilities(logits)
    for t in range(logits.shape[0]):
        n = int(route.num_active[t])
        ids = route.expert_ids[t, :n].tolist()
        mass = float(p[t, route.expert_ids[t, :n].long()].sum()) if n else 0.0
        print(
            f"  token {t}: {n} expert(s) {ids}  kept mass {mass:.3f}  gates {[round(g, 3) for g in route.gates[t, :n].tolist()]}"
        )


def _fit_router(packed: pp.PackedExperts, x_cal: torch.Tensor) -> torch.Tensor:
    """A training-free router (MoEfication style): least squares from x to log ||FFN_e(x)||."""
    S = packed.expert_width
    g = torch.einsum("td,esd->tes", x_cal, packed.w_in)  # [T, E, 2S]
    h = torch.nn.functional.silu(g[..., :S]) * g[..., S:]  # [T, E, S]
    norms = torch.einsum("tes,esd->ted", h, packed.w_down).norm(dim=-1)  # [T, E]
    return torch.linalg.lstsq(x_cal, torch.log(norms + 1e-6)).solution.T.contiguous()  # [E, d]


def demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    print(f"prunepath_ops {pp.__version__}, torch {torch.__version__}, backends {pp.backends()}")
    d, F, S, T = args.hidden, args.ffn, args.expert_width, args.tokens
    E = F // S
    dense = _SwiGLU(d, F).eval()
    mlp = pp.PrunePathMLP.from_dense(dense, expert_width=S, gate="one").eval()
    with torch.no_grad():
        mlp.router.weight.copy_(_fit_router(mlp.packed, torch.randn(4 * d, d)))
    x = torch.randn(T, d)
    with torch.no_grad():
        mlp(x[:1])  # first call: kernel and op warm-up stay out of the timings
        logits = mlp.router(x)
        _show_routing(logits[:4], 0.5)
        y_dense = dense(x)
        print(f"\nSwiGLU FFN d={d}, F={F} -> E={E} experts of S={S} neurons; {T} tokens; gate='one'")
        print(f"{'tau':>6} {'experts/token':>14} {'s_FFN':>7} {'rel. error vs dense':>20} {'ms/call':>8}")
        for tau in args.taus:
            mlp.tau = tau
            start = time.perf_counter()
            y = mlp(x)
            ms = (time.perf_counter() - start) * 1e3
            n = mlp.route(x).num_active.float()
            err = float((y - y_dense).norm() / y_dense.norm())
            print(f"{tau:>6.2f} {float(n.mean()):>14.1f} {1 - float(n.mean()) / E:>7.2f} {err:>20.2e} {ms:>8.2f}")
    print(
        "\nWith tau >= 1 and gate 'one' the sparse FFN equals the dense one; lowering tau skips experts. "
        "The router here is fitted without training (least squares on each expert's output norm) on a random "
        "FFN; trained routers on real models keep far more quality per skipped expert (SPEC.md section 5)."
    )
    return 0


def info(_: argparse.Namespace) -> int:
    print(f"prunepath_ops {pp.__version__} (torch {torch.__version__})")
    for name, ok in pp.backends().items():
        print(f"  {name}: {ok}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prunepath", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="route and run a sparse FFN on a small random model (CPU, seconds)")
    p_demo.add_argument("--hidden", type=int, default=256, help="hidden size d (default 256)")
    p_demo.add_argument(
        "--ffn", type=int, default=1024, help="FFN width F, a multiple of --expert-width (default 1024)"
    )
    p_demo.add_argument("--expert-width", type=int, default=32, help="neurons per expert S (default 32)")
    p_demo.add_argument("--tokens", type=int, default=64, help="tokens per call (default 64)")
    p_demo.add_argument("--taus", type=float, nargs="+", default=[1.05, 0.9, 0.7, 0.5, 0.3], help="tau values to sweep")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(func=demo)
    sub.add_parser("info", help="print the backends this build has").set_defaults(func=info)
    args = parser.parse_args(argv)
    if getattr(args, "ffn", 0) and args.ffn % args.expert_width:
        parser.error(f"--ffn ({args.ffn}) must be a multiple of --expert-width ({args.expert_width})")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
