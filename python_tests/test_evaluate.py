"""Evaluation (issue 5): sliding-window perplexity, s_FFN on the same tokens, top-k and static baselines, sweep."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prunepath_ops.evaluate import (
    full_dense_ffns,
    neuron_scores,
    perplexity,
    plot,
    read_csv,
    static_pruned_ffns,
    swapped_ffns,
    sweep,
    topk_routing,
    topk_sparsity,
    windows,
    write_table,
)
from prunepath_ops.models import Llama, LlamaConfig, to_prunepath


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one thread is faster, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig.tiny()).eval()


def _routed_model(seed: int = 0, tau: float = 0.6) -> Llama:
    model = _model(seed)
    to_prunepath(model, expert_width=16, tau=tau, gate="one")  # E = 8
    g = torch.Generator().manual_seed(seed + 1)
    for layer in model.layers:
        with torch.no_grad():
            layer.ffn.router.weight.copy_(torch.randn(layer.ffn.router.weight.shape, generator=g))
    return model


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def test_perplexity_equals_exp_mean_nll_by_hand():
    model, tokens = _model(), _tokens(40)
    with torch.no_grad():
        logits = model(tokens[None])[0]  # one window covers everything
    nll = F.cross_entropy(logits[:-1].double(), tokens[1:]).item()
    r = perplexity(model, tokens, window=64, stride=32, progress=False)
    assert r.tokens == 39
    assert r.nll == pytest.approx(nll, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert r.sparsity == 0.0  # dense model


def test_sliding_window_scores_each_token_once_with_hf_context():
    model, tokens = _model(), _tokens(50)
    r = perplexity(model, tokens, window=16, stride=8, batch_size=3, progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for b, e, first in windows(50, 16, 8):
            lg = model(tokens[None, b:e])[0]
            pos = torch.arange(first, e)
            total += F.cross_entropy(lg[pos - b - 1].double(), tokens[pos], reduction="sum").item()
            count += len(pos)
    assert count == r.tokens == 49
    assert r.nll == pytest.approx(total / count, rel=1e-5)


def test_stride_equal_window_is_non_overlapping_chunks():
    model, tokens = _model(), _tokens(48)
    r = perplexity(model, tokens, window=16, stride=16, progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for c in tokens.split(16):
            lg = model(c[None])[0]
            total += F.cross_entropy(lg[:-1].double(), c[1:], reduction="sum").item()
            count += len(c) - 1
    assert r.tokens == count == 45
    assert r.nll == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("args", [dict(window=1), dict(stride=0), dict(stride=20), dict(window=128)])
def test_perplexity_rejects_bad_windows(args):
    kw = dict(window=16, stride=8, progress=False) | args
    with pytest.raises(ValueError):
        perplexity(_model(), _tokens(30), **kw)


def test_prunepath_sparsity_measured_on_scored_positions():
    model, tokens = _routed_model(tau=0.0), _tokens(40)  # tau 0: min_experts = 1 of 8 everywhere
    r = perplexity(model, tokens, window=16, stride=8, progress=False)
    assert r.sparsity == pytest.approx(1 - 1 / 8)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_sparsity_is_exact(k):
    model, tokens = _routed_model(), _tokens(40)
    with topk_routing(model, k):
        r = perplexity(model, tokens, window=16, stride=8, progress=False)
    assert r.sparsity == pytest.approx(topk_sparsity(8, k), abs=1e-12)
    assert all(m.tau == 0.6 and m.max_experts is None for m in model.ffns())  # restored
    with pytest.raises(ValueError):
        with topk_routing(model, 9):
            pass


def test_topk_keeps_the_most_probable_experts():
    model = _routed_model()
    mlp = model.layers[0].ffn
    x = torch.randn(6, 64)
    with topk_routing([mlp], 2):
        route = mlp.route(x)
    expected = torch.topk(mlp.router(x).softmax(-1), 2).indices.sort(-1).values
    assert torch.equal(route.expert_ids.long().sort(-1).values, expected)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5])
def test_static_pruning_sparsity_is_removed_fraction(method, fraction):
    model, tokens = _routed_model(), _tokens(40)
    scores = neuron_scores(model, method, _tokens(64, seed=5), window=32)
    pruned = static_pruned_ffns(model, scores, fraction)
    assert all(p.w_gate.shape[0] == 128 - round(fraction * 128) for p in pruned)
    with swapped_ffns(model, pruned):
        r = perplexity(model, tokens, window=16, stride=8, progress=False)
    assert r.sparsity == pytest.approx(fraction)


def test_static_pruning_equals_zeroed_neurons_and_full_dense_is_gate_one():
    model = _routed_model()
    x = torch.randn(5, 64)
    mlp = model.layers[0].ffn
    dense = full_dense_ffns(model)[0]
    saved = mlp.tau
    mlp.tau = 1.05
    torch.testing.assert_close(dense(x), mlp(x), rtol=1e-5, atol=1e-5)  # gate 'one', all experts
    mlp.tau = saved
    scores = neuron_scores(model, "magnitude")
    pruned = static_pruned_ffns(model, scores, 0.5)[0]
    keep = torch.zeros(128, dtype=torch.bool)
    keep[torch.argsort(scores[0], descending=True, stable=True)[:64]] = True
    h = F.silu(F.linear(x, dense.w_gate)) * F.linear(x, dense.w_up) * keep
    torch.testing.assert_close(pruned(x), F.linear(h, dense.w_down), rtol=1e-5, atol=1e-5)


def test_sweep_writes_table_csv_and_png(tmp_path):
    model, tokens = _routed_model(), _tokens(48)
    rows = sweep(
        model, tokens, taus=(1.05, 0.7), ks=(4,), static_fractions=(0.5,), static_methods=("wanda", "magnitude"),
        calib_tokens=_tokens(64, seed=3), window=16, stride=8, progress=False,
    )  # fmt: skip
    methods = [r.method for r in rows]
    assert methods == ["dense", "prunepath", "prunepath", "topk", "static-wanda", "static-magnitude"]
    assert rows[0].ppl == pytest.approx(rows[1].ppl, rel=1e-5)  # tau 1.05, gate one == dense
    assert rows[3].sparsity == pytest.approx(0.5)
    assert all(m.tau == 0.6 for m in model.ffns())
    md, csv_path, png = tmp_path / "t.md", tmp_path / "t.csv", tmp_path / "t.png"
    write_table(rows, md, csv_path)
    assert md.read_text().count("\n") == 2 + len(rows)
    assert [r.method for r in read_csv(csv_path)] == methods
    pytest.importorskip("matplotlib")
    plot(rows, png)
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_sweep_rejects_bad_tau_and_wanda_without_calibration():
    model, tokens = _routed_model(), _tokens(32)
    with pytest.raises(ValueError, match="tau"):
        sweep(model, tokens, taus=(float("nan"),), window=16, stride=8, progress=False)
    with pytest.raises(ValueError, match="calib_tokens"):
        sweep(model, tokens, taus=(), ks=(), static_fractions=(0.5,), window=16, stride=8, progress=False)


def test_text_tokens_with_a_tokenizer_object(tmp_path):
    # A Hugging Face-like tokenizer (encode + vocab_size) goes through prunepath_ops.train.data, whose
    # result is a TextTokens tuple: text_tokens must return its 1-D token tensor (demo --full on SmolLM2).
    from prunepath_ops.evaluate.data import text_tokens

    class CharTokenizer:
        vocab_size = 256

        def encode(self, text, add_special_tokens=False):
            return [ord(c) % 256 for c in text]

    path = tmp_path / "text.txt"
    path.write_text("".join(f"line {i}\n" for i in range(10)))
    tokens = text_tokens(str(path), CharTokenizer(), (0.0, 0.8))
    assert tokens.dtype == torch.int64 and tokens.dim() == 1
    assert tokens.tolist() == [ord(c) for c in "".join(f"line {i}\n" for i in range(8))]
