#!/usr/bin/env python
"""Compile every Triton kernel launch the CPU tests made for sm_90 (Hopper), without a GPU.

The CPU tests run the Triton kernels in Triton's interpreter, which executes them as Python: a
kernel that the interpreter accepts can still fail to compile for the GPU (an op or a keyword the
compiler rejects, a layout it cannot lower, too much shared memory). This closes that gap in two
steps:

1. ``record(path)``, installed by ``python_tests/conftest.py`` when ``PRUNEPATH_RECORD_TRITON`` names
   a file, writes every distinct launch of the test run (kernel, argument types, constexpr values)
   to that JSON file.
2. ``python bench/diag/triton_sm90_compile.py LAUNCHES.json`` (no ``TRITON_INTERPRET``) compiles
   each recorded launch for ``GPUTarget("cuda", 90, 32)`` through ``ptxas`` as the GPU would, with
   the GPU's settings where the interpreter's differ: ``PDL`` on (programmatic dependent launch),
   4 warps and 3 stages, and each fp16 launch once more in bf16. It prints one line per kernel and
   exits 1 if any launch fails to compile.

    PRUNEPATH_RECORD_TRITON=/tmp/launches.json ./quickstart.sh test      # .ci/run does this
    .venv/bin/python bench/diag/triton_sm90_compile.py /tmp/launches.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections import defaultdict

# Triton's pointer types for torch dtypes (the signature strings of triton.compiler.ASTSource).
_PTR = {
    "torch.float32": "*fp32",
    "torch.float16": "*fp16",
    "torch.bfloat16": "*bf16",
    "torch.float64": "*fp64",
    "torch.int32": "*i32",
    "torch.int64": "*i64",
    "torch.int16": "*i16",
    "torch.int8": "*i8",
    "torch.uint8": "*u8",
    "torch.bool": "*i1",
}


def _arg_type(value) -> str | None:
    """The signature type of a runtime argument; None for what Triton treats as a constant."""
    if value is None:
        return None
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return _PTR[str(value.dtype)]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(value).__name__}")


def _is_constexpr(param) -> bool:
    return "constexpr" in str(param.annotation)


def record(path: str) -> None:
    """Wrap the interpreter's kernel launches so that each distinct one is written to ``path`` at exit."""
    import atexit
    import inspect

    from triton.runtime.interpreter import InterpretedFunction

    seen: dict[str, dict] = {}
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if not self.fn.__module__.startswith("prunepath_ops."):  # a test's own helper kernel: not shipped
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        try:
            params = list(inspect.signature(self.fn).parameters.values())
            bound = dict(zip((p.name for p in params), args, strict=False)) | kwargs
            signature, constexprs = {}, {}
            for p in params:
                value = bound.get(p.name, p.default if p.default is not inspect.Parameter.empty else None)
                if _is_constexpr(p):
                    constexprs[p.name] = value
                else:
                    t = _arg_type(value)
                    signature[p.name] = t if t is not None else "constexpr"
                    if t is None:
                        constexprs[p.name] = None
            entry = {"module": self.fn.__module__, "kernel": self.fn.__name__, "signature": signature,
                     "constexprs": constexprs}  # fmt: skip
            seen.setdefault(json.dumps(entry, sort_keys=True, default=str), entry)
        except Exception as exc:  # recording must never change what the tests see
            print(f"triton launch recorder: {self.fn.__name__}: {exc}", file=sys.stderr)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run

    def write():
        with open(path, "w") as f:
            json.dump(sorted(seen.values(), key=lambda e: (e["module"], e["kernel"])), f, indent=1, default=str)

    atexit.register(write)


def _variants(entry: dict) -> list[dict]:
    """The launch as recorded, with the GPU's settings, and in bf16 where it ran in fp16."""
    out = [entry]
    if any(t == "*fp16" for t in entry["signature"].values()):
        bf = {k: ("*bf16" if t == "*fp16" else t) for k, t in entry["signature"].items()}
        out.append({**entry, "signature": bf})
    return out


def compile_all(launches: list[dict], arch: int) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    done: dict[str, list[float]] = defaultdict(list)
    failed = 0
    keys = set()
    for entry in launches:
        for v in _variants(entry):
            fn = getattr(importlib.import_module(v["module"]), v["kernel"])
            constexprs = dict(v["constexprs"])
            if "PDL" in constexprs:
                constexprs["PDL"] = True  # the GPU launches with programmatic dependent launch
            key = json.dumps([v["module"], v["kernel"], v["signature"], constexprs], sort_keys=True, default=str)
            if key in keys:
                continue
            keys.add(key)
            names = fn.arg_names
            src = ASTSource(
                fn=fn,
                signature={n: v["signature"].get(n, "constexpr") for n in names},
                constexprs={(names.index(n),): c for n, c in constexprs.items()},
            )
            t0 = time.perf_counter()
            try:
                triton.compile(src, target=target, options={"num_warps": 4, "num_stages": 3})
                done[v["kernel"]].append(time.perf_counter() - t0)
            except Exception as exc:
                failed += 1
                msg = str(exc).strip().splitlines()
                print(f"FAIL {v['kernel']} {v['signature']} {constexprs}: {msg[-1] if msg else type(exc).__name__}")
    for name, times in sorted(done.items()):
        print(f"ok   {name}: {len(times)} launch(es) compiled for sm_{arch} in {sum(times):.1f} s")
    print(f"{sum(map(len, done.values()))} compiled, {failed} failed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("launches", help="the JSON file the recorder wrote")
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an integer (default 90)")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    with open(args.launches) as f:
        launches = json.load(f)
    if not launches:
        print("no launches recorded")
        return 1
    return compile_all(launches, args.arch)


if __name__ == "__main__":
    sys.exit(main())
