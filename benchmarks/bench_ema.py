"""EMA over a shard of the 11B model (1082 tensors): upstream's per-tensor
mul_/add_ loop vs torch._foreach_lerp_ vs the fused op, with a copy_ of the
same bytes as the roofline. OSF_BENCH_WORLD sets the world size (default 96)."""

import os

import pytest
import torch

from benchmarks.common import bench_device, copy_roofline, run
from benchmarks.layouts import flux_mmdit_11b_shapes, shard_numel
from opensora_fast import ops, reference

WORLD = int(os.environ.get("OSF_BENCH_WORLD", "96"))
DECAY = 0.9999
CASES = {"bf16<-fp32": (torch.bfloat16, torch.float32), "fp32<-fp32": (torch.float32, torch.float32)}


@pytest.fixture(scope="module", params=list(CASES))
def shard(request):
    import math

    edt, sdt = CASES[request.param]
    dev = bench_device()
    g = torch.Generator(device=dev).manual_seed(0)
    sizes = [shard_numel(math.prod(s), WORLD) for s in flux_mmdit_11b_shapes()]
    ema = [torch.randn(n, generator=g, device=dev).to(edt) for n in sizes]
    src = [torch.randn(n, generator=g, device=dev).to(sdt) for n in sizes]
    nbytes = sum(n * (2 * e.element_size() + s.element_size()) for n, e, s in zip(sizes, ema, src))
    group = f"ema {request.param}, 1082 tensors, {sum(sizes) / 1e6:.1f}M params (world {WORLD}), {dev.type}"
    return group, ema, src, nbytes, dev


def _isa_in_use(dev: torch.device) -> str:
    """The CPU ISA variant the CPU kernels run (named in the rows), or the device."""
    if dev.type != "cpu" or not hasattr(torch.ops.opensora_fast, "_cpu_isa"):
        return dev.type
    return torch.ops.opensora_fast._cpu_isa()


def test_copy(benchmark, shard):
    group, ema, src, nbytes, dev = shard
    copy_roofline(benchmark, group, nbytes, dev)


def test_upstream_loop(benchmark, shard):
    group, ema, src, nbytes, dev = shard
    run(
        benchmark,
        lambda: reference.ema.ema_update_(ema, src, DECAY),
        group=group,
        impl="upstream loop (mul_/add_)",
        role="baseline",
        nbytes=nbytes,
    )


def test_foreach_lerp(benchmark, shard):
    group, ema, src, nbytes, dev = shard

    def step():
        s = src if ema[0].dtype == src[0].dtype else [x.to(ema[0].dtype) for x in src]
        torch._foreach_lerp_(ema, s, 1 - DECAY)

    run(benchmark, step, group=group, impl="torch._foreach_lerp_ (+cast)", role="alternative", nbytes=nbytes)


def test_fused(benchmark, shard):
    group, ema, src, nbytes, dev = shard
    run(
        benchmark,
        lambda: ops.ema_update_(ema, src, DECAY),
        group=group,
        impl="opensora_fast (compat)",
        role="ours",
        nbytes=nbytes,
        isa=_isa_in_use(dev),
    )


def _cpu_isas() -> list[str]:
    """The CPU kernels' ISA variants this machine runs (csrc/cpu_isa.h), widest last."""
    if bench_device().type != "cpu" or not hasattr(torch.ops.opensora_fast, "_cpu_isa"):
        return []
    have, prev = [], torch.ops.opensora_fast._cpu_isa()
    for isa in ("baseline", "avx2", "avx512"):
        try:
            torch.ops.opensora_fast._cpu_isa(isa)
            have.append(isa)
        except (RuntimeError, ValueError):
            pass
    torch.ops.opensora_fast._cpu_isa(prev)
    return [isa for isa in have if isa != "baseline"]


@pytest.mark.parametrize("isa", _cpu_isas())
def test_fused_isa(benchmark, shard, isa):
    """The compat EMA with the CPU ISA variant forced (the default row runs the widest)."""
    group, ema, src, nbytes, dev = shard
    prev = torch.ops.opensora_fast._cpu_isa(isa)
    try:
        run(
            benchmark,
            lambda: ops.ema_update_(ema, src, DECAY),
            group=group,
            impl=f"opensora_fast (compat, CPU {isa})",
            role="ours+",
            nbytes=nbytes,
            isa=isa,
        )
    finally:
        torch.ops.opensora_fast._cpu_isa(prev)


def test_fused_stochastic(benchmark, shard):
    group, ema, src, nbytes, dev = shard
    run(
        benchmark,
        lambda: ops.ema_update_(ema, src, DECAY, stochastic=True, seed=1),
        group=group,
        impl="opensora_fast (stochastic)",
        role="ours+",
        nbytes=nbytes,
    )


class _Zero:
    def __init__(self, model):
        self.map = {id(p): p.detach().float().reshape(-1).clone() for p in model.parameters()}

    def get_working_to_master_map(self):
        return self.map


@pytest.fixture(scope="module")
def tiny_model():
    """1082 parameters of 64 elements: what is left is per-step Python and launch cost."""
    from torch import nn

    dev = bench_device()
    model, ema = nn.Module(), nn.Module()
    for i in range(1082):
        model.register_parameter(f"p{i}", nn.Parameter(torch.randn(64, device=dev).bfloat16()))
        ema.register_parameter(f"p{i}", nn.Parameter(torch.randn(64, device=dev).bfloat16(), requires_grad=False))
    return model, ema, _Zero(model)


OVERHEAD = "update_ema per-step overhead, 1082 params x 64 elements"


def test_update_ema_overhead_upstream(benchmark, tiny_model):
    model, ema, opt = tiny_model
    run(
        benchmark,
        lambda: reference.upstream.train.update_ema(ema, model, opt),
        group=OVERHEAD,
        impl="upstream update_ema",
        role="baseline",
        nbytes=1082 * 64 * 8,
    )


def test_update_ema_overhead_ours(benchmark, tiny_model):
    from opensora_fast.utils.train import update_ema

    model, ema, opt = tiny_model
    run(
        benchmark,
        lambda: update_ema(ema, model, opt),
        group=OVERHEAD,
        impl="opensora_fast update_ema",
        role="ours",
        nbytes=1082 * 64 * 8,
    )
