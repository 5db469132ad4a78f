"""``python -m prunepath_ops.train``: convert a GGUF Llama (default SmolLM2-135M-Instruct) and train its routers.

Steps: load the model, convert every FFN (balanced k-means, expert width S), tokenize the training
and evaluation line ranges of a text file (default ``shared/data/wikitext-2/valid.txt``, lines of
the first 80% / last 20%), evaluate, train with the paper's recipe, evaluate again at ``tau_min``,
and optionally write the stats as JSON and the PrunePath checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from prunepath_ops.train.data import EVAL_SPLIT, TRAIN_SPLIT, find_default_text, load_text_tokens
from prunepath_ops.train.trainer import TrainConfig, evaluate, train_routers


def _split(text: str) -> tuple[float, float]:
    a, b = (float(v) for v in text.split(","))
    return a, b


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m prunepath_ops.train", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--text", default=None, help="training text file (default: shared/data/wikitext-2/valid.txt)")
    p.add_argument("--train-split", type=_split, default=TRAIN_SPLIT, help="line fractions a,b (default 0,0.8)")
    p.add_argument("--eval-split", type=_split, default=EVAL_SPLIT, help="line fractions a,b (default 0.8,1)")
    p.add_argument("--expert-width", type=int, default=32)
    p.add_argument("--kmeans-iter", type=int, default=30)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr-router", type=float, default=1e-3)
    p.add_argument("--lr-backbone", type=float, default=1e-4)
    p.add_argument("--train-backbone", action="store_true")
    p.add_argument("--tau-min", type=float, default=0.5)
    p.add_argument("--warmup-frac", type=float, default=0.1)
    p.add_argument("--eta", type=float, default=3e-4)
    p.add_argument("--lam", type=float, default=1e-3)
    p.add_argument("--gamma", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-windows", type=int, default=8, help="evaluation windows of seq_len (0: no evaluation)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--stats-json", default=None, help="write the config, timings and per-step history here")
    p.add_argument("--save", default=None, help="write the PrunePath checkpoint (routers, packed FFNs) here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from prunepath_ops.convert import convert_model, save_checkpoint
    from prunepath_ops.models import LlamaMLP, from_gguf, load_tokenizer

    t0 = time.perf_counter()
    model = from_gguf(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    tokenizer = load_tokenizer(args.model)
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    perms = convert_model(
        model, args.expert_width, args.seed, find=lambda name, m: isinstance(m, LlamaMLP),
        max_iter=args.kmeans_iter, progress=not args.no_progress,
    )  # fmt: skip
    t_convert = time.perf_counter() - t0

    text = args.text or find_default_text()
    train = load_text_tokens(text, tokenizer, args.train_split)
    held_out = load_text_tokens(text, tokenizer, args.eval_split)
    print(f"training on {train.describe()}; evaluating on {held_out.describe()}")

    cfg = TrainConfig(
        steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr_router=args.lr_router, lr_backbone=args.lr_backbone, train_backbone=args.train_backbone,
        tau_min=args.tau_min, warmup_frac=args.warmup_frac, eta=args.eta, lam=args.lam, gamma=args.gamma,
        seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    report: dict = {"load_s": t_load, "convert_s": t_convert, "train_lines": train.describe(),
                    "eval_lines": held_out.describe()}  # fmt: skip

    def run_eval(tag: str, tau: float) -> None:
        if args.eval_windows <= 0:
            return
        for m in model.modules():
            if hasattr(m, "tau") and hasattr(m, "router"):
                m.tau = tau
        t = time.perf_counter()
        result = evaluate(model, held_out.tokens, args.seq_len, max_windows=args.eval_windows)
        result["seconds"] = time.perf_counter() - t
        report[f"eval_{tag}"] = result
        print(f"eval {tag} (tau={tau}): ce={result['ce']:.4f} ppl={result['ppl']:.2f} s_ffn={result['sparsity']:.3f}")

    run_eval("before_tau_min", args.tau_min)
    stats = train_routers(model, train.tokens, cfg)
    run_eval("after_tau_min", args.tau_min)
    report.update(stats.as_dict())
    report["seconds_per_step"] = stats.seconds_per_step
    print(f"{len(stats.history)} steps in {stats.seconds:.1f} s ({stats.seconds_per_step:.2f} s/step)")
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump(report, f, indent=1)
    if args.save:
        save_checkpoint(args.save, model, config={"train": report["config"]}, permutations=perms)
    return report


if __name__ == "__main__":
    main()
