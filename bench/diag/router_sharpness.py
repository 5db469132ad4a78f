"""Does a sharper router make the cumulative-mass budget better than a fixed count? (issue 5 diagnostic)

Top-k's selection does not change when every router weight is multiplied by c; PrunePath's does:
c > 1 sharpens each token's softmax, so the same tau keeps fewer experts where the router is
confident and more where it is not. This script sweeps tau for several c on one checkpoint,
without retraining, beside top-k at the same sparsities, on the last 20 % of the text.

    python bench/diag/router_sharpness.py --checkpoint DIR --text ../shared/data/wikitext-2/valid.txt
"""

from __future__ import annotations

import argparse
import time

import torch

from prunepath_ops.__main__ import _load_prunepath, _routed
from prunepath_ops.evaluate import format_table, sweep
from prunepath_ops.evaluate.data import text_tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--scales", default="1,2,4", help="router weight multipliers c")
    ap.add_argument("--taus", default="0.9,0.8,0.7")
    ap.add_argument("--ks", default="34,24", help="top-k points (c does not change them)")
    ap.add_argument("--max-tokens", type=int, default=2560)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok, _ = _load_prunepath(args.checkpoint, None, False)
    tokens = text_tokens(args.text, tok, (0.8, 1.0))
    routers = [m.router.weight for m in _routed(model)]
    original = [w.clone() for w in routers]
    taus = [float(t) for t in args.taus.split(",")]
    for i, c in enumerate(float(s) for s in args.scales.split(",")):
        for w, w0 in zip(routers, original, strict=True):
            w.copy_(w0 * c)
        start = time.perf_counter()
        rows = sweep(
            model, tokens, taus=taus, ks=[int(k) for k in args.ks.split(",") if k] if i == 0 else [],
            static_fractions=[], dense=i == 0 and not args.no_dense, max_tokens=args.max_tokens, progress=False,
        )  # fmt: skip
        print(f"\n## router weights x {c:g} ({time.perf_counter() - start:.0f} s)\n")
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
