"""Host time per call on tiny inputs: what a call costs before any real work, the
part that dominated on the H100 machine (benchmarks/gpu_breakdown.py). CPU, one
thread, best of 5 batches of 2000 calls. Run: python -m benchmarks.host_overhead"""
import logging

import torch
import torch.nn.functional as F

from benchmarks.common import call_us
from opensora_fast.utils.inference import prepare_inference_condition
from opensora_fast.utils.train import get_batch_loss

logging.getLogger("opensora_fast").setLevel(logging.ERROR)
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
p = torch.randn(4, 16, 8, generator=g, requires_grad=True)
t = torch.randn(4, 16, 8, generator=g)
masks = torch.zeros(4, 4, 4, 4)  # T=4, 2x2 tokens per frame at patch 2: L=16
masks[0, 0] = 1
masks[1, -1] = 1
z = torch.randn(4, 4, 9, 4, 6, generator=g).bfloat16()
refs = [[torch.randn(4, 9, 4, 6, generator=g).bfloat16()] for _ in range(4)]


cases = {
    "F.mse_loss fwd+bwd (for scale)": lambda: torch.autograd.grad(F.mse_loss(p.float(), t.float()), [p]),
    "get_batch_loss fwd+bwd unmasked": lambda: torch.autograd.grad(get_batch_loss(p, t), [p]),
    "get_batch_loss fwd+bwd masked": lambda: torch.autograd.grad(get_batch_loss(p, t, masks), [p]),
    "prepare_inference_condition v2v_head": lambda: prepare_inference_condition(z, "v2v_head", refs),
    "prepare_inference_condition i2v_loop": lambda: prepare_inference_condition(z, "i2v_loop", refs),
}
print(f"host time per call, tiny inputs, 1 thread, torch {torch.__version__} (us, best of 5 x 2000)")
for name, fn in cases.items():
    print(f"  {name:40s} {call_us(fn, 2000, batches=5):8.1f}")
