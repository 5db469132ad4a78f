"""Dense FFN -> :class:`~prunepath_ops.PrunePathMLP`: balanced k-means grouping, packing, identity check.

Legend: T tokens, E experts, S expert width, d hidden, F FFN width.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor, nn

from prunepath_ops.convert.kmeans import balanced_kmeans
from prunepath_ops.modules import PrunePathMLP, _dense_weights
from prunepath_ops.reference.sparse_ffn import dense_ffn

# Tolerance of the identity check, relative to the largest |output|: the split FFN
# sums the same products in another order, so only rounding may differ.
_CHECK_RTOL = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 4e-2}


# fp32 matmuls on TF32 tensor cores (10-bit mantissa inputs): 2.6e-4 measured on an H200 (SmolLM2).
_TF32_RTOL = 2e-3


def _tf32_matmuls(device: torch.device) -> bool:
    """fp32 matmuls on ``device`` may run in TF32 (torch's flags or cuBLAS's environment override)."""
    if device.type != "cuda":
        return False
    override = os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "0") not in ("", "0")
    return override or torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"


class ConversionError(RuntimeError):
    """The converted FFN does not reproduce the dense one with every expert active."""


def _is_ffn(module: nn.Module) -> bool:
    names = ("gate_proj", "up_proj", "down_proj"), ("fc1", "fc2"), ("c_fc", "c_proj")
    return any(all(hasattr(module, n) for n in group) for group in names)


def default_find(name: str, module: nn.Module) -> bool:
    """Default predicate of :func:`convert_model`: a module named ``mlp`` that is a known FFN.

    Known FFNs: ``gate_proj/up_proj/down_proj`` (Llama, Qwen, SmolLM), ``fc1/fc2``
    and GPT-2's ``c_fc/c_proj``.
    """
    return name.rsplit(".", 1)[-1] == "mlp" and not isinstance(module, PrunePathMLP) and _is_ffn(module)


# Hugging Face activation classes (transformers.activations) by class name, so that
# conversion needs no transformers import. PrunePathMLP.from_dense reads only torch.nn ones.
_HF_ACTIVATIONS = {
    "SiLUActivation": "silu",
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "ReLUActivation": "relu",
}


def guess_activation(mlp: nn.Module) -> str | None:
    """The activation name of a Hugging Face activation module on ``mlp``, or None to let ``from_dense`` decide.

    Examples
    --------
    >>> from torch import nn
    >>> class NewGELUActivation(nn.Module): ...
    >>> m = nn.Module(); m.act = NewGELUActivation()
    >>> guess_activation(m)
    'gelu_tanh'
    """
    for attr in ("act_fn", "act", "activation"):
        name = type(getattr(mlp, attr, None)).__name__
        if name in _HF_ACTIVATIONS:
            return _HF_ACTIVATIONS[name]
    return None


def _dense_forward(mlp: nn.Module, act: str, x: Tensor) -> Tensor:
    """The module's own forward when it has one (the truth), else the dense FFN from its weights."""
    if type(mlp).forward is not nn.Module.forward:
        return mlp(x)
    w = _dense_weights(mlp)
    return dense_ffn(x, w["w_in"], w["w_out"], w_up=w.get("w_up"), b_in=w.get("b_in"), b_out=w.get("b_out"), act=act)


@torch.no_grad()
def check_identity(mlp: nn.Module, converted: PrunePathMLP, *, tokens: int = 16, seed: int = 0) -> float:
    """Raise :class:`ConversionError` unless ``converted`` (all experts, gate 1) equals ``mlp``.

    Parameters
    ----------
    mlp : nn.Module
        The dense FFN; its ``forward`` runs in eval mode (no dropout) on ``tokens``
        random inputs (a module without ``forward`` is evaluated from its weights).
    converted : PrunePathMLP
        Its conversion; its ``tau``/``gate`` are set to ``1.05``/``"one"`` for the
        check and restored afterwards.
    tokens : int
        Random inputs ``[tokens, d]`` drawn from ``torch.Generator().manual_seed(seed)``.

    Returns
    -------
    float
        The relative error ``max |y_split - y_dense| / max |y_dense|``.
    """
    E, S, d = converted.w_down.shape
    ref = converted.w_down
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(seed)).to(device=ref.device, dtype=ref.dtype)
    # Scale the inputs so the pre-activations spread over about [-4, 4]: with the tiny
    # weights of a fresh init the activation is nearly linear and a wrong one (gelu for
    # gelu_tanh, say) would slip through.
    pre = torch.einsum("td,esd->tes", x.float(), converted.w_in.float()[:, :S])
    x = (x.float() * (2.0 / pre.std().clamp_min(1e-12))).to(ref.dtype)
    saved = converted.tau, converted.gate, mlp.training
    try:
        converted.tau, converted.gate = 1.05, "one"
        mlp.eval()
        y_dense, y_split = _dense_forward(mlp, converted.act, x).float(), converted(x).float()
    finally:
        converted.tau, converted.gate = saved[0], saved[1]
        mlp.train(saved[2])
    scale = y_dense.abs().max().item()
    err = (y_split - y_dense).abs().max().item() / max(scale, 1e-30)
    rtol = _CHECK_RTOL.get(ref.dtype, 1e-5)
    if ref.dtype == torch.float32 and _tf32_matmuls(ref.device):
        rtol = _TF32_RTOL
    if not err <= rtol:  # written so that NaN fails too
        raise ConversionError(
            f"permutation identity check failed: with all {E} experts active and gate 1 the split FFN "
            f"differs from the dense one by {err:.3e} (relative, max over {tokens} random tokens) > {rtol:.0e}; "
            f"check the activation (converted act={converted.act!r}) and the module's weights"
        )
    return err


def convert_mlp(
    mlp: nn.Module,
    expert_width: int = 32,
    seed: int = 0,
    *,
    act: str | None = None,
    max_iter: int = 30,
    check: bool = True,
    progress: bool = False,
    **kwargs,
) -> tuple[PrunePathMLP, Tensor]:
    """Convert one dense FFN into a :class:`PrunePathMLP` with a zero-initialised router.

    Neurons are grouped by :func:`~prunepath_ops.convert.balanced_kmeans` on the
    rows of ``Wg`` (gated FFN) or ``Wi`` (plain FFN), then packed expert-major.

    Parameters
    ----------
    mlp : nn.Module
        A Llama-style ``gate_proj/up_proj/down_proj``, an ``fc1/fc2`` or a GPT-2
        ``c_fc/c_proj`` FFN (see :meth:`PrunePathMLP.from_dense`).
    expert_width : int
        S, dividing F.
    seed : int
        k-means seed; the same seed gives the same permutation.
    act : str, optional
        Activation override (``silu``, ``gelu``, ``gelu_tanh``, ``relu``); default:
        read from the module (``torch.nn`` activations and the Hugging Face ones of
        :func:`guess_activation`).
    max_iter : int
        k-means iterations.
    check : bool
        Run :func:`check_identity` (on by default; it raises :class:`ConversionError`).
    progress : bool
        tqdm bar over the k-means iterations.
    **kwargs
        Forwarded to :class:`PrunePathMLP` (``tau``, ``gate``, ``min_experts``, ...).

    Returns
    -------
    (PrunePathMLP, Tensor)
        The module (weights in the dtype/device of ``mlp``) and the permutation
        ``[F]`` int64: packed neuron ``i`` is dense neuron ``permutation[i]``.

    Examples
    --------
    >>> from prunepath_ops.models import LlamaMLP
    >>> dense = LlamaMLP(8, 64)  # d = 8, F = 64
    >>> pmlp, perm = convert_mlp(dense, expert_width=16)
    >>> pmlp.router.weight.abs().sum().item(), sorted(perm.tolist()) == list(range(64))
    (0.0, True)
    """
    w_in = _dense_weights(mlp)["w_in"]  # [F, d]: Wg or Wi
    perm = balanced_kmeans(w_in, expert_width, seed=seed, max_iter=max_iter, progress=progress).permutation
    converted = PrunePathMLP.from_dense(mlp, expert_width, perm, act=act or guess_activation(mlp), **kwargs)
    if check:
        check_identity(mlp, converted, seed=seed)
    return converted, perm


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert_model(
    model: nn.Module,
    expert_width: int = 32,
    seed: int = 0,
    *,
    find: Callable[[str, nn.Module], bool] = default_find,
    progress: bool = True,
    **kwargs,
) -> dict[str, Tensor]:
    """Replace, in place, every FFN that ``find`` selects with its :func:`convert_mlp` conversion.

    Parameters
    ----------
    model : nn.Module
        E.g. a ``LlamaForCausalLM``; modified in place.
    expert_width, seed : int
        As in :func:`convert_mlp`; every layer uses the same seed.
    find : callable
        ``find(qualified_name, module) -> bool``; default :func:`default_find`
        (modules named ``mlp`` with gate/up/down, fc1/fc2 or c_fc/c_proj).
    progress : bool
        tqdm bar over the layers.
    **kwargs
        Forwarded to :func:`convert_mlp`.

    Returns
    -------
    dict
        ``{qualified_name: permutation [F] int64}`` in model order; empty when no
        module matched.

    Examples
    --------
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.mlp = nn.Module()
    ...         self.mlp.fc1, self.mlp.fc2, self.mlp.act = nn.Linear(8, 32), nn.Linear(32, 8), nn.ReLU()
    >>> model = nn.Sequential(Block(), Block())
    >>> list(convert_model(model, expert_width=16, progress=False))
    ['0.mlp', '1.mlp']
    """
    from tqdm.auto import tqdm

    targets = [(n, m) for n, m in model.named_modules() if n and find(n, m)]
    perms: dict[str, Tensor] = {}
    for name, mlp in tqdm(targets, desc="PrunePath conversion", disable=not progress):
        converted, perm = convert_mlp(mlp, expert_width, seed, **kwargs)
        _set_submodule(model, name, converted)
        perms[name] = perm
    return perms
