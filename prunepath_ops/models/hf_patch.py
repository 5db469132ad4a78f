"""Use PrunePath as a backend of ``transformers``: swap a loaded Llama model's FFNs in place.

After :func:`patch_hf_llama`, ``hf_model(...)`` and ``hf_model.generate(...)`` run every decoder
layer's FFN through :class:`~prunepath_ops.PrunePathMLP` (router -> top-p routing -> sparse FFN);
attention, caching and sampling stay those of ``transformers``.

Legend: F FFN width, S expert width.
"""

from __future__ import annotations

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


def unpatch_hf_llama(hf_model: nn.Module, permutations: Sequence[Tensor] | None = None) -> None:
    """Undo :func:`patch_hf_llama`: dense ``gate_proj/up_proj/down_proj`` FFNs again (routers dropped)."""
    layers = _decoder_layers(hf_model)
    perms = _per_layer(permutations, len(layers), "unpatch_hf_llama: permutations")
    for i, layer in enumerate(layers):
        if isinstance(layer.mlp, PrunePathMLP):
            layer.mlp = prunepath_to_dense(layer.mlp, perms[i])
