"""FFN sparsity (SPEC.md section 4) and tau calibration by bisection on the measured sparsity.

Legend: T tokens, L layers, E_l experts of layer l.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from prunepath_ops.modules import PrunePathMLP


class CalibrationError(ValueError):
    """The target sparsity cannot be reached in the given tau range."""


def ffn_sparsity(
    num_active_per_layer: Sequence[Tensor], E_per_layer: int | Sequence[int], mask: Tensor | None = None
) -> float:
    """``s_FFN = 1 - mean over tokens and layers of (n / E)``: the mean fraction of inactive experts.

    Parameters
    ----------
    num_active_per_layer : sequence of Tensor
        One ``[T]`` (or any shape ``[...]``) int tensor per layer: experts kept per token.
    E_per_layer : int or sequence of int
        Experts of each layer (one int for all layers).
    mask : Tensor, optional
        ``[T]`` (the shape of each ``num_active``) bool, True on the tokens that
        count (not padding). Default: every token.

    Returns
    -------
    float
        In ``[0, 1)``; every layer weighs the same (the mean is over the masked
        tokens of each layer, then over layers).

    Examples
    --------
    >>> ffn_sparsity([torch.tensor([1, 3]), torch.tensor([2, 2])], 4)  # 1 - mean(1/4, 3/4, 2/4, 2/4)
    0.5
    """
    L = len(num_active_per_layer)
    if L == 0:
        raise ValueError("ffn_sparsity: needs at least one layer")
    Es = [int(E_per_layer)] * L if isinstance(E_per_layer, int) else [int(e) for e in E_per_layer]
    if len(Es) != L:
        raise ValueError(f"ffn_sparsity: {L} layers but {len(Es)} expert counts")
    fractions = []
    for n, E in zip(num_active_per_layer, Es, strict=True):
        frac = n.double() / E
        if mask is not None:
            m = mask.to(device=n.device, dtype=torch.bool).reshape(n.shape)
            if not bool(m.any()):
                raise ValueError("ffn_sparsity: the mask selects no token")
            frac = frac[m]
        fractions.append(frac.mean())
    return 1.0 - float(torch.stack([f.cpu() for f in fractions]).mean())


@dataclass(frozen=True)
class Calibration:
    """Outcome of :func:`calibrate_tau`.

    Attributes
    ----------
    tau : float
        The threshold found.
    sparsity : float
        The measured ``s_FFN`` at ``tau``.
    converged : bool
        ``|sparsity - target| <= tol``.
    evaluations : int
        Calls of the measure function.
    """

    tau: float
    sparsity: float
    converged: bool
    evaluations: int


def _check_target(target: float) -> None:
    if not 0.0 <= target < 1.0:
        raise CalibrationError(f"calibrate_tau: target sparsity must be in [0, 1); got {target}")


def calibrate_tau(
    measure_fn: Callable[[float], float],
    target: float,
    *,
    lo: float = 0.0,
    hi: float = 1.0,
    tol: float = 0.01,
    max_iter: int = 30,
) -> Calibration:
    """Find tau with ``|measure_fn(tau) - target| <= tol`` by bisection.

    Parameters
    ----------
    measure_fn : callable
        ``measure_fn(tau) -> s_FFN``, non-increasing in tau (a larger tau keeps
        more experts), e.g. from :func:`make_measure_fn`.
    target : float
        Target sparsity in ``[0, 1)``.
    lo, hi : float
        The bracket; the defaults give ``s(0) = 1 - min_experts/E`` and ``s(1) = 0``.
    tol : float
        Accepted absolute error on the sparsity.
    max_iter : int
        Maximum bisection steps after the two end-point measurements.

    Returns
    -------
    Calibration
        The closest tau seen. Because the measured sparsity is a step function of
        tau, a jump over the target wider than ``2 * tol`` cannot be hit: then
        ``converged`` is False and a warning says so.

    Raises
    ------
    CalibrationError
        When ``target`` is not in ``[0, 1)`` or lies outside ``[s(hi) - tol, s(lo) + tol]``.

    Examples
    --------
    >>> res = calibrate_tau(lambda tau: 1.0 - tau, 0.3)
    >>> res.converged, abs(res.sparsity - 0.3) <= 0.01
    (True, True)
    """
    _check_target(target)
    if not lo < hi:
        raise ValueError(f"calibrate_tau: need lo < hi; got {lo}, {hi}")
    s_lo, s_hi = float(measure_fn(lo)), float(measure_fn(hi))
    evals = 2
    if not s_hi - tol <= target <= s_lo + tol:
        raise CalibrationError(
            f"calibrate_tau: target sparsity {target} is outside what tau in [{lo}, {hi}] reaches: "
            f"s({hi}) = {s_hi:.4f} .. s({lo}) = {s_lo:.4f}"
        )
    best = min(((lo, s_lo), (hi, s_hi)), key=lambda t: abs(t[1] - target))
    for _ in range(max_iter):
        if abs(best[1] - target) <= tol:
            break
        mid = 0.5 * (lo + hi)
        s = float(measure_fn(mid))
        evals += 1
        # On ties keep the newer point: it is nearer a jump the target falls into.
        if abs(s - target) <= abs(best[1] - target):
            best = (mid, s)
        if s > target:  # too sparse: keep more experts
            lo = mid
        else:
            hi = mid
    converged = abs(best[1] - target) <= tol
    if not converged:
        warnings.warn(
            f"calibrate_tau: reached s = {best[1]:.4f} at tau = {best[0]:.6f}, not within {tol} of {target} "
            f"(the sparsity jumps over the target; use more calibration tokens)",
            stacklevel=2,
        )
    return Calibration(best[0], best[1], converged, evals)


def calibrate_tau_per_layer(
    measure_fn: Callable[[Sequence[float]], Sequence[float]],
    num_layers: int,
    target: float,
    *,
    lo: float = 0.0,
    hi: float = 1.0,
    tol: float = 0.01,
    max_iter: int = 30,
) -> list[Calibration]:
    """One tau per layer, each layer's own sparsity brought within ``tol`` of ``target``.

    All layers are bisected together: each step calls ``measure_fn`` once with
    every layer's trial tau (one calibration forward pass for a whole model).
    Layers already within ``tol`` keep their tau. If every layer is within
    ``tol`` then so is the mean over layers, the model's ``s_FFN``.

    Parameters
    ----------
    measure_fn : callable
        ``measure_fn(taus [L]) -> per-layer sparsity [L]``, each non-increasing in
        its own tau (e.g. from :func:`make_measure_fn` with ``per_layer=True``).
    num_layers : int
        L.
    target, lo, hi, tol, max_iter
        As in :func:`calibrate_tau`.

    Returns
    -------
    list of Calibration
        One per layer; the ``sparsity`` fields come from the last measurement
        with the final taus (in a model, a layer's tau shifts the hidden states
        of the layers after it).

    Raises
    ------
    CalibrationError
        Target outside ``[0, 1)`` or outside some layer's reachable range.

    Examples
    --------
    >>> res = calibrate_tau_per_layer(lambda taus: [1 - t for t in taus], 2, 0.4)
    >>> [r.converged and abs(r.sparsity - 0.4) <= 0.01 for r in res]
    [True, True]
    """
    _check_target(target)
    L = num_layers
    s_lo, s_hi = list(measure_fn([lo] * L)), list(measure_fn([hi] * L))
    for layer in range(L):
        if not s_hi[layer] - tol <= target <= s_lo[layer] + tol:
            raise CalibrationError(
                f"calibrate_tau_per_layer: target sparsity {target} is outside what tau in [{lo}, {hi}] reaches "
                f"in layer {layer}: "
                f"s({hi}) = {s_hi[layer]:.4f} .. s({lo}) = {s_lo[layer]:.4f}"
            )
    los, his = [lo] * L, [hi] * L
    taus = [lo if abs(s_lo[i] - target) <= abs(s_hi[i] - target) else hi for i in range(L)]
    s = [s_lo[i] if taus[i] == lo else s_hi[i] for i in range(L)]
    evals = 2
    for _ in range(max_iter):
        todo = [i for i in range(L) if abs(s[i] - target) > tol]
        if not todo:
            break
        for i in todo:
            taus[i] = 0.5 * (los[i] + his[i])
        s = [float(v) for v in measure_fn(taus)]
        evals += 1
        for i in todo:
            if s[i] > target:
                los[i] = taus[i]
            else:
                his[i] = taus[i]
    results = [Calibration(taus[i], s[i], abs(s[i] - target) <= tol, evals) for i in range(L)]
    if not all(r.converged for r in results):
        bad = [i for i, r in enumerate(results) if not r.converged]
        warnings.warn(f"calibrate_tau_per_layer: layers {bad} not within {tol} of {target}", stacklevel=2)
    return results


@contextmanager
def record_num_active(mlps: Sequence[PrunePathMLP]):
    """Record each module's ``num_active`` ``[T]`` during forward passes.

    Yields a list of lists: ``records[l]`` gets one tensor per forward call of
    ``mlps[l]`` (the routing is recomputed from the module's input by
    :meth:`PrunePathMLP.route`, so the forward itself is untouched).

    Examples
    --------
    >>> from prunepath_ops.models import LlamaMLP
    >>> dense = LlamaMLP(8, 32)  # d = 8, F = 32
    >>> mlp = PrunePathMLP.from_dense(dense, expert_width=16, tau=0.0)
    >>> with record_num_active([mlp]) as rec:
    ...     _ = mlp(torch.randn(5, 8))
    >>> rec[0][0].tolist()
    [1, 1, 1, 1, 1]
    """
    records: list[list[Tensor]] = [[] for _ in mlps]

    def hook(index):
        def fn(module, args):
            x = args[0]
            with torch.no_grad():
                records[index].append(module.route(x.reshape(-1, x.shape[-1])).num_active.cpu())

        return fn

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(mlps)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def make_measure_fn(
    mlps: Sequence[PrunePathMLP],
    run: Callable[[], object],
    mask: Tensor | None = None,
    *,
    per_layer: bool = False,
):
    """A ``measure_fn`` for :func:`calibrate_tau` / :func:`calibrate_tau_per_layer`.

    Parameters
    ----------
    mlps : sequence of PrunePathMLP
        The routed layers, in model order.
    run : callable
        Runs the calibration forward pass(es), e.g. ``lambda: model(input_ids)``
        under ``torch.no_grad()``; every layer must see the same tokens in the same order.
    mask : Tensor, optional
        ``[T]`` non-padding mask over the concatenation of every token a layer sees in one ``run``.
    per_layer : bool
        False: ``fn(tau) -> s_FFN`` (the same tau for every layer). True:
        ``fn(taus) -> [s_l]`` (one tau and one sparsity per layer).

    Returns
    -------
    callable
        Sets the modules' ``tau``, calls ``run`` and measures; the modules keep the last tau set.
    """

    def measure_layers(taus: Sequence[float]) -> list[float]:
        for m, t in zip(mlps, taus, strict=True):
            m.tau = float(t)
        with torch.no_grad(), record_num_active(mlps) as rec:
            run()
        return [ffn_sparsity([torch.cat(r)], m.w_down.shape[0], mask) for r, m in zip(rec, mlps, strict=True)]

    if per_layer:
        return measure_layers
    return lambda tau: sum(measure_layers([tau] * len(mlps))) / len(mlps)
