import torch

import prunepath_ops as pp

x = torch.randn(65536, 448, device="cuda", dtype=torch.bfloat16) * 2
for _ in range(2):
    pp.topp_route(x, 0.5)
torch.cuda.synchronize()
