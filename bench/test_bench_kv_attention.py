"""pytest-benchmark: ``prunepath_ops.attention.kv_decode_attention`` next to the loop reference it replaces.

Legend: B sequences, L keys per sequence, Hq = 32 query heads, Hkv = 8 kv heads, D = 128.

Each (B, L, dtype) is one pytest-benchmark group holding ``prunepath`` (the op, backend auto:
Triton on CUDA, the vectorised composite on the CPU) and ``reference``
(``prunepath_ops.reference.kv_decode_attention``: a Python loop over the sequences, kv heads
repeated per query head). Lengths are ragged around L (seeded, 0.5 L to L), S_max = L. Times are
wall-clock per call with the device synchronised inside the timed function (host overhead
included, L2 warm); ``bench/kv_attention_gpu.py`` measures device time with the L2 flushed and
compares with SDPA. The op is checked against the reference before it is timed.
"""

from __future__ import annotations

import pytest
import torch

from prunepath_ops import reference
from prunepath_ops.attention import kv_decode_attention
from prunepath_ops.testing import assert_close

HQ, HKV, D = 32, 8, 128
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHAPES = [pytest.param(B, L, id=f"B{B}-L{L}") for B, L in ((1, 1024), (1, 4096), (8, 1024), (32, 512))]
IMPLS = {"prunepath": kv_decode_attention, "reference": reference.kv_decode_attention}


def make_inputs(B: int, L: int, dtype: torch.dtype, device: torch.device):
    """(q [B, Hq, D], k_cache, v_cache [B, L, Hkv, D], cache_seqlens [B] int32 in [L/2, L])."""
    gen = torch.Generator().manual_seed(B * 7919 + L)
    q = torch.randn(B, HQ, D, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(B, L, HKV, D, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(B, L, HKV, D, generator=gen).to(device=device, dtype=dtype)
    lens = torch.randint(L // 2, L + 1, (B,), generator=gen, dtype=torch.int32).to(device)
    return q, k, v, lens


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("B,L", SHAPES)
def test_kv_decode_attention(benchmark, bench_device, sync, plan_rounds, bench_record, B, L, bench_dtype, impl):
    dtype = DTYPES[bench_dtype]
    q, k, v, lens = make_inputs(B, L, dtype, bench_device)
    benchmark.group = f"kv_decode_attention B={B} L={L} {bench_dtype}"
    nbytes = int(lens.sum()) * HKV * D * 2 * q.element_size()  # the KV rows attended
    benchmark.extra_info.update({"op": "kv_decode_attention", "impl": impl, "B": B, "L": L, "Hq": HQ, "Hkv": HKV,
                                 "D": D, "dtype": bench_dtype, "bytes": nbytes})  # fmt: skip
    fn = IMPLS[impl]
    if impl == "prunepath":
        expected = reference.kv_decode_attention(q.cpu(), k.cpu(), v.cpu(), lens.cpu())
        assert_close(fn(q, k, v, lens).cpu().float(), expected.float(), dtype)  # a wrong op fails, no number

    def run():
        out = fn(q, k, v, lens)
        sync()
        return out

    rounds, warmup_rounds = plan_rounds(run)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_us"] = median * 1e6
        benchmark.extra_info["GB/s"] = nbytes / median / 1e9
        bench_record(group=benchmark.group, impl=impl, median_s=median, nbytes=nbytes)
