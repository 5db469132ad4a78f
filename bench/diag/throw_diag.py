"""Which path turns a C++ op error into a crash? Run each case in its own process."""

import subprocess
import sys

CASES = {
    "raw_library": "import torch, glob; torch.ops.load_library(glob.glob('prunepath_ops/_C*.so')[0]); torch.ops.prunepath.topp_route(torch.zeros(4), 0.5, None, 1, None, 'sigmoid')",
    "raw_library_torch_check": "import torch, glob; torch.ops.load_library(glob.glob('prunepath_ops/_C*.so')[0]); torch.ops.prunepath.topp_route(torch.zeros(4, 8), float('nan'), None, 1, None, 'sigmoid')",
    "with_package": "import torch, prunepath_ops; torch.ops.prunepath.topp_route(torch.zeros(4), 0.5, None, 1, None, 'sigmoid')",
    "aten_error": "import torch, prunepath_ops; torch.zeros(4) @ torch.zeros(3)",
}
for name, code in CASES.items():
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True)
    last = (r.stderr.strip().splitlines() or [""])[-1]
    print(f"{name}: rc={r.returncode} {last[:200]}")
    if r.returncode not in (0, 1):
        print("\n".join(r.stderr.splitlines()[:12]))
