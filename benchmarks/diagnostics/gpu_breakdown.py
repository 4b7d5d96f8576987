"""Where a call's time goes on the GPU machine: wall-clock per call (synchronised,
as the benchmarks time it) next to the CUDA kernel time per call (torch.profiler's
device self-time), so host overhead and kernel time can be told apart.
Run by gpu_check.sh after the benchmarks:  python -m benchmarks.diagnostics.gpu_breakdown"""

import logging

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import call_us
from opensora_fast.utils.inference import prepare_inference_condition
from opensora_fast.utils.train import get_batch_loss

logging.getLogger("opensora_fast").setLevel(logging.ERROR)  # the t2v fallback note, once per call
dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(0)


def kernel_us(fn, n=50):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    # kernels and copies only (device-side events), so nothing is counted twice
    total = sum(e.self_device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA)
    return total / n


z = torch.randn(4, 16, 33, 24, 42, generator=g, device=dev).bfloat16()
refs = [[torch.randn(16, 33, 24, 42, generator=g, device=dev).bfloat16()] for _ in range(4)]
refs[2] = None
# as bench_condition's i2v_loop: two one-frame references a sample, every sample referenced
loop_refs = [[torch.randn(16, 1, 24, 42, generator=g, device=dev).bfloat16() for _ in range(2)] for _ in range(4)]
pred = torch.randn(4, 8316, 64, generator=g, device=dev).bfloat16().requires_grad_()
target = torch.randn(4, 8316, 64, generator=g, device=dev).bfloat16()
masks = torch.zeros(4, 33, 24, 42, device=dev)
masks[0, 0] = 1


def loss(m):
    return lambda: torch.autograd.grad(get_batch_loss(pred, target, m), [pred])


cases = {
    "prepare_inference_condition v2v_head": lambda: prepare_inference_condition(z, "v2v_head", refs),
    "prepare_inference_condition i2v_loop": lambda: prepare_inference_condition(z, "i2v_loop", refs),
    "prepare_inference_condition i2v_loop, all": lambda: prepare_inference_condition(z, "i2v_loop", loop_refs),
    "get_batch_loss fwd+bwd unmasked 256px": loss(None),
    "get_batch_loss fwd+bwd masked 256px": loss(masks),
}
print(f"per-call time split on {torch.cuda.get_device_name()} (us; median wall of 200 synchronised calls)")
print(f"  {'call':40s} {'wall':>8s} {'host':>8s} {'kernels':>8s}")
# every wall and host time before the first profiler session (kernel_us), so no
# profiler state left in the process can count in them
times = {
    name: (call_us(fn, sync=torch.cuda.synchronize, each=True), call_us(fn, sync=torch.cuda.synchronize))
    for name, fn in cases.items()
}
for name, fn in cases.items():
    wall, host = times[name]
    print(f"  {name:40s} {wall:8.1f} {host:8.1f} {kernel_us(fn):8.1f}")
