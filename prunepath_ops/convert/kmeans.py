"""Balanced spherical k-means over FFN neurons (SPEC.md section 1, MoEfication grouping).

Legend: F neurons (rows clustered), D their dimension (the model's hidden size d),
E = F / S clusters (experts), S cluster size (expert width).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class KMeansResult(NamedTuple):
    """Outcome of :func:`balanced_kmeans`.

    Attributes
    ----------
    permutation : Tensor
        ``[F]`` int64: expert ``e`` owns neurons ``permutation[e*S:(e+1)*S]``, ascending.
    assignment : Tensor
        ``[F]`` int64 cluster of each neuron; every cluster has exactly S members.
    centroids : Tensor
        ``[E, D]`` float32 unit-norm centroids, in the cluster order of ``assignment``.
    objective : float
        Mean cosine similarity of a neuron to its centroid (higher is tighter).
    iterations : int
        Assignment steps run.
    """

    permutation: Tensor
    assignment: Tensor
    centroids: Tensor
    objective: float
    iterations: int


def _normalize(x: Tensor) -> Tensor:
    # A zero row (dead neuron) stays zero instead of becoming NaN; it is then
    # equally (dis)similar to every centroid and fills whatever capacity is left.
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _uniform(generator: torch.Generator, device: torch.device) -> Tensor:
    # Draw on the generator's own device (CPU by default) so a CPU seed gives the
    # same numbers whether the data live on the CPU or a GPU.
    return torch.rand((), generator=generator, device=generator.device, dtype=torch.float64).to(device)


def _kmeanspp_init(x: Tensor, num_clusters: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding on unit vectors with cosine distance ``1 - cos``; ``[E, D]``."""
    F = x.shape[0]
    first = int(torch.randint(F, (), generator=generator, device=generator.device))
    chosen = [first]
    # 1 - cos is in [0, 2]; the squared distance of the k-means++ rule.
    dist = (1.0 - x @ x[first]).clamp_min(0.0).double() ** 2  # [F]
    for _ in range(1, num_clusters):
        cdf = torch.cumsum(dist, 0)
        total = cdf[-1]
        if total <= 0:  # every remaining point coincides with a centre: take the next unused one
            used = torch.zeros(F, dtype=torch.bool, device=x.device)
            used[torch.tensor(chosen, device=x.device)] = True
            nxt = int(torch.nonzero(~used)[0])
        else:
            # Inverse-CDF sampling; the clamp guards against u * total rounding to the end.
            nxt = int(torch.searchsorted(cdf, _uniform(generator, x.device) * total).clamp(max=F - 1))
        chosen.append(nxt)
        dist = torch.minimum(dist, (1.0 - x @ x[nxt]).clamp_min(0.0).double() ** 2)
    return x[torch.tensor(chosen, device=x.device)].clone()


def balanced_assign(sim: Tensor, capacity: int) -> Tensor:
    """Assign each row to a column, exactly ``capacity`` rows per column, greedily by similarity.

    Rounds of proposals: every unassigned row proposes to its most similar column
    that still has room; each column accepts its best proposers (by similarity,
    ties to the lower row index) up to its remaining capacity, and the rejected
    rows propose again. Each round either places every proposer or fills at
    least one column, so it ends after at most E + 1 rounds (a handful in
    practice), all vectorised: no Python loop over the F * E pairs.

    Parameters
    ----------
    sim : Tensor
        ``[F, E]`` float similarities, ``F == E * capacity``; CPU or CUDA.
    capacity : int
        S, the members per column.

    Returns
    -------
    Tensor
        ``[F]`` int64 column of each row, on the device of ``sim``.

    Examples
    --------
    >>> sim = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.1, 0.0]])
    >>> balanced_assign(sim, 2).tolist()
    [0, 0, 1, 1]
    """
    F, E = sim.shape
    if F != E * capacity:
        raise ValueError(f"balanced_assign: F = {F} rows must equal E * capacity = {E} * {capacity}")
    device = sim.device
    assign = torch.full((F,), -1, dtype=torch.long, device=device)
    room = torch.full((E,), capacity, dtype=torch.long, device=device)
    pending = torch.arange(F, device=device)
    neg_inf = torch.tensor(float("-inf"), dtype=sim.dtype, device=device)
    while pending.numel():
        s = torch.where(room[None, :] > 0, sim[pending], neg_inf)  # [U, E]
        best = s.argmax(dim=1)  # ties: first (lowest) column
        val = s.gather(1, best[:, None])[:, 0]
        # Order proposals by (column, similarity descending, row ascending): two stable sorts.
        order = torch.sort(val, descending=True, stable=True).indices
        order = order[torch.sort(best[order], stable=True).indices]
        col = best[order]
        counts = torch.bincount(col, minlength=E)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(col.numel(), device=device) - starts[col]
        accept = rank < room[col]
        assign[pending[order[accept]]] = col[accept]
        room -= torch.bincount(col[accept], minlength=E)
        pending = torch.sort(pending[order[~accept]]).values
    return assign


def _canonical(assign: Tensor, num_clusters: int) -> tuple[Tensor, Tensor, Tensor]:
    """Relabel clusters by their smallest member, so a partition has exactly one permutation.

    Returns ``(assignment, permutation, old_label_of_new_label)``.
    """
    F = assign.numel()
    idx = torch.arange(F, device=assign.device)
    first = torch.full((num_clusters,), F, dtype=torch.long, device=assign.device)
    first = first.scatter_reduce(0, assign, idx, reduce="amin")  # [E] smallest member of each cluster
    old_of_new = torch.argsort(first)
    new_of_old = torch.empty_like(old_of_new)
    new_of_old[old_of_new] = torch.arange(num_clusters, device=assign.device)
    assign = new_of_old[assign]
    # A stable sort by cluster keeps members ascending inside each expert.
    perm = torch.sort(assign, stable=True).indices
    return assign, perm, old_of_new


def balanced_kmeans(
    weight: Tensor,
    cluster_size: int,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    max_iter: int = 30,
    init: str = "kmeans++",
    progress: bool = False,
) -> KMeansResult:
    """Cluster the F rows of ``weight`` into ``E = F / S`` clusters of exactly S rows each.

    Spherical k-means: rows are L2-normalised and compared by cosine similarity.
    Each iteration computes the ``[F, E]`` similarities to the centroids, assigns
    with :func:`balanced_assign` (capacity S) and recomputes the centroids as the
    normalised mean of their members. It stops when the assignment no longer
    changes or after ``max_iter`` iterations, and returns the best assignment
    seen (by mean similarity), since a capacity-constrained greedy step is not
    guaranteed to improve the objective.

    Parameters
    ----------
    weight : Tensor
        ``[F, D]`` neuron input vectors (rows of ``Wg``, or of ``Wi`` for a plain FFN),
        any float dtype, CPU or CUDA; computed in float32.
    cluster_size : int
        S, dividing F.
    seed : int
        Seeds a CPU ``torch.Generator`` when ``generator`` is not given.
    generator : torch.Generator, optional
        Source of randomness for the initialisation.
    max_iter : int
        Maximum assignment/update iterations (>= 1).
    init : {"kmeans++", "random"}
        k-means++ seeding (cosine distance) or S-free random distinct rows.
    progress : bool
        Show a tqdm bar over the iterations.

    Returns
    -------
    KMeansResult
        ``permutation [F]`` and ``assignment [F]`` int64 on the device of ``weight``,
        clusters numbered by their smallest member, members ascending inside a cluster.
        The same seed gives the same result on every run.

    Examples
    --------
    >>> w = torch.randn(64, 8)
    >>> res = balanced_kmeans(w, 16, seed=0)
    >>> res.permutation.shape, torch.bincount(res.assignment).tolist()
    (torch.Size([64]), [16, 16, 16, 16])
    """
    from tqdm.auto import tqdm

    if weight.dim() != 2:
        raise ValueError(f"balanced_kmeans: weight must be [F, D]; got {list(weight.shape)}")
    F = weight.shape[0]
    if cluster_size < 1 or F % cluster_size:
        raise ValueError(f"balanced_kmeans: the cluster size S = {cluster_size} must divide F = {F}")
    if max_iter < 1:
        raise ValueError(f"balanced_kmeans: max_iter must be >= 1; got {max_iter}")
    if init not in ("kmeans++", "random"):
        raise ValueError(f"balanced_kmeans: init must be 'kmeans++' or 'random'; got {init!r}")
    E, S = F // cluster_size, cluster_size
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    x = _normalize(weight.detach().float())  # [F, D]

    if E == 1:  # one cluster: nothing to choose
        assign = torch.zeros(F, dtype=torch.long, device=x.device)
        centroids = _normalize(x.sum(0, keepdim=True))
        return KMeansResult(torch.arange(F, device=x.device), assign, centroids, float((x @ centroids[0]).mean()), 0)

    if init == "kmeans++":
        centroids = _kmeanspp_init(x, E, generator)
    else:
        pick = torch.randperm(F, generator=generator, device=generator.device)[:E].to(x.device)
        centroids = x[pick].clone()

    best_assign, best_obj, prev, it = None, float("-inf"), None, 0
    bar = tqdm(range(max_iter), desc=f"balanced k-means {F}->{E}x{S}", disable=not progress, leave=False)
    for it in bar:  # noqa: B007  (``it`` is reported after the loop)
        assign = balanced_assign(x @ centroids.t(), S)  # [F]
        # Centroid update without atomics (index_add_ is non-deterministic on CUDA):
        # group the rows by cluster, every cluster has exactly S of them.
        order = torch.sort(assign, stable=True).indices
        centroids = _normalize(x[order].view(E, S, -1).sum(1))  # [E, D]
        obj = float((x * centroids[assign]).sum(-1).mean())
        bar.set_postfix(objective=f"{obj:.4f}")
        if obj > best_obj:
            best_assign, best_obj, best_centroids = assign, obj, centroids
        if prev is not None and torch.equal(assign, prev):
            break
        prev = assign
    bar.close()
    assign, perm, old_of_new = _canonical(best_assign, E)
    return KMeansResult(perm, assign, best_centroids[old_of_new], best_obj, it + 1)
