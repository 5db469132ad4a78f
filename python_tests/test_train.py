"""Router training (issue 5): the differentiable FFN path, the training loop, the data helper."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunepath_ops import PrunePathMLP, reference, sparse_ffn
from prunepath_ops.modules import masked_expert_ffn
from prunepath_ops.train import (
    TrainConfig,
    differentiable_ffns,
    evaluate,
    find_default_text,
    is_finite,
    line_range,
    load_text_tokens,
    prunepath_mlps,
    record_router_logits,
    train_routers,
)

try:
    from prunepath_ops.models import Llama, LlamaConfig, to_prunepath
except ImportError:  # pragma: no cover
    pytest.skip("prunepath_ops.models unavailable", allow_module_level=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one intra-op thread is faster, and far faster on a busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


class GatedFFN(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj, self.act_fn = nn.Linear(f, d, bias=False), nn.SiLU()


class PlainFFN(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(d, f), nn.Linear(f, d), nn.GELU()


def _mlp(kind: str, d: int = 24, f: int = 128, S: int = 16, seed: int = 0, **kw) -> PrunePathMLP:
    torch.manual_seed(seed)
    dense = GatedFFN(d, f) if kind == "gated" else PlainFFN(d, f)
    perm = torch.randperm(f)
    router = torch.randn(f // S, d)
    return PrunePathMLP.from_dense(dense, S, perm, router_weight=router, **kw)


def _tiny_model(seed: int = 0, S: int = 16, **cfg) -> Llama:
    torch.manual_seed(seed)
    model = Llama(LlamaConfig.tiny(**cfg))
    to_prunepath(model, S)
    return model


# -- the differentiable path -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gated", "plain"])
@pytest.mark.parametrize("gate", ["sigmoid", "prob", "renorm"])
@pytest.mark.parametrize("tau", [0.0, 0.3, 0.7, 0.95, 1.05])
def test_differentiable_path_equals_sparse_ffn(kind, gate, tau):
    mlp = _mlp(kind, gate=gate, tau=tau)
    x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_sparse = mlp(x)
        route = mlp.route(x.reshape(-1, 24))
        y_ref = sparse_ffn(x.reshape(-1, 24), route, mlp.packed, backend="torch").view(x.shape)
    mlp.differentiable = True
    y_diff = mlp(x)
    assert y_diff.requires_grad  # the router weight requires grad
    torch.testing.assert_close(y_diff.detach(), y_sparse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_diff.detach(), y_ref, rtol=1e-5, atol=1e-5)


def test_auto_mode_and_context_manager():
    mlp = _mlp("gated", tau=0.5)
    x = torch.randn(5, 24)
    mlp.differentiable = "auto"
    with torch.no_grad():
        assert not mlp._use_differentiable(x)
    assert mlp._use_differentiable(x)  # grad mode on, the router requires grad
    mlp.differentiable = False
    with differentiable_ffns([mlp]):
        assert mlp.differentiable is True
    assert mlp.differentiable is False
    mlp.differentiable = "sometimes"
    with pytest.raises(ValueError, match="differentiable"):
        mlp(x)


def _dense_reference(mlp: PrunePathMLP, x: torch.Tensor, w_in: torch.Tensor, w_down: torch.Tensor):
    """The reference oracle: masked_dense_ffn on unpacked weights with reference.topp_gates."""
    E, S, d = mlp.w_down.shape
    logits = x @ mlp.router.weight.t()
    with torch.no_grad():
        ids, _, n = reference.topp_route(logits, mlp.tau, gate=mlp.gate)
    gates = reference.topp_gates(logits, ids, mlp.gate)
    wg, wu = w_in[:, :S].reshape(E * S, d), w_in[:, S:].reshape(E * S, d)
    wd = w_down.reshape(E * S, d).t()
    return reference.masked_dense_ffn(x, wg, wd, ids, gates, n, S, w_up=wu)


@pytest.mark.parametrize("gate", ["sigmoid", "prob"])
def test_gradients_match_reference_autograd(gate):
    mlp = _mlp("gated", gate=gate, tau=0.6, differentiable=True)
    for t in (mlp.w_in, mlp.w_down):
        t.requires_grad_(True)
    x = torch.randn(7, 24, generator=torch.Generator().manual_seed(2), requires_grad=True)
    probe = torch.randn(7, 24, generator=torch.Generator().manual_seed(3))

    (mlp(x) * probe).sum().backward()
    ours = [mlp.router.weight.grad.clone(), x.grad.clone(), mlp.w_in.grad.clone(), mlp.w_down.grad.clone()]
    assert ours[0].abs().sum() > 0  # the task loss reaches the router

    for t in (mlp.router.weight, x, mlp.w_in, mlp.w_down):
        t.grad = None
    (_dense_reference(mlp, x, mlp.w_in, mlp.w_down) * probe).sum().backward()
    ref = [mlp.router.weight.grad, x.grad, mlp.w_in.grad, mlp.w_down.grad]
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["gated", "plain"])
@pytest.mark.parametrize("tau", [0.5, 1.05])  # some experts / every expert
def test_straight_through_gates_keep_gate_one_values_and_train_the_router(kind, tau):
    x = torch.randn(7, 24, generator=torch.Generator().manual_seed(2))
    probe = torch.randn(7, 24, generator=torch.Generator().manual_seed(3))
    one = _mlp(kind, gate="one", tau=tau, differentiable=True)
    st = _mlp(kind, gate="one", tau=tau, differentiable=True, straight_through=True)
    prob = _mlp(kind, gate="prob", tau=tau, differentiable=True)  # same seed: same weights and router
    y_one, y_st = one(x), st(x)
    assert torch.equal(y_st, y_one)  # the values of gate one, bit for bit
    (y_one * probe).sum().backward()
    assert one.router.weight.grad is None or not one.router.weight.grad.any()  # gate one: no task gradient
    (y_st * probe).sum().backward()
    (prob(x) * probe).sum().backward()
    # The loss is linear in each gate, so dL/dgate does not depend on the gate's value: the
    # straight-through router gradient is exactly that of gate "prob" (same selection).
    assert st.router.weight.grad.abs().sum() > 0
    torch.testing.assert_close(st.router.weight.grad, prob.router.weight.grad, rtol=1e-5, atol=1e-6)


def test_straight_through_needs_gate_one():
    mlp = _mlp("gated", gate="sigmoid", tau=0.5, differentiable=True, straight_through=True)
    with pytest.raises(ValueError, match="straight_through needs gate='one'"):
        mlp(torch.randn(3, 24))


def test_masked_ffn_gradcheck_fp64():
    """Finite differences w.r.t. the gates, the input and the weights of the masked FFN (fixed selection)."""
    g = torch.Generator().manual_seed(4)
    E, S, d, T, K = 3, 2, 4, 3, 3
    x = torch.randn(T, d, dtype=torch.float64, generator=g, requires_grad=True)
    w_in = torch.randn(E, 2 * S, d, dtype=torch.float64, generator=g, requires_grad=True)
    w_down = torch.randn(E, S, d, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.tensor([[2, 0, -1], [1, -1, -1], [0, 1, 2]], dtype=torch.int32)
    n = torch.tensor([2, 1, 3], dtype=torch.int32)
    gates = torch.rand(T, K, dtype=torch.float64, generator=g).requires_grad_(True)

    def f(x, w_in, w_down, gates):
        packed = reference_packed(w_in, w_down)
        return masked_expert_ffn(x, (ids, gates, n), packed)

    assert torch.autograd.gradcheck(f, (x, w_in, w_down, gates))


def reference_packed(w_in, w_down):
    from prunepath_ops.ffn.packing import PackedExperts

    return PackedExperts(w_in, w_down, None, None, True, "silu")


def test_router_logits_recorded_once_per_layer():
    model = _tiny_model()
    mlps = prunepath_mlps(model)
    with record_router_logits(mlps) as rec, differentiable_ffns(model):
        model(torch.randint(0, 128, (2, 5)))
    assert [len(r) for r in rec] == [1, 1]
    assert rec[0][0].shape == (10, mlps[0].w_down.shape[0]) and rec[0][0].requires_grad


# -- the training loop -------------------------------------------------------------------------
def _pattern_stream(length: int = 600, period: int = 12, seed: int = 0) -> torch.Tensor:
    pattern = torch.randint(0, 128, (period,), generator=torch.Generator().manual_seed(seed))
    return pattern.repeat(length // period + 1)[:length]


def test_training_with_backbone_memorises():
    model = _tiny_model()
    cfg = TrainConfig(steps=20, seq_len=16, batch_size=2, lr_backbone=1e-2, train_backbone=True, tau_min=0.8,
                      progress=False)  # fmt: skip
    stats = train_routers(model, _pattern_stream(), cfg)
    ce = stats.column("ce")
    assert all(is_finite(r) for r in stats.history)
    assert ce[0] > 4.0 and max(ce[-3:]) < 0.5, ce  # log(128) = 4.85 at the start; the period-12 stream is learnt
    # Every flag restored: buffers back to no grad, parameters back to requires_grad.
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m.w_in.requires_grad or m.w_down.requires_grad for m in prunepath_mlps(model))


def test_routers_only_freezes_backbone_and_follows_tau():
    model = _tiny_model().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(steps=20, seq_len=16, batch_size=2, warmup_frac=0.25, tau_min=0.5, gamma=1e-3,
                      progress=True, log_every=5)  # fmt: skip
    seen = []
    stats = train_routers(model, torch.randint(0, 128, (500,)), cfg, callback=seen.append)
    assert len(seen) == len(stats.history) == 20
    assert all(is_finite(r) for r in stats.history)
    schedule = cfg.tau_schedule()
    assert stats.column("tau") == [schedule(i) for i in range(20)]
    assert stats.history[-1].tau == pytest.approx(0.5)
    assert [r.tau for r in stats.history[:5]] == [1.05] * 5 and stats.history[6].tau < 1.05
    warm = [r.sparsity for r in stats.history[:5]]
    assert max(warm) == 0.0
    assert stats.history[-1].sparsity > max(warm)
    assert stats.history[-1].sparsity > 0.2
    after = model.state_dict()
    for k, v in before.items():
        if k.endswith("router.weight"):
            assert not torch.equal(v, after[k]), k  # the routers learned
        else:
            assert torch.equal(v, after[k]), k  # the backbone did not move
    assert all(m.tau == pytest.approx(0.5) and m.differentiable is False for m in prunepath_mlps(model))
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert not model.training  # eval mode restored


def test_distillation_from_the_dense_teacher():
    # KL(teacher || model) is 0 at the start of a dense (tau >= 1, gate one) run: the teacher is the
    # model itself with every expert; with tau < 1 the sparse model differs and the KL is positive.
    tokens = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(8))
    model = _tiny_model(seed=3)
    for m in prunepath_mlps(model):
        m.gate = "one"
    cfg = TrainConfig(steps=4, seq_len=12, batch_size=2, warmup_frac=0.5, tau_min=0.3, distill=0.5, progress=False)
    stats = train_routers(model, tokens, cfg)
    kl = stats.column("kl")
    assert kl[0] == pytest.approx(0.0, abs=1e-5)  # warm-up: every expert, gates 1 = the teacher
    assert kl[-1] > 1e-4  # tau 0.3: the routed model departs from the teacher
    r = stats.history[-1]
    assert r.loss == pytest.approx(0.5 * r.ce + 0.5 * r.kl + cfg.eta * r.ent + cfg.lam * r.bal, rel=1e-6)
    with pytest.raises(ValueError, match="distill"):
        TrainConfig(steps=1, distill=1.5)


def test_uniform_tau_sampling_is_seeded_and_in_range():
    tokens = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(9))
    cfg = TrainConfig(steps=12, seq_len=8, batch_size=1, warmup_frac=0.25, tau_min=0.4, tau_sampling="uniform",
                      progress=False)  # fmt: skip
    taus = [train_routers(_tiny_model(seed=4), tokens, cfg).column("tau") for _ in range(2)]
    assert taus[0] == taus[1]
    assert taus[0][:3] == [1.05] * 3  # warm-up
    rest = taus[0][3:]
    assert all(0.4 <= t <= 1.0 for t in rest) and len(set(rest)) == len(rest)  # drawn, not a schedule
    with pytest.raises(ValueError, match="tau_sampling"):
        TrainConfig(steps=1, tau_sampling="cosine")


def test_validation_restores_the_best_step():
    # eval_every: the validation CE is measured every 2 steps and the best weights come back at the
    # end; they equal a plain run stopped at that step (validation draws nothing from the sampler).
    tokens = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(10))
    val = _pattern_stream(200, period=7, seed=3)
    common = dict(steps=6, seq_len=12, batch_size=2, warmup_frac=0.0, tau_min=0.4, train_backbone=True,
                  lr_backbone=5e-2, lr_router=5e-2, progress=False)  # fmt: skip
    model = _tiny_model(seed=5)
    stats = train_routers(model, tokens, TrainConfig(eval_every=2, val_windows=4, **common), val_tokens=val)
    assert [s for s, _ in stats.validation] == [2, 4, 6]
    assert stats.best_step == min(stats.validation, key=lambda v: v[1])[0]
    plain = _tiny_model(seed=5)
    train_routers(plain, tokens, TrainConfig(**common), callback=lambda r: r.step + 1 == stats.best_step)
    for a, b in zip(model.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert all(m.tau == pytest.approx(0.4) for m in prunepath_mlps(model))  # tau as training left it
    with pytest.raises(ValueError, match="val_taus"):
        TrainConfig(steps=1, val_taus=(2.0,))


def test_validation_at_fixed_sparsity():
    # val_sparsities: the validation CE is taken at the global tau that bisection finds for each
    # target s_FFN on the validation tokens (not at fixed taus), and the modules' tau comes back.
    from prunepath_ops.convert import calibrate_tau
    from prunepath_ops.train.trainer import _validation_ce, evaluate

    model = _tiny_model(seed=6)
    mlps = prunepath_mlps(model)
    with torch.no_grad():
        for m in mlps:  # near-uniform routers over E = 8: each token keeps ~tau * 8 experts
            m.router.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(2))
            m.tau = 0.77
    val = _pattern_stream(200, period=7, seed=3)
    cfg = TrainConfig(steps=1, seq_len=12, batch_size=2, eval_every=1, val_windows=4, val_sparsities=(0.25, 0.5),
                      progress=False)  # fmt: skip

    def at(tau):
        for m in mlps:
            m.tau = tau
        return evaluate(model, val, 12, batch_size=2, max_windows=4)

    expected = []
    for target in (0.25, 0.5):  # two and four of the 8 experts dropped
        res = calibrate_tau(lambda t: at(t)["sparsity"], target)
        assert abs(res.sparsity - target) <= 0.01
        expected.append(at(res.tau)["ce"])
    for m in mlps:
        m.tau = 0.77
    assert _validation_ce(model, mlps, val, cfg) == pytest.approx(sum(expected) / 2, rel=0, abs=0)
    assert all(m.tau == 0.77 for m in mlps)
    with pytest.raises(ValueError, match="val_sparsities"):
        TrainConfig(steps=1, val_sparsities=(1.0,))  # every expert gone is not a target


def test_callback_stops_early():
    model = _tiny_model()
    stats = train_routers(model, torch.randint(0, 128, (200,)), TrainConfig(steps=10, seq_len=8, batch_size=1,
                          progress=False), callback=lambda r: r.step == 2)  # fmt: skip
    assert len(stats.history) == 3


def test_grad_accumulation_equals_double_batch():
    base = _tiny_model(seed=1)
    base.layers[0].ffn.router.weight.data.normal_(0, 0.5)  # not at the uniform stationary point
    tokens = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(5))
    common = dict(steps=2, seq_len=12, lam=0.0, eta=1e-2, gamma=1e-2, tau_min=0.6, warmup_frac=0.0,
                  train_backbone=True, progress=False)  # fmt: skip
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    sa = train_routers(a, tokens, TrainConfig(batch_size=4, grad_accum=1, **common))
    sb = train_routers(b, tokens, TrainConfig(batch_size=2, grad_accum=2, **common))
    for ra, rb in zip(sa.history, sb.history, strict=True):
        assert ra.ce == pytest.approx(rb.ce, rel=1e-5)
        assert ra.ent == pytest.approx(rb.ent, rel=1e-5)
        assert ra.grad_norm == pytest.approx(rb.grad_norm, rel=1e-4)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-6, msg=k)


def test_deterministic_for_a_seed():
    tokens = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(6))
    cfg = TrainConfig(steps=6, seq_len=10, batch_size=2, warmup_frac=0.5, progress=False, seed=3)
    runs = []
    for _ in range(2):
        model = _tiny_model(seed=2)
        stats = train_routers(model, tokens, cfg)
        runs.append(([m.router.weight.detach().clone() for m in prunepath_mlps(model)], stats.column("loss")))
    assert all(torch.equal(x, y) for x, y in zip(runs[0][0], runs[1][0], strict=True))
    assert runs[0][1] == runs[1][1]


def test_kv_cache_is_kept():
    model = _tiny_model()
    model.setup_cache(batch=1, max_seq_len=32)
    caches = [layer.attn.kv_cache for layer in model.layers]
    train_routers(model, torch.randint(0, 128, (100,)), TrainConfig(steps=1, seq_len=8, batch_size=1, progress=False))
    assert [layer.attn.kv_cache for layer in model.layers] == caches


def test_bad_inputs():
    model = _tiny_model()
    with pytest.raises(ValueError, match="fewer than"):
        train_routers(model, torch.arange(5), TrainConfig(steps=1, seq_len=8, progress=False))
    with pytest.raises(ValueError, match="1-D"):
        train_routers(model, torch.zeros(2, 50, dtype=torch.long), TrainConfig(steps=1, seq_len=8, progress=False))
    with pytest.raises(ValueError, match="no PrunePathMLP"):
        train_routers(Llama(LlamaConfig.tiny()), torch.arange(50), TrainConfig(steps=1, seq_len=8, progress=False))
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


def test_evaluate_reports_ce_and_sparsity():
    tokens = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(7))
    dense = Llama(LlamaConfig.tiny())
    r = evaluate(dense, tokens, 16, batch_size=3, max_windows=5)
    assert r["windows"] == 5 and r["tokens"] == 80 and r["sparsity"] == 0.0 and r["ppl"] > 1.0
    model = _tiny_model()
    for m in prunepath_mlps(model):
        m.tau = 1.05
    assert evaluate(model, tokens, 16)["sparsity"] == 0.0
    for m in prunepath_mlps(model):
        m.tau = 0.0  # one expert of 8 per token
    assert evaluate(model, tokens, 16)["sparsity"] == pytest.approx(7 / 8)


# -- data --------------------------------------------------------------------------------------
def test_line_range_splits_are_disjoint():
    assert line_range(3760, (0.0, 0.8)) == (0, 3008)
    assert line_range(3760, (0.8, 1.0)) == (3008, 3760)
    assert line_range(7, (0.0, 0.8))[1] == line_range(7, (0.8, 1.0))[0]
    with pytest.raises(ValueError):
        line_range(10, (0.5, 0.2))


def test_load_text_tokens(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("".join(f"line {i}\n" for i in range(10)), encoding="utf-8")

    def tokenizer(text: str) -> list[int]:
        return [int(w) for w in text.split() if w.isdigit()]

    train = load_text_tokens(path, tokenizer)
    held_out = load_text_tokens(path, tokenizer, split=(0.8, 1.0))
    assert train.tokens.tolist() == list(range(8)) and train.tokens.dtype == torch.long
    assert held_out.tokens.tolist() == [8, 9]
    assert (train.first_line, train.stop_line, train.num_lines) == (0, 8, 10)
    assert held_out.describe() == "text.txt lines 9-10 of 10 (2 tokens)"


def test_find_default_text():
    path = find_default_text()
    assert path is None or path.replace("\\", "/").endswith("shared/data/wikitext-2/valid.txt")
