"""Checkpoint round trip (issue 5): safetensors + JSON, same routing and outputs after loading."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import prunepath_ops as pp
from prunepath_ops.convert import CheckpointError, apply_checkpoint, convert_model, load_checkpoint, save_checkpoint
from prunepath_ops.models.llama import LlamaMLP
from prunepath_ops.testing import PlainMLP


class Block(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return x + self.mlp(x)


def make_model(gated, seed=0, d=16, F=64):
    torch.manual_seed(seed)
    return nn.Sequential(*(Block(LlamaMLP(d, F) if gated else PlainMLP(d, F)) for _ in range(2)))


def train_routers(model, seed=1):
    """Random (non-zero) routers and non-default settings, so the round trip has something to keep."""
    g = torch.Generator().manual_seed(seed)
    for i, m in enumerate(model.modules()):
        if isinstance(m, pp.PrunePathMLP):
            with torch.no_grad():
                m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=g))
            m.tau, m.gate, m.max_experts = 0.6 + 0.01 * i, "prob", 3


@pytest.mark.parametrize("gated", [True, False])  # gated (no biases) and plain (b_in, b_out) FFNs
def test_round_trip(tmp_path, gated):
    model = make_model(gated)
    perms = convert_model(model, 16, seed=0, progress=False)
    train_routers(model)
    save_checkpoint(tmp_path, model, {"source_model": "toy", "run": 3}, perms)
    assert sorted(os.listdir(tmp_path)) == ["prunepath.safetensors", "prunepath_config.json"]

    loaded = load_checkpoint(tmp_path)
    assert list(loaded.modules) == ["0.mlp", "1.mlp"]
    cfg = loaded.config
    assert (cfg["format_version"], cfg["source_model"], cfg["ffn_family"]) == (1, "toy", "gated" if gated else "plain")
    assert cfg["config"] == {"source_model": "toy", "run": 3}
    assert [(L["num_experts"], L["expert_width"]) for L in cfg["layers"]] == [(4, 16), (4, 16)]
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(2))
    for name, original in ((n, m) for n, m in model.named_modules() if isinstance(m, pp.PrunePathMLP)):
        new = loaded.modules[name]
        assert torch.equal(loaded.permutations[name], perms[name])
        assert (new.tau, new.gate, new.max_experts, new.act, new.gated) == (
            original.tau, original.gate, original.max_experts, original.act, original.gated,
        )  # fmt: skip
        for a, b in zip(original.route(x), new.route(x), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(original(x), new(x))

    # Put the loaded modules into a fresh dense copy of the model: the same outputs.
    fresh = apply_checkpoint(make_model(gated), loaded)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


class Model(nn.Module):
    """Blocks behind a scaled input: a parameter outside the FFNs (a stand-in for attention and norms)."""

    def __init__(self, gated, seed=0):
        super().__init__()
        self.blocks = make_model(gated, seed)
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, x):
        return self.blocks(x * self.scale)


def test_backbone_round_trip_and_errors(tmp_path):
    from prunepath_ops.convert import backbone_parameters

    model = Model(gated=True)
    perms = convert_model(model, 16, seed=0, progress=False)
    assert list(backbone_parameters(model)) == ["scale"]  # nothing inside a PrunePathMLP
    with torch.no_grad():
        model.scale.mul_(1.5)  # "fine-tuned"
    save_checkpoint(tmp_path, model, {"source_model": "toy"}, perms, backbone=backbone_parameters(model))
    loaded = load_checkpoint(tmp_path)
    assert loaded.config["backbone"] == ["scale"] and torch.equal(loaded.backbone["scale"], model.scale)
    fresh = apply_checkpoint(Model(gated=True), loaded)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # Without a backbone the field is None and the model's own parameters stay.
    save_checkpoint(tmp_path / "plain", model, {}, perms)
    assert load_checkpoint(tmp_path / "plain").backbone is None
    # A model without the saved parameter, or with another shape: a clear error, nothing replaced.
    with pytest.raises(ValueError, match="no parameter 'scale'"):
        apply_checkpoint(make_model(True), loaded)
    other = Model(gated=True)
    other.scale = nn.Parameter(torch.ones(8))
    with pytest.raises(ValueError, match="backbone parameter 'scale' is \\[16\\]"):
        apply_checkpoint(other, loaded)
    assert not any(isinstance(m, pp.PrunePathMLP) for m in other.modules())


def test_dict_of_modules_and_dtype(tmp_path):
    # Edge: a name -> module dict without permutations, loaded as bf16.
    torch.manual_seed(0)
    mlp = pp.PrunePathMLP.from_dense(LlamaMLP(16, 64), 16, tau=0.8)
    save_checkpoint(tmp_path, {"layer": mlp})
    loaded = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert loaded.permutations == {}
    new = loaded.modules["layer"]
    assert new.w_in.dtype == torch.bfloat16 and new.router.weight.dtype == torch.bfloat16
    assert torch.equal(new.w_in, mlp.w_in.bfloat16())
    assert loaded.config["tau"] == 0.8 and loaded.config["source_model"] is None


def corrupt_version(path):
    p = os.path.join(path, "prunepath_config.json")
    cfg = json.load(open(p))
    cfg["format_version"] = 99
    json.dump(cfg, open(p, "w"))


def corrupt_format(path):
    p = os.path.join(path, "prunepath_config.json")
    json.dump({"format": "other"}, open(p, "w"))


def drop_tensor_file(path):
    os.remove(os.path.join(path, "prunepath.safetensors"))


def drop_config(path):
    os.remove(os.path.join(path, "prunepath_config.json"))


@pytest.mark.parametrize(
    "corrupt,error,match",
    [
        (drop_tensor_file, FileNotFoundError, "prunepath.safetensors not found"),  # edge: missing tensors
        (drop_config, FileNotFoundError, "prunepath_config.json not found"),  # edge: missing config
        (corrupt_version, CheckpointError, "format_version 99"),  # edge: a future format version
        (corrupt_format, CheckpointError, "not a PrunePath config"),  # edge: someone else's JSON
    ],
)
def test_errors(tmp_path, corrupt, error, match):
    torch.manual_seed(0)
    save_checkpoint(tmp_path, {"mlp": pp.PrunePathMLP.from_dense(LlamaMLP(8, 32), 16)})
    corrupt(tmp_path)
    with pytest.raises(error, match=match):
        load_checkpoint(tmp_path)


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="no PrunePathMLP"):
        save_checkpoint(tmp_path, nn.Linear(2, 2))  # edge: nothing to save
    torch.manual_seed(0)
    mlp = pp.PrunePathMLP.from_dense(LlamaMLP(8, 32), 16)
    with pytest.raises(ValueError, match="unknown modules"):
        save_checkpoint(tmp_path, {"a": mlp}, permutations={"b": torch.arange(32)})  # edge: stray permutation
