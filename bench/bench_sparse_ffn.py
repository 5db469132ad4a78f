"""pytest-benchmark: routed expert FFN vs the dense FFN (issue 3, CPU target at the SmolLM2 shape).

Run: ``python -m pytest bench/bench_sparse_ffn.py --benchmark-group-by=param:case``.
CPU target: SmolLM2-135M FFN (d=576, F=1536, S=32, E=48), batch 1, 30% of experts
active: the sparse path (the C++ kernel ``prunepath::expert_ffn``) at least 2x faster
than dense. ``torch_sparse_30`` is the sparse PyTorch composite (``backend="torch"``)
for comparison. Results: ``bench/results/sparse_ffn_cpu.txt``. On a GPU the same cases run
through the Triton kernels (the GPU script ``sparse_ffn_gpu.py`` gives the full table).
"""

from __future__ import annotations

import pytest
import torch

import prunepath_ops as pp
from prunepath_ops import reference as R

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def fixed_fraction_route(T: int, E: int, frac: float, device: str):
    """Each token keeps round(frac * E) random experts, gate sigmoid of a random logit."""
    n = max(1, round(frac * E))
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).int()
    ids[:, n:] = -1
    gates = torch.sigmoid(torch.randn(T, E, generator=g)).masked_fill(ids < 0, 0.0)
    return ids.to(device), gates.to(device), torch.full((T,), n, dtype=torch.int32, device=device)


def smollm_ffn(device: str, dtype: torch.dtype, d: int = 576, F: int = 1536, S: int = 32):
    g = torch.Generator().manual_seed(0)
    wg, wu = (torch.randn(F, d, generator=g) / d**0.5 for _ in range(2))
    wd = torch.randn(d, F, generator=g) / F**0.5
    wg, wu, wd = (w.to(device=device, dtype=dtype) for w in (wg, wu, wd))
    return (wg, wu, wd), pp.pack_experts(wg, wd, S, w_up=wu)


@pytest.mark.parametrize("T", [1, 16])
@pytest.mark.parametrize("impl", ["dense", "sparse_30", "sparse_10", "torch_sparse_30"])
def test_smollm2_ffn(benchmark, impl, T):
    benchmark.group = f"smollm2 T={T} {DEVICE}"
    (wg, wu, wd), packed = smollm_ffn(DEVICE, DTYPE)
    x = torch.randn(T, 576, device=DEVICE, dtype=DTYPE)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    if impl == "dense":

        def run():
            R.dense_ffn(x, wg, wd, w_up=wu)
            sync()
    else:
        route = fixed_fraction_route(T, packed.num_experts, int(impl.split("_")[-1]) / 100, DEVICE)
        # torch_sparse_*: the sparse PyTorch composite (backend="torch"), the CPU path before the C++ kernel
        backend = "torch" if impl.startswith("torch") else "auto"
        if backend == "torch" and DEVICE != "cpu":
            pytest.skip("backend='torch' is the CPU composite")

        def run():
            pp.sparse_ffn(x, route, packed, backend=backend)
            sync()

    with torch.inference_mode():
        benchmark(run)
