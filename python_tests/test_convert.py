"""Dense FFN -> PrunePathMLP conversion (issue 5): permutation identity, families, model walk, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunepath_ops as pp
from prunepath_ops.convert import ConversionError, balanced_kmeans, check_identity, convert_mlp, convert_model
from prunepath_ops.models.llama import LlamaMLP
from prunepath_ops.testing import PlainMLP


def dense_vs_converted(mlp, converted, d, dtype=torch.float32):
    x = torch.randn(7, d, generator=torch.Generator().manual_seed(5)).to(dtype)
    converted.tau, converted.gate = 1.05, "one"
    mlp.eval()
    with torch.no_grad():
        return mlp(x).float(), converted(x).float()


@pytest.mark.parametrize(
    "make,S",
    [
        (lambda: LlamaMLP(16, 64), 16),  # typical gated (silu)
        (lambda: LlamaMLP(16, 64), 64),  # edge: one expert
        (lambda: PlainMLP(16, 96, nn.ReLU(), dropout=0.5), 32),  # plain, relu, biases
        (lambda: PlainMLP(16, 64, nn.GELU(), dropout=0.5), 16),  # plain, exact gelu
        (lambda: PlainMLP(16, 64, nn.GELU(approximate="tanh"), dropout=0.5), 16),  # plain, tanh gelu
    ],
)
def test_identity_all_experts(make, S):
    torch.manual_seed(0)
    mlp = make()
    training = mlp.training
    converted, perm = convert_mlp(mlp, S, seed=3)
    assert mlp.training == training  # the check restores the mode
    assert converted.tau == 1.05 and converted.gate == "sigmoid"  # and the module's settings
    assert torch.count_nonzero(converted.router.weight) == 0  # zero-initialised router (SPEC 2)
    w_in = mlp.gate_proj.weight if hasattr(mlp, "gate_proj") else mlp.fc1.weight
    assert torch.equal(perm, balanced_kmeans(w_in, S, seed=3).permutation)  # k-means on Wg / Wi
    y, y_split = dense_vs_converted(mlp, converted, 16)
    torch.testing.assert_close(y_split, y, rtol=1e-5, atol=1e-5)


def test_permutation_is_applied():
    # The packed rows are the dense rows in permutation order (not the identity).
    torch.manual_seed(0)
    mlp = LlamaMLP(8, 64)
    converted, perm = convert_mlp(mlp, 16, seed=0)
    assert not torch.equal(perm, torch.arange(64))
    S = 16
    torch.testing.assert_close(converted.w_in[:, :S].reshape(64, 8), mlp.gate_proj.weight[perm].detach())
    torch.testing.assert_close(converted.w_down.reshape(64, 8), mlp.down_proj.weight[:, perm].t().detach())


def test_hf_modules():
    # Real transformers modules: LlamaMLP (SiLUActivation) and GPT2MLP (Conv1D, gelu_new = tanh gelu).
    from transformers import GPT2Config, LlamaConfig
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    from transformers.models.llama.modeling_llama import LlamaMLP as HFLlamaMLP

    torch.manual_seed(0)
    llama = HFLlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=64, num_attention_heads=2))
    gpt2 = GPT2MLP(64, GPT2Config(n_embd=16))
    for mlp, act in ((llama, "silu"), (gpt2, "gelu_tanh")):
        converted, _ = convert_mlp(mlp, 16)
        assert converted.act == act
        y, y_split = dense_vs_converted(mlp, converted, 16)
        torch.testing.assert_close(y_split, y, rtol=1e-5, atol=1e-5)
    # Forcing the wrong activation must be caught by the identity check (gelu vs gelu_tanh is subtle).
    with pytest.raises(ConversionError, match="identity check failed"):
        convert_mlp(gpt2, 16, act="gelu")


@pytest.mark.parametrize(
    "act",
    [
        "gelu",  # edge: relu module converted as gelu: a gross mismatch
        "silu",  # edge: relu vs silu
    ],
)
def test_wrong_activation_raises(act):
    torch.manual_seed(0)
    with pytest.raises(ConversionError, match="identity check failed"):
        convert_mlp(PlainMLP(16, 64, nn.ReLU(), dropout=0.5), 16, act=act)
    convert_mlp(PlainMLP(16, 64, nn.ReLU(), dropout=0.5), 16, act=act, check=False)  # the check can be skipped


def test_check_detects_corrupted_weights():
    # Edge: a converted module whose packed weights were altered after conversion.
    torch.manual_seed(0)
    mlp = LlamaMLP(16, 64)
    converted, _ = convert_mlp(mlp, 16)
    with torch.no_grad():
        converted.w_down[1, 3] += 0.5
    with pytest.raises(ConversionError):
        check_identity(mlp, converted)


def test_identity_tolerance_knows_tf32(monkeypatch):
    # fp32 matmuls on TF32 tensor cores miss the fp32 tolerance (2.6e-4 measured on an H200):
    # the check widens it only where TF32 can run, CUDA with torch's flags or cuBLAS's override.
    from prunepath_ops.convert.convert import _tf32_matmuls

    monkeypatch.delenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", raising=False)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        assert not _tf32_matmuls(torch.device("cpu")) and not _tf32_matmuls(torch.device("cuda"))
        torch.set_float32_matmul_precision("high")
        assert _tf32_matmuls(torch.device("cuda")) and not _tf32_matmuls(torch.device("cpu"))
        torch.set_float32_matmul_precision("highest")
        monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
        assert _tf32_matmuls(torch.device("cuda")) and not _tf32_matmuls(torch.device("cpu"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved[0]
        torch.set_float32_matmul_precision(saved[1])


def test_bf16_module():
    # Edge: bf16 weights; the check uses the looser bf16 tolerance and the output keeps the dtype.
    torch.manual_seed(0)
    mlp = LlamaMLP(16, 64).to(torch.bfloat16)
    converted, _ = convert_mlp(mlp, 16)
    assert converted.w_in.dtype == torch.bfloat16
    y, y_split = dense_vs_converted(mlp, converted, 16, torch.bfloat16)
    torch.testing.assert_close(y_split, y, rtol=5e-2, atol=5e-2)


def test_kwargs_forwarded_and_bad_width():
    torch.manual_seed(0)
    converted, _ = convert_mlp(LlamaMLP(8, 64), 16, tau=0.7, gate="prob", min_experts=2)
    assert (converted.tau, converted.gate, converted.min_experts) == (0.7, "prob", 2)
    with pytest.raises(ValueError, match="must divide"):
        convert_mlp(LlamaMLP(8, 48), 32)  # edge: S does not divide F
    with pytest.raises(TypeError, match="gate_proj"):
        convert_mlp(nn.Linear(4, 4), 2)  # edge: not an FFN


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.c_proj(self.c_attn(x))


class Block(nn.Module):
    def __init__(self, d, F, gated):
        super().__init__()
        self.attn = Attention(d)
        self.mlp = LlamaMLP(d, F) if gated else PlainMLP(d, F, nn.ReLU(), dropout=0.5)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class TinyModel(nn.Module):
    def __init__(self, d=16, F=64, layers=3):
        super().__init__()
        self.layers = nn.ModuleList(Block(d, F, gated=i % 2 == 0) for i in range(layers))
        self.extra = nn.Module()
        self.extra.fc1, self.extra.fc2 = nn.Linear(d, F), nn.Linear(F, d)  # an FFN not named mlp

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def test_convert_model_default_find():
    torch.manual_seed(0)
    model = TinyModel().eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        y_dense = model(x)
    perms = convert_model(model, 16, seed=0, progress=False)
    assert list(perms) == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]
    assert all(isinstance(b.mlp, pp.PrunePathMLP) for b in model.layers)
    assert isinstance(model.extra.fc1, nn.Linear)  # not named mlp: untouched
    assert model.layers[1].mlp.b_in is not None and not model.layers[1].mlp.gated
    for b in model.layers:
        b.mlp.tau, b.mlp.gate = 1.05, "one"
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_dense, rtol=1e-5, atol=1e-5)
    # Running it again finds nothing left to convert.
    assert convert_model(model, 16, progress=False) == {}


def test_convert_model_custom_find_and_determinism():
    torch.manual_seed(0)
    model_a = TinyModel()
    model_b = TinyModel()
    model_b.load_state_dict(model_a.state_dict())

    def only_first(name, module):  # custom predicate: the first block's FFN only
        return name == "layers.0.mlp"

    perms_a = convert_model(model_a, 16, seed=4, find=only_first, progress=False)
    perms_b = convert_model(model_b, 16, seed=4, find=only_first, progress=False)
    assert list(perms_a) == ["layers.0.mlp"]
    assert not isinstance(model_a.layers[1].mlp, pp.PrunePathMLP)
    assert torch.equal(perms_a["layers.0.mlp"], perms_b["layers.0.mlp"])
