"""Save and load converted FFNs: one safetensors file of tensors plus one JSON config.

Layout of a checkpoint directory:

- ``prunepath.safetensors``: for layer ``i`` (model order) ``layers.{i}.w_in``
  (packed, permuted), ``layers.{i}.w_down``, ``layers.{i}.router``, and where
  present ``layers.{i}.b_in``, ``layers.{i}.b_out``, ``layers.{i}.permutation``.
  When the rest of the model was fine-tuned too (``prunepath train --train-backbone``), its
  parameters are saved as ``backbone.{parameter name}`` (names as in ``model.named_parameters()``).
- ``prunepath_config.json``: format name and version, source model, FFN family,
  default gate and tau, and per layer its module name, E, S, d, activation,
  tau, gate and expert bounds; the names of the saved backbone parameters (``"backbone"``, a
  list, empty when the source model's own weights are used); the caller's own ``config`` dict is
  kept under ``"config"``.

``safetensors`` is imported inside the functions so that ``import prunepath_ops`` never needs it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from prunepath_ops.convert.convert import _set_submodule
from prunepath_ops.ffn.packing import PackedExperts
from prunepath_ops.modules import PrunePathMLP

FORMAT = "prunepath"
FORMAT_VERSION = 1
TENSORS_FILE = "prunepath.safetensors"
CONFIG_FILE = "prunepath_config.json"


class CheckpointError(ValueError):
    """A checkpoint directory that this version cannot read."""


class LoadedCheckpoint(NamedTuple):
    """What :func:`load_checkpoint` returns.

    Attributes
    ----------
    modules : dict
        ``{module_name: PrunePathMLP}`` in the saved (model) order.
    permutations : dict
        ``{module_name: [F] int64}`` for the layers saved with one.
    config : dict
        The whole JSON config (format fields, ``layers``, and the caller's ``config``).
    backbone : dict or None
        ``{parameter_name: tensor}`` of the fine-tuned non-FFN parameters, or None when the
        checkpoint uses the source model's own.
    """

    modules: dict[str, PrunePathMLP]
    permutations: dict[str, Tensor]
    config: dict
    backbone: dict[str, Tensor] | None = None


def backbone_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter of ``model`` outside its :class:`PrunePathMLP` s (attention, norms, embeddings, head).

    Tied parameters appear once (``named_parameters`` deduplicates), under their first name.

    Examples
    --------
    >>> from prunepath_ops.models import Llama, LlamaConfig, to_prunepath
    >>> model = Llama(LlamaConfig.tiny())
    >>> _ = to_prunepath(model, 16)  # the FFNs become PrunePathMLPs
    >>> names = backbone_parameters(model)
    >>> "embed.weight" in names, any(".ffn." in n for n in names)
    (True, False)
    """
    inside = {n for n, m in model.named_modules() if isinstance(m, PrunePathMLP)}
    return {
        n: p.detach()
        for n, p in model.named_parameters()
        if not any(n == m or n.startswith(m + ".") for m in inside if m)
    }


def _named_mlps(model_or_modules) -> list[tuple[str, PrunePathMLP]]:
    if isinstance(model_or_modules, PrunePathMLP):
        return [("", model_or_modules)]
    if isinstance(model_or_modules, nn.Module):
        return [(n, m) for n, m in model_or_modules.named_modules() if isinstance(m, PrunePathMLP)]
    if isinstance(model_or_modules, Mapping):
        return list(model_or_modules.items())
    raise TypeError(f"save_checkpoint: expected an nn.Module or a dict of PrunePathMLP; got {type(model_or_modules)}")


def save_checkpoint(
    path_dir: str | os.PathLike,
    model_or_modules: nn.Module | Mapping[str, PrunePathMLP],
    config: dict | None = None,
    permutations: Mapping[str, Tensor] | None = None,
    *,
    backbone: Mapping[str, Tensor] | None = None,
) -> None:
    """Write every :class:`PrunePathMLP` of a model (or a name -> module dict) to ``path_dir``.

    Parameters
    ----------
    path_dir : str or PathLike
        Directory, created if missing; existing checkpoint files are overwritten.
    model_or_modules : nn.Module or dict
        A model holding PrunePathMLPs (found by ``named_modules``), one PrunePathMLP
        (saved under the name ``""``), or ``{name: PrunePathMLP}``.
    config : dict, optional
        JSON-serialisable extras, kept verbatim under ``"config"``; its keys
        ``source_model``, ``ffn_family``, ``gate`` and ``tau`` also fill the
        top-level fields (default: read from the first module).
    permutations : dict, optional
        ``{name: [F] permutation}``, e.g. what :func:`convert_model` returns.
    backbone : dict, optional
        ``{parameter_name: tensor}`` of a fine-tuned backbone (:func:`backbone_parameters`),
        restored by :func:`apply_checkpoint`; default: none (the source model's weights are used).

    Examples
    --------
    >>> import tempfile
    >>> from prunepath_ops.models import LlamaMLP
    >>> dense = LlamaMLP(8, 32)  # d = 8, F = 32
    >>> d = tempfile.mkdtemp()
    >>> save_checkpoint(d, {"mlp": PrunePathMLP.from_dense(dense, 16)}, {"source_model": "toy"})
    >>> load_checkpoint(d).config["layers"][0]["num_experts"]
    2
    """
    from safetensors.torch import save_file

    named = _named_mlps(model_or_modules)
    if not named:
        raise ValueError("save_checkpoint: no PrunePathMLP to save")
    config = dict(config or {})
    permutations = dict(permutations or {})
    unknown = set(permutations) - {n for n, _ in named}
    if unknown:
        raise ValueError(f"save_checkpoint: permutations given for unknown modules {sorted(unknown)}")
    tensors: dict[str, Tensor] = {}
    layers = []
    for i, (name, m) in enumerate(named):
        E, S, d = m.w_down.shape
        key = f"layers.{i}"
        tensors[f"{key}.w_in"] = m.w_in.detach()
        tensors[f"{key}.w_down"] = m.w_down.detach()
        tensors[f"{key}.router"] = m.router.weight.detach()
        for opt in ("b_in", "b_out"):
            if getattr(m, opt) is not None:
                tensors[f"{key}.{opt}"] = getattr(m, opt).detach()
        if name in permutations:
            tensors[f"{key}.permutation"] = permutations[name].detach().to(torch.int64)
        layers.append(
            {
                "name": name, "num_experts": E, "expert_width": S, "hidden": d, "gated": m.gated, "act": m.act,
                "tau": m.tau, "gate": m.gate, "min_experts": m.min_experts, "max_experts": m.max_experts,
            }
        )  # fmt: skip
    backbone = dict(backbone or {})
    for name, t in backbone.items():
        tensors[f"backbone.{name}"] = t.detach()
    first = named[0][1]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source_model": config.get("source_model"),
        "ffn_family": config.get("ffn_family", "gated" if first.gated else "plain"),
        "gate": config.get("gate", first.gate),
        "tau": config.get("tau", first.tau),
        "layers": layers,
        "backbone": sorted(backbone),
        "config": config,
    }
    os.makedirs(path_dir, exist_ok=True)
    # safetensors wants contiguous CPU tensors that share no storage.
    save_file({k: v.cpu().contiguous().clone() for k, v in tensors.items()}, os.path.join(path_dir, TENSORS_FILE))
    with open(os.path.join(path_dir, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def load_checkpoint(
    path_dir: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedCheckpoint:
    """Read a directory written by :func:`save_checkpoint` and rebuild its PrunePathMLPs.

    Parameters
    ----------
    path_dir : str or PathLike
    device : str or torch.device
        Where the modules' tensors go.
    dtype : torch.dtype, optional
        Cast the float tensors (weights, biases, routers); default: as saved.

    Returns
    -------
    LoadedCheckpoint
        ``(modules, permutations, config)``; see :func:`apply_checkpoint` to put
        the modules into a model.

    Raises
    ------
    FileNotFoundError
        A checkpoint file is missing.
    CheckpointError
        Not a PrunePath checkpoint, an unsupported ``format_version``, or missing tensors.
    """
    from safetensors.torch import load_file

    paths = {f: os.path.join(path_dir, f) for f in (CONFIG_FILE, TENSORS_FILE)}
    for p in paths.values():
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"load_checkpoint: {p} not found ({path_dir} is not a complete PrunePath checkpoint)"
            )
    with open(paths[CONFIG_FILE]) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"load_checkpoint: {paths[CONFIG_FILE]} is not a PrunePath config (format field)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"load_checkpoint: format_version {meta.get('format_version')!r} is not supported "
            f"(this prunepath_ops reads version {FORMAT_VERSION})"
        )
    tensors = load_file(paths[TENSORS_FILE], device=str(device))

    def get(key: str, required: bool = True) -> Tensor | None:
        if key not in tensors:
            if required:
                raise CheckpointError(f"load_checkpoint: tensor {key!r} missing from {paths[TENSORS_FILE]}")
            return None
        t = tensors[key]
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    modules: dict[str, PrunePathMLP] = {}
    permutations: dict[str, Tensor] = {}
    for i, layer in enumerate(meta["layers"]):
        key = f"layers.{i}"
        packed = PackedExperts(
            get(f"{key}.w_in"), get(f"{key}.w_down"), get(f"{key}.b_in", False), get(f"{key}.b_out", False),
            bool(layer["gated"]), layer["act"],
        )  # fmt: skip
        if tuple(packed.w_down.shape) != (layer["num_experts"], layer["expert_width"], layer["hidden"]):
            raise CheckpointError(f"load_checkpoint: layer {i} w_down shape disagrees with the config")
        modules[layer["name"]] = PrunePathMLP(
            packed, get(f"{key}.router"), tau=layer["tau"], gate=layer["gate"],
            min_experts=layer["min_experts"], max_experts=layer["max_experts"],
        )  # fmt: skip
        perm = get(f"{key}.permutation", False)
        if perm is not None:
            permutations[layer["name"]] = perm
    backbone = {name: get(f"backbone.{name}") for name in meta.get("backbone", [])}
    return LoadedCheckpoint(modules, permutations, meta, backbone or None)


def apply_checkpoint(model: nn.Module, loaded: LoadedCheckpoint) -> nn.Module:
    """Put the loaded modules into ``model`` (in place) at their saved names; returns ``model``.

    The model must have a module at every saved name (e.g. the dense source
    model, whose ``mlp`` modules are replaced), and a parameter of the same shape at every saved
    backbone name (copied in place, so tied parameters stay tied).
    """
    params = dict(model.named_parameters()) if loaded.backbone else {}
    for name, t in (loaded.backbone or {}).items():
        if name not in params:
            raise ValueError(f"apply_checkpoint: the model has no parameter {name!r} (saved backbone)")
        if params[name].shape != t.shape:
            raise ValueError(f"apply_checkpoint: backbone parameter {name!r} is {list(t.shape)} in the checkpoint, "
                             f"{list(params[name].shape)} in the model")  # fmt: skip
    for name, module in loaded.modules.items():
        if not name:
            raise ValueError("apply_checkpoint: a module saved without a name cannot be placed in a model")
        _set_submodule(model, name, module)
    with torch.no_grad():
        for name, t in (loaded.backbone or {}).items():
            params[name].copy_(t)
    return model
