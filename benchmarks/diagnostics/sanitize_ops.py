"""Calls every CUDA op (loss_ranges included) once on small odd shapes, for compute-sanitizer
(memcheck, racecheck) in benchmarks/gpu_check.sh."""

import glob
import importlib
import os

import torch

import opensora_fast  # noqa: F401  (loads the ops)

OP = torch.ops.opensora_fast
dev = "cuda"
g = torch.Generator().manual_seed(0)
for edt, sdt in [(torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.bfloat16)]:
    sizes = [1, 3, 4099, 32768 * 3 + 5] + [17] * 300
    ema = [torch.randn(n + 1, generator=g).to(edt).to(dev)[1:] for n in sizes]  # misaligned
    src = [torch.randn(n, generator=g).to(sdt).to(dev) for n in sizes]
    OP.ema_update_(ema, src, 0.999, False, 0)
    OP.ema_update_(ema, src, 0.999, True, 5)
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    p = torch.randn(3, 3001, 7, generator=g).to(dtype).to(dev)
    t = torch.randn(3, 3001, 7, generator=g).to(dtype).to(dev)
    r = torch.tensor([[0, 3001], [5, 2999], [1, 1]], device=dev)
    OP.masked_mse(p, t, r)
    OP.masked_mse_backward(torch.tensor(0.5, device=dev), p, t, r)
    OP.masked_mse(p[:, 1:].contiguous(), t[:, 1:].contiguous(), r.clamp(max=3000))
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    srcs = [
        torch.randn(5, 10, 13, 11, generator=g).to(sdt).to(dev)
        for sdt in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    ]
    srcs.append(torch.randn(6, 12, 14, 13, generator=g).to(dev)[1:, 1:11, 1:, :11])  # offset, strided
    plan = [0, 0, 9, 0, 1, 1, 0, 1, 1, 0, 1, 8, 1, 4, 3, 2, 2, 3, 2, 4, 2, 6, 2, 3, 0]
    OP.condition(torch.empty(3, 5, 9, 13, 11, dtype=dtype, device=dev), srcs, plan)
    OP.condition_cat_(torch.empty(3, 6, 9, 13, 11, dtype=dtype, device=dev), srcs, plan)
    big = [torch.randn(2, 4, 97, 101, generator=g).to(dtype).to(dev)]  # several chunks per piece
    OP.condition_cat_(torch.empty(2, 3, 5, 97, 101, dtype=dtype, device=dev), big, [0, 1, 4, 0, 0, 1, 0, 2, 0, 2])
for dtype, world in ((torch.bfloat16, 3), (torch.float32, 4), (torch.uint8, 5), (torch.complex128, 2)):
    # unpad_: params smaller than the world, 0-dim, odd sizes; into device and pinned memory
    shapes = [(), (1,), (2,), (5, 3), (40000,)] + [(17,)] * 300
    shard = [-(-torch.Size(s).numel() // world) for s in shapes]
    offset = [sum(shard[:i]) for i in range(len(shard))]
    gathered = torch.randn(world, sum(shard), generator=g).to(dtype).to(dev)
    outs = [torch.empty(s, dtype=dtype, device=dev) for s in shapes]
    OP.unpad_(gathered, outs, offset, shard, [0] * len(shard), shard)
    pinned = [torch.empty(s, dtype=dtype).pin_memory() for s in shapes]
    OP.unpad_(gathered, pinned, offset, shard, [0] * len(shard), shard)
for dtype in (torch.float32, torch.bfloat16, torch.bool, torch.int64):
    # loss_ranges: strided frame masks, T=1 and long T, more samples than a block
    for T in (1, 2, 33):
        full = (torch.rand(300, T, 3, generator=g) < 0.3).to(dtype).to(dev)
        for upstream in (True, False):
            OP.loss_ranges(full[:, :, 1], 7, upstream)
# ops added since keep their cases in their own benchmark file: a `sanitize(device)` there
for path in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "bench_*.py"))):
    module = importlib.import_module(f"benchmarks.{os.path.splitext(os.path.basename(path))[0]}")
    if hasattr(module, "sanitize"):
        module.sanitize(dev)
torch.cuda.synchronize()
print("sanitize_ops: all ops ran")
