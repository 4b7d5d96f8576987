"""The optimizer+EMA phase over a shard of the 11B model (1082 fp32 master
tensors, world 96 by default: OSF_BENCH_WORLD): torch's AdamW (foreach, fused)
followed by our EMA op, FusedAdamW followed by our EMA op, and FusedAdamW with
the EMA attached (one pass), with a copy_ of the same bytes as the roofline.

Bytes that must move per element: read p, g, m, v and write p, m, v (28, fp32)
plus read and write a bf16 EMA (4): 32, the same figure for every row, so
GB/s compare the same work (a separate EMA pass moves 8 more)."""

import math
import os

import pytest
import torch
from torch import nn

from benchmarks.common import bench_device, copy_roofline, run
from benchmarks.layouts import flux_mmdit_11b_shapes, shard_numel
from opensora_fast import ops
from opensora_fast.optim import FusedAdamW

WORLD = int(os.environ.get("OSF_BENCH_WORLD", "96"))
DECAY = 0.9999
HYPER = dict(lr=1e-4, weight_decay=0.0, eps=1e-15)  # Open-Sora's optimizer settings
BYTES_PER_ELEMENT = 28 + 4


@pytest.fixture(scope="module")
def shard():
    """fp32 masters with gradients (one module, as a ZeRO wrapper's inner
    optimizer sees them) and a bf16 EMA of the same layout."""
    dev = bench_device()
    g = torch.Generator(device=dev).manual_seed(0)
    sizes = [shard_numel(math.prod(s), WORLD) for s in flux_mmdit_11b_shapes()]
    model, ema = nn.Module(), nn.Module()
    for i, n in enumerate(sizes):
        p = nn.Parameter(torch.randn(n, generator=g, device=dev))
        p.grad = torch.randn(n, generator=g, device=dev) * 1e-2
        model.register_parameter(f"p{i}", p)
        ema.register_parameter(
            f"p{i}", nn.Parameter(torch.randn(n, generator=g, device=dev).bfloat16(), requires_grad=False)
        )
    total = sum(sizes)
    group = f"adamw+ema fp32 masters, bf16 ema, 1082 tensors, {total / 1e6:.1f}M params (world {WORLD}), {dev.type}"
    return group, model, ema, total * BYTES_PER_ELEMENT, dev


def _emas(model, ema):
    return list(ema.parameters()), list(model.parameters())


def test_copy(benchmark, shard):
    group, model, ema, nbytes, dev = shard
    copy_roofline(benchmark, group, nbytes, dev)


def _torch_then_ema(benchmark, shard, impl, role, **flags):
    group, model, ema, nbytes, dev = shard
    opt = torch.optim.AdamW(model.parameters(), **HYPER, **flags)
    e, s = _emas(model, ema)

    def step():
        opt.step()
        ops.ema_update_(e, s, DECAY)

    run(benchmark, step, group=group, impl=impl, role=role, nbytes=nbytes)


def test_torch_foreach_then_ema(benchmark, shard):
    _torch_then_ema(benchmark, shard, "torch AdamW foreach + our EMA", "baseline", foreach=True)


def test_torch_fused_then_ema(benchmark, shard):
    _torch_then_ema(benchmark, shard, "torch AdamW fused + our EMA", "alternative", fused=True)


def test_fused_adamw_then_ema(benchmark, shard):
    group, model, ema, nbytes, dev = shard
    opt = FusedAdamW(model.parameters(), **HYPER)
    e, s = _emas(model, ema)

    def step():
        opt.step()
        ops.ema_update_(e, s, DECAY)

    run(benchmark, step, group=group, impl="FusedAdamW + our EMA (2 passes)", role="ours-", nbytes=nbytes)


def test_fused_adamw_attached_ema(benchmark, shard):
    group, model, ema, nbytes, dev = shard
    opt = FusedAdamW(model.parameters(), **HYPER)
    opt.attach_ema(ema, model, decay=DECAY)
    run(benchmark, opt.step, group=group, impl="FusedAdamW, EMA attached (1 pass)", role="ours", nbytes=nbytes)
    opt.detach_ema(ema)


def sanitize(device: str) -> None:
    """Small odd-sized calls for compute-sanitizer (benchmarks/diagnostics/sanitize_ops.py):
    misaligned sizes, amsgrad and maximize, an attached bf16 EMA in both roundings."""
    import copy

    g = torch.Generator().manual_seed(0)
    for amsgrad, maximize, rounding in ((False, False, "compat"), (True, True, "stochastic")):
        model = nn.Module()
        for i, n in enumerate([1, 3, 4099, 32768 * 3 + 5] + [17] * 40):
            model.register_parameter(f"p{i}", nn.Parameter(torch.randn(n, generator=g).to(device)))
        ema = copy.deepcopy(model).bfloat16().requires_grad_(False)
        opt = FusedAdamW(model.parameters(), lr=1e-3, weight_decay=0.01, amsgrad=amsgrad, maximize=maximize)
        opt.attach_ema(ema, model, decay=0.999, rounding=rounding)
        for _ in range(2):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g).to(device)
            opt.step()
