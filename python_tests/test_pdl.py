"""Programmatic dependent launch switch (prunepath_ops._pdl): when the Triton launches ask for it."""

import pytest
import torch

from prunepath_ops import _pdl

HAS_CUDA = torch.cuda.is_available()


def test_cpu_and_interpreter_never_use_pdl(monkeypatch):
    assert not _pdl.use_pdl(torch.device("cpu"))
    assert not _pdl.resolve(True, torch.device("cpu"))  # asking for PDL where it is unavailable: off
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _pdl.use_pdl(torch.device("cuda", 0))  # the interpreter has no grid dependency control


def test_launch_options_only_name_the_flag_when_on():
    # Off: no key at all, so a Triton without launch_pdl never sees an unknown launch option.
    assert _pdl.launch_options(False) == {}
    assert _pdl.launch_options(True) == {"launch_pdl": True}


@pytest.mark.parametrize("major", [8, 9])  # below Hopper: never; Hopper: as the Triton intrinsics allow
def test_capability_query_compiles_without_warnings(monkeypatch, major):
    """The op wrappers that torch.compile traces ask for PDL support: no Dynamo warning (an lru_cache
    wrapper gave one per compile), no graph break, the eager answer."""
    import warnings

    def capability(index=None):
        return (major, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(_pdl, "_PDL_SUPPORT", {})
    intrinsics = getattr(getattr(_pdl.tl, "extra", None), "cuda", None)
    expected = major >= 9 and hasattr(intrinsics, "gdc_wait") and hasattr(intrinsics, "gdc_launch_dependents")

    @torch.compile(fullgraph=True, backend="eager")
    def plus_one_with_pdl(x):
        return x + 1 if _pdl._device_supports_pdl(0) else x

    # The reset is set-up, outside the error filter: its first call imports torch._inductor, whose
    # import can warn by itself (torch 2.11: torch.jit.script_method's DeprecationWarning, seen on the
    # H200 when an xdist worker reached this test first).
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = plus_one_with_pdl(torch.zeros(2))
    assert bool(out[0] == 1) == expected == _pdl._device_supports_pdl(0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_env_switch_and_capability(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dev = torch.device("cuda", torch.cuda.current_device())
    monkeypatch.setenv("PRUNEPATH_PDL", "0")
    assert not _pdl.use_pdl(dev)
    monkeypatch.setenv("PRUNEPATH_PDL", "1")
    assert _pdl.use_pdl(dev) == (torch.cuda.get_device_capability(dev)[0] >= 9)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_pdl_does_not_change_bits():
    """With and without PDL, the decode FFN and the decode attention give the same bits."""
    import prunepath_ops as pp
    from prunepath_ops.attention.triton_attention import kv_decode_attention_triton
    from prunepath_ops.ffn.triton_ffn import sparse_ffn_decode_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    d, F, S = 256, 1024, 32
    packed = pp.pack_experts(
        torch.randn(F, d, device="cuda", generator=g).bfloat16(),
        torch.randn(d, F, device="cuda", generator=g).bfloat16(),
        S,
        w_up=torch.randn(F, d, device="cuda", generator=g).bfloat16(),
    )
    for T in (1, 5):
        x = torch.randn(T, d, device="cuda", generator=g).bfloat16()
        route = pp.topp_route(torch.randn(T, F // S, device="cuda", generator=g), 0.6)
        args = (x, *route, packed.w_in, packed.b_in, packed.w_down, packed.b_out, packed.gated, packed.act)
        assert torch.equal(sparse_ffn_decode_triton(*args, pdl=True), sparse_ffn_decode_triton(*args, pdl=False))
    q = torch.randn(2, 8, 128, device="cuda", generator=g).bfloat16()
    k = torch.randn(2, 3000, 2, 128, device="cuda", generator=g).bfloat16()
    v = torch.randn(2, 3000, 2, 128, device="cuda", generator=g).bfloat16()
    lens = torch.tensor([2999, 17], device="cuda", dtype=torch.int32)
    on = kv_decode_attention_triton(q, k, v, lens, None, None, None, pdl=True)
    assert torch.equal(on, kv_decode_attention_triton(q, k, v, lens, None, None, None, pdl=False))
