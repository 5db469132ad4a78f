"""KV-cache decoding (issue 4): ``Llama.decode_step`` against the dense oracle, ragged batches,
``tau`` as a device buffer, and (GPU) CUDA-graph generation.

The dense oracle is the same model with dense FFNs and SDPA attention: ``Llama.forward``
without a cache (causal over the whole sequence). Tiny random configurations, fp32 on the CPU.
Legend: B batch, T tokens, V vocab.
"""

from __future__ import annotations

import copy

import pytest
import torch

from prunepath_ops import PrunePathMLP, reference
from prunepath_ops.models import GraphedDecoder, LlamaConfig, generate, set_tau, to_prunepath
from prunepath_ops.models import llama as llama_mod
from prunepath_ops.testing import assert_close, random_llama

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ATTN = [
    pytest.param("sdpa", id="sdpa"),  # masked SDPA over the whole static cache
    pytest.param("kernel", id="kernel"),  # prunepath_ops.kv_decode_attention
]

ORACLE_ATTN = [
    *ATTN,
    pytest.param("reference", id="reference"),  # the readable reference swapped in for the op
]

CONFIGS = [
    pytest.param(LlamaConfig.tiny(), id="gqa"),  # Hq = 2 Hkv
    pytest.param(LlamaConfig.tiny(n_kv_heads=1, head_dim=32), id="mqa-headdim"),  # one kv head, D != d / H
    pytest.param(LlamaConfig.tiny(n_kv_heads=4, tie_embeddings=True), id="mha-tied"),  # no grouping
]


def _oracle(model, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Cache-free causal logits ``[T_b, V]`` of each sequence alone (dense SDPA path)."""
    model.clear_cache()
    return [model(r[None])[0] for r in rows]


def _random_router(model, seed: int = 0, std: float = 1.0) -> None:
    """Routers whose logits spread (zero routers make every expert equally likely)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.ffns():
            m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=gen) * std)


# -- decode_step against the oracle ----------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("attn", ORACLE_ATTN)
@torch.no_grad()
def test_decode_step_matches_oracle_every_step(cfg, attn, monkeypatch):
    if attn == "reference":
        monkeypatch.setattr(llama_mod, "_decode_attention_op", lambda: reference.kv_decode_attention)
        attn = "kernel"
    model = random_llama(cfg)
    B, T0, T = 3, 4, 14
    tokens = torch.randint(0, cfg.vocab, (B, T), generator=torch.Generator().manual_seed(1))
    full = model(tokens)  # [B, T, V], the oracle
    model.setup_cache(B, 32)
    assert_close(model(tokens[:, :T0], 0)[:, -1], full[:, T0 - 1])
    for t in range(T0, T):
        pos = torch.full((B,), t, dtype=torch.int32)
        assert_close(model.decode_step(tokens[:, t], pos, attn=attn), full[:, t], msg=f"step {t}")


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_cuda)]
)  # bf16: the Triton kernels on the GPU
@pytest.mark.parametrize("prunepath", [pytest.param(False, id="dense"), pytest.param(True, id="prunepath")])
@pytest.mark.parametrize("gemv", [pytest.param(False, id="cublas"), pytest.param(True, id="decode_linear")])
@torch.no_grad()
def test_fused_decode_step_matches_the_op_by_op_step(cfg, dtype, prunepath, gemv, monkeypatch):
    # gemv: the fused step's attention projections through decode_linear (Attention.decode_gemv),
    # here for the whole ragged batch of 3 (the model's default takes it for one token only).
    monkeypatch.setattr(llama_mod, "DECODE_GEMV_MAX_ROWS", 4)
    device = "cuda" if dtype == torch.bfloat16 else "cpu"
    model = random_llama(cfg, dtype=dtype, device=device)
    for layer in model.layers:
        layer.attn.decode_gemv = gemv
    if prunepath:
        to_prunepath(model, expert_width=16, tau=0.8, gate="sigmoid")
        _random_router(model)
        model.to(device)
    B, T = 3, 6
    tokens = torch.randint(0, cfg.vocab, (B, T), generator=torch.Generator().manual_seed(2)).to(device)
    lengths = torch.tensor([6, 3, 5], dtype=torch.int32, device=device)  # ragged positions
    outs = {}
    for fused in (False, True):
        model.fused_decode = fused
        model.setup_cache(B, 16)
        model(tokens, 0)  # prefill (SDPA): the same cache for both
        outs[fused] = [model.decode_step(tokens[:, t], lengths + t - 1, attn="kernel") for t in range(1, 4)]
    model.fused_decode = True
    for step, (a, b) in enumerate(zip(outs[False], outs[True], strict=True)):
        assert_close(b, a, dtype, msg=f"step {step}")
        assert torch.equal(b.argmax(-1), a.argmax(-1))


@pytest.mark.parametrize(
    "dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_cuda)]
)  # bf16: the Triton kernels on the GPU
@torch.no_grad()
def test_rope_inside_attention_gives_the_bits_of_rope_qkv(dtype):
    # Attention.rope_in_attention (the default): kv_decode_attention rotates q and k itself; False:
    # rope_qkv's launch first. Same logits and the same cache, bit for bit, over ragged positions.
    device = "cuda" if dtype == torch.bfloat16 else "cpu"
    cfg = LlamaConfig.tiny()
    model = random_llama(cfg, dtype=dtype, device=device)
    B, T = 3, 6
    tokens = torch.randint(0, cfg.vocab, (B, T), generator=torch.Generator().manual_seed(4)).to(device)
    lengths = torch.tensor([6, 3, 5], dtype=torch.int32, device=device)
    outs, caches = {}, {}
    for inside in (True, False):
        for layer in model.layers:
            layer.attn.rope_in_attention = inside
        model.setup_cache(B, 16)
        model(tokens, 0)  # prefill (SDPA): the same cache for both
        outs[inside] = [model.decode_step(tokens[:, t], lengths + t - 1, attn="kernel") for t in range(1, 4)]
        caches[inside] = model.layers[0].attn.kv_cache.k.clone()
    for layer in model.layers:
        layer.attn.rope_in_attention = True
    for a, b in zip(outs[True], outs[False], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(caches[True], caches[False])


@pytest.mark.parametrize("attn", ATTN)
@torch.no_grad()
def test_ragged_batch_matches_unbatched_sequences(attn):
    cfg = LlamaConfig.tiny()
    model = random_llama(cfg, seed=3)
    gen = torch.Generator().manual_seed(2)
    # Lengths: 1 (a one-token prompt), a middle one, and the padded width itself (no padding).
    lengths, T, steps = [1, 5, 9], 9, 6
    seqs = [torch.randint(0, cfg.vocab, (n + steps,), generator=gen) for n in lengths]
    ref = _oracle(model, seqs)
    # Random (not constant) padding: its keys land in the cache and must stay invisible.
    prompt = torch.randint(0, cfg.vocab, (len(lengths), T), generator=gen)
    for b, n in enumerate(lengths):
        prompt[b, :n] = seqs[b][:n]
    lens = torch.tensor(lengths)
    model.setup_cache(len(lengths), 24)
    last = model(prompt, 0, last_index=lens - 1)[:, 0]  # [B, V]
    for b, n in enumerate(lengths):
        assert_close(last[b], ref[b][n - 1], msg=f"prefill row {b}")
    for i in range(steps):
        pos = (lens + i).to(torch.int32)
        tok = torch.stack([seqs[b][n + i] for b, n in enumerate(lengths)])
        logits = model.decode_step(tok, pos, attn=attn)
        for b, n in enumerate(lengths):
            assert_close(logits[b], ref[b][n + i], msg=f"step {i} row {b}")


@pytest.mark.parametrize("attn", ATTN)
@torch.no_grad()
def test_ragged_generate_equals_per_sequence_generate(attn):
    cfg = LlamaConfig.tiny()
    model = random_llama(cfg, seed=4)
    gen = torch.Generator().manual_seed(5)
    lengths, T, N = [3, 7, 2], 7, 8
    prompt = torch.randint(0, cfg.vocab, (3, T), generator=gen)
    out = generate(model, prompt, N, prompt_lengths=torch.tensor(lengths), pad_token_id=-1, attn=attn)
    assert out.shape == (3, T + N)
    for b, n in enumerate(lengths):
        alone = generate(model, prompt[b, :n], N, attn=attn)  # [n + N]
        assert torch.equal(out[b, : n + N], alone), b
        assert (out[b, n + N :] == -1).all()
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(model, prompt, 2, prompt_lengths=torch.tensor([3, 8, 2]))  # longer than the padded width


# -- PrunePath FFNs ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "expert_width,permuted",
    [
        pytest.param(32, False, id="S32"),  # 4 experts per layer
        pytest.param(16, True, id="S16-permuted"),  # 8 experts, neurons regrouped across experts
    ],
)
@pytest.mark.parametrize("attn", ATTN)
@torch.no_grad()
def test_prunepath_all_experts_gate_one_matches_dense_oracle(expert_width, permuted, attn):
    cfg = LlamaConfig.tiny()
    model = random_llama(cfg, seed=6)
    B, T0, T, N = 2, 3, 10, 10
    tokens = torch.randint(0, cfg.vocab, (B, T), generator=torch.Generator().manual_seed(7))
    full = model(tokens)  # dense oracle
    dense_gen = generate(model, tokens[:, :T0], N, attn="sdpa")
    perms = [torch.randperm(cfg.ffn) for _ in range(cfg.n_layers)] if permuted else None
    to_prunepath(model, expert_width, perms, tau=1.05, gate="one")
    _random_router(model)  # tau >= 1 keeps every expert whatever the router says
    model.setup_cache(B, 32)
    model(tokens[:, :T0], 0)
    for t in range(T0, T):
        logits = model.decode_step(tokens[:, t], torch.full((B,), t, dtype=torch.int32), attn=attn)
        assert_close(logits, full[:, t], msg=f"step {t}")
    assert torch.equal(generate(model, tokens[:, :T0], N, attn=attn), dense_gen)


@pytest.mark.parametrize("attn", ATTN)
@torch.no_grad()
def test_tau_change_takes_effect_in_decode(attn):
    cfg = LlamaConfig.tiny()
    model = random_llama(cfg, seed=8)
    to_prunepath(model, 16, tau=1.05, gate="sigmoid")
    _random_router(model, seed=1)
    at_03 = copy.deepcopy(model)
    set_tau(at_03, 0.3)  # the float API, set before any forward
    B, T = 2, 6
    tokens = torch.randint(0, cfg.vocab, (B, T + 1), generator=torch.Generator().manual_seed(9))
    pos = torch.full((B,), T, dtype=torch.int32)

    def step(m):
        m.setup_cache(B, 16)
        m(tokens[:, :T], 0)
        return m.decode_step(tokens[:, T], pos, attn=attn)

    buffers = [m.tau_tensor for m in model.ffns()]
    wide = step(model)
    set_tau(model, 0.3)  # between two decode steps of the same model
    assert [m.tau_tensor for m in model.ffns()] == buffers  # the same tensors, filled in place
    assert all(m.tau == 0.3 and m.tau_tensor.item() == pytest.approx(0.3) for m in model.ffns())
    narrow = step(model)
    assert not torch.allclose(narrow, wide, atol=1e-3)
    torch.testing.assert_close(narrow, step(at_03), atol=0, rtol=0)


# -- sampling --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        pytest.param(dict(temperature=1.0), id="plain"),  # the exponential race over the whole vocab
        pytest.param(dict(temperature=0.8, top_k=20, top_p=0.9), id="top_k-top_p"),  # masked before the race
    ],
)
@torch.no_grad()
def test_sampling_with_a_seeded_generator_is_reproducible(kw):
    cfg = LlamaConfig.tiny()
    model = random_llama(cfg, seed=10, std=0.05)  # flatter logits: sampling has choices
    to_prunepath(model, 32, tau=0.7)
    _random_router(model, seed=2)
    prompt = torch.randint(0, cfg.vocab, (2, 4), generator=torch.Generator().manual_seed(11))

    def run(seed, attn="kernel"):
        return generate(model, prompt, 12, generator=torch.Generator().manual_seed(seed), attn=attn, **kw)

    first = run(0)
    assert torch.equal(first, run(0))
    assert torch.equal(first, run(0, attn="sdpa"))  # the attention path does not change the draws
    assert not torch.equal(first, run(1))


# -- tau as a device buffer ----------------------------------------------------------------------
def _mlp(tau: float = 0.5) -> PrunePathMLP:
    from prunepath_ops.models import LlamaMLP

    torch.manual_seed(0)
    mlp = PrunePathMLP.from_dense(LlamaMLP(24, 64), 16, tau=tau, gate="sigmoid")
    with torch.no_grad():
        mlp.router.weight.normal_(0.0, 1.0)
    return mlp


def test_tau_buffer_is_fp32_not_saved_and_survives_casts():
    mlp = _mlp(0.3)
    assert mlp.tau == 0.3 and isinstance(mlp.tau, float)
    assert mlp.tau_tensor.dtype == torch.float32 and mlp.tau_tensor.shape == (1,)
    assert "tau_tensor" not in mlp.state_dict()  # checkpoints keep their keys
    mlp.to(torch.bfloat16)  # casts every float buffer, but tau must stay exact fp32
    assert mlp.tau_tensor.dtype == torch.float32 and mlp.tau_tensor.item() == torch.tensor(0.3).item()
    assert mlp.w_in.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="NaN"):
        mlp.tau = float("nan")
    with torch.inference_mode():
        made_in_inference = _mlp(0.4)
    made_in_inference.tau = 0.2  # an inference-mode buffer is still settable outside it
    assert made_in_inference.tau_tensor.item() == pytest.approx(0.2)


@torch.no_grad()
def test_compiled_module_follows_tau_without_recompiling():
    mlp = _mlp(0.9)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    outs = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for tau in (0.9, 0.2, 1.05):
            mlp.tau = tau
            outs[tau] = compiled(x)
            torch.testing.assert_close(outs[tau], mlp(x), atol=0, rtol=0)
    assert not torch.allclose(outs[1.05], outs[0.2], atol=1e-4)


@torch.no_grad()
def test_compiled_decode_generates_the_eager_tokens():
    # torch.compile(fullgraph=True) over the whole step: the custom ops (attention with its in-place
    # cache append, routing, sparse FFN) stay opaque nodes and Inductor compiles what lies between.
    model = random_llama(LlamaConfig.tiny(), seed=3)
    to_prunepath(model, 16, tau=0.6)
    _random_router(model, seed=3, std=0.05)  # several experts per token at tau 0.6
    prompt = torch.randint(0, model.config.vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    eager = generate(model, prompt, 6)
    assert torch.equal(generate(model, prompt, 6, compile=True), eager)


def test_decode_step_and_graphed_decoder_errors():
    model = random_llama(LlamaConfig.tiny())
    pos = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="setup_cache"):
        model.decode_step(torch.zeros(1, dtype=torch.long), pos)
    model.setup_cache(1, 8)
    with pytest.raises(ValueError, match="attn"):
        model.decode_step(torch.zeros(1, dtype=torch.long), pos, attn="flash")
    with pytest.raises(ValueError, match="CUDA"):
        GraphedDecoder(model)
    with pytest.raises(ValueError, match="cuda_graph"):
        generate(model, torch.tensor([1, 2]), 3, cuda_graph=True)


# -- GPU: CUDA graphs ------------------------------------------------------------------------------
GPU_ATTN = [
    pytest.param("sdpa", id="sdpa"),
    pytest.param("kernel", id="kernel"),  # the op (the reference reads lengths on the host: not capturable)
]


def _gpu_model(dtype, prunepath: bool, seed: int = 0):
    cfg = LlamaConfig.tiny(max_seq_len=128)
    model = random_llama(cfg, seed=seed)
    if prunepath:
        to_prunepath(model, 16, tau=0.6)
        _random_router(model, seed=seed)
    return model.to(device="cuda", dtype=dtype), cfg


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prunepath", [pytest.param(False, id="dense"), pytest.param(True, id="prunepath")])
@pytest.mark.parametrize("attn", GPU_ATTN)
@torch.no_grad()
def test_gpu_cuda_graph_generate_equals_eager(dtype, prunepath, attn):
    model, cfg = _gpu_model(dtype, prunepath)
    gen = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(0, cfg.vocab, (3, 7), device="cuda", generator=gen)
    lengths = torch.tensor([7, 2, 5], device="cuda")  # ragged: decode positions differ per row
    for kw in (dict(), dict(prompt_lengths=lengths), dict(temperature=1.0, top_k=30)):

        def run(cuda_graph, compile=False, kw=kw):
            g = torch.Generator(device="cuda").manual_seed(1)
            return generate(model, prompt, 20, attn=attn, cuda_graph=cuda_graph, compile=compile, generator=g, **kw)

        eager = run(False)
        assert torch.equal(run(True), eager), kw
        if dtype == torch.float32 and not kw:  # greedy fp32: Inductor's fused kernels round bf16 differently
            assert torch.equal(run(True, compile=True), eager), kw


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("attn", GPU_ATTN)
@torch.no_grad()
def test_gpu_tau_change_between_replays_without_recapture(attn):
    model, cfg = _gpu_model(torch.float32, prunepath=True, seed=2)
    # Near-uniform router logits (8 experts): tau 0.5 keeps about 3 experts, tau 0 one. With
    # peaked logits both keep only the top expert and the outputs cannot differ.
    _random_router(model, seed=2, std=0.05)
    B, T = 2, 6
    tokens = torch.randint(0, cfg.vocab, (B, T + 1), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    pos = torch.full((B,), T, dtype=torch.int32, device="cuda")
    model.setup_cache(B, 32)
    decoder = GraphedDecoder(model, attn)
    model(tokens[:, :T], 0)
    results = {}
    for tau in (1.05, 0.5, 0.0):  # every expert, some, one per token
        set_tau(model, tau)
        replayed = decoder(tokens[:, T], pos).clone()  # rewrites the same cache row each time
        eager = model.decode_step(tokens[:, T], pos, attn=attn)
        assert_close(replayed, eager, msg=f"tau {tau}")
        results[tau] = replayed
    assert not torch.allclose(results[1.05], results[0.5], atol=1e-3)
    assert not torch.allclose(results[0.5], results[0.0], atol=1e-3)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("attn", GPU_ATTN)
@torch.no_grad()
def test_gpu_eager_generate_does_not_synchronise(attn):
    model, cfg = _gpu_model(torch.bfloat16, prunepath=True, seed=3)
    prompt = torch.randint(0, cfg.vocab, (2, 5), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    generate(model, prompt, 4, attn=attn)  # lazy initialisation and Triton compilation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        generate(model, prompt, 16, attn=attn, temperature=1.0, top_p=0.9)
    finally:
        torch.cuda.set_sync_debug_mode("default")
