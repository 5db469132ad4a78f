"""Use PrunePath as a backend of ``transformers``: swap a loaded Llama model's FFNs in place.

After :func:`patch_hf_llama`, ``hf_model(...)`` and ``hf_model.generate(...)`` run every decoder
layer's FFN through :class:`~prunepath_ops.PrunePathMLP` (router -> top-p routing -> sparse FFN);
attention, caching and sampling stay those of ``transformers``.

Legend: F FFN width, S expert width.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import Tensor, nn

from prunepath_ops.models.llama import _per_layer, prunepath_to_dense
from prunepath_ops.modules import PrunePathMLP


def _decoder_layers(hf_model: nn.Module):
    inner = getattr(hf_model, "model", hf_model)  # LlamaForCausalLM.model is the LlamaModel
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"patch_hf_llama: {type(hf_model).__name__} has no .model.layers (not a transformers Llama?)")
    return layers


def patch_hf_llama(
    hf_model: nn.Module,
    expert_width: int = 32,
    permutations: Sequence[Tensor] | None = None,
    *,
    tau: float = 1.05,
    gate: str = "sigmoid",
    **kwargs,
) -> list[PrunePathMLP]:
    """Replace each ``hf_model.model.layers[i].mlp`` with a :class:`PrunePathMLP` built from it, in place.

    Parameters
    ----------
    hf_model : transformers.LlamaForCausalLM or LlamaModel
        Any model whose decoder layers have a gated ``mlp`` (``gate_proj/up_proj/down_proj``).
    expert_width : int
        S, neurons per expert (must divide F).
    permutations : sequence of Tensor, optional
        One ``[F]`` neuron permutation per layer; identity if None.
    tau : float
        Top-p threshold; ``tau >= 1`` keeps every expert.
    gate : {"sigmoid", "prob", "renorm", "one"}
        ``"one"`` with ``tau >= 1`` leaves the model's outputs unchanged (up to rounding).
    **kwargs
        Forwarded to :meth:`PrunePathMLP.from_dense`.

    Returns
    -------
    list of PrunePathMLP
        The new modules in layer order (routers zero-initialised); set ``.tau`` on them later.

    Examples
    --------
    >>> mlps = patch_hf_llama(hf_model, expert_width=32, tau=0.9)  # doctest: +SKIP
    >>> out = hf_model.generate(**inputs, max_new_tokens=20)  # doctest: +SKIP
    """
    layers = _decoder_layers(hf_model)
    perms = _per_layer(permutations, len(layers), "patch_hf_llama: permutations")
    new = []
    for i, layer in enumerate(layers):
        if not isinstance(layer.mlp, PrunePathMLP):
            layer.mlp = PrunePathMLP.from_dense(layer.mlp, expert_width, perms[i], tau=tau, gate=gate, **kwargs)
        new.append(layer.mlp)
    return new


def patch_hf_llama_from_checkpoint(hf_model: nn.Module, checkpoint) -> list[PrunePathMLP]:
    """Put a PrunePath checkpoint into a loaded ``transformers`` Llama, in place: FFNs and backbone.

    The same model as :func:`prunepath_ops.convert.apply_checkpoint` gives the package's own
    :class:`~prunepath_ops.models.Llama` for that checkpoint: each ``model.layers[i].mlp`` becomes
    the checkpoint's :class:`PrunePathMLP` for layer ``i`` (its permuted experts, router, ``tau``,
    gate and expert bounds), and a fine-tuned backbone (``prunepath train --train-backbone``) is
    copied over the Hugging Face parameters it names. The modules take ``hf_model``'s device and
    dtype.

    Parameters
    ----------
    hf_model : transformers.LlamaForCausalLM
        The checkpoint's source model (same shapes), loaded by ``transformers``.
    checkpoint : str, os.PathLike or LoadedCheckpoint
        A directory written by ``prunepath convert`` / ``train`` / ``calibrate``, or what
        :func:`prunepath_ops.convert.load_checkpoint` returned for one.

    Returns
    -------
    list of PrunePathMLP
        The new modules in layer order.

    Raises
    ------
    ValueError
        The checkpoint does not fit the model (layer count, names, shapes); nothing is changed then.

    Examples
    --------
    >>> mlps = patch_hf_llama_from_checkpoint(hf_model, "smollm2_prunepath/")  # doctest: +SKIP
    >>> for m in mlps:  # doctest: +SKIP
    ...     m.tau = 0.8
    >>> out = hf_model.generate(**inputs, max_new_tokens=20)  # doctest: +SKIP
    """
    import torch

    from prunepath_ops.convert.checkpoint import LoadedCheckpoint, load_checkpoint
    from prunepath_ops.models.loading import internal_to_hf_name

    loaded = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint)
    layers = _decoder_layers(hf_model)
    by_layer: dict[int, PrunePathMLP] = {}
    for name, module in loaded.modules.items():
        m = re.fullmatch(r"layers\.(\d+)\.ffn", name)
        if m is None or not int(m.group(1)) < len(layers):
            raise ValueError(f"patch_hf_llama_from_checkpoint: checkpoint module {name!r} is not an FFN of this "
                             f"{len(layers)}-layer model")  # fmt: skip
        by_layer[int(m.group(1))] = module
    if sorted(by_layer) != list(range(len(layers))):
        raise ValueError(f"patch_hf_llama_from_checkpoint: the checkpoint has FFNs for layers {sorted(by_layer)}, "
                         f"the model {len(layers)} layers")  # fmt: skip
    params = dict(hf_model.named_parameters())
    backbone = {}
    for name, t in (loaded.backbone or {}).items():
        hf_name = internal_to_hf_name(name)
        if hf_name not in params and hf_name == "lm_head.weight":
            hf_name = "model.embed_tokens.weight"  # tied: transformers lists the embedding once
        if hf_name not in params or params[hf_name].shape != t.shape:
            raise ValueError(f"patch_hf_llama_from_checkpoint: backbone parameter {name!r} has no counterpart "
                             f"of shape {list(t.shape)} in the model ({hf_name})")  # fmt: skip
        backbone[hf_name] = t
    ref = next(iter(params.values()))
    with torch.no_grad():
        for hf_name, t in backbone.items():
            params[hf_name].copy_(t)
    new = []
    for i, layer in enumerate(layers):
        layer.mlp = by_layer[i].to(device=ref.device, dtype=ref.dtype)
        new.append(layer.mlp)
    return new


def unpatch_hf_llama(hf_model: nn.Module, permutations: Sequence[Tensor] | None = None) -> None:
    """Undo :func:`patch_hf_llama`: dense ``gate_proj/up_proj/down_proj`` FFNs again (routers dropped)."""
    layers = _decoder_layers(hf_model)
    perms = _per_layer(permutations, len(layers), "unpatch_hf_llama: permutations")
    for i, layer in enumerate(layers):
        if isinstance(layer.mlp, PrunePathMLP):
            layer.mlp = prunepath_to_dense(layer.mlp, perms[i])
