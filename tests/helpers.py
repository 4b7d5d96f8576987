"""Shared test utilities."""

import math
from typing import Any, Callable

import pytest
import torch

from benchmarks.layouts import flux_mmdit_11b_shapes, shard_numel
from opensora_fast import _ext
from opensora_fast._ext import HAS_NATIVE

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
PAIRS = [(e, s) for e in FLOATS for s in FLOATS]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view, so equality is bitwise (NaN-safe, -0 != +0)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, msg
    diff = (bits(a.contiguous().cpu()) != bits(b.contiguous().cpu())).sum().item()
    assert diff == 0, f"{msg}: {diff} of {a.numel()} elements differ"


def rand(n, dtype, gen, device="cpu", scale=1.0):
    return (torch.randn(n, generator=gen) * scale).to(dtype).to(device)


def z(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """Zeros: the small tensors of the contract tables."""
    return torch.zeros(*shape, dtype=dtype, device=device)


def inference_zeros(n: int) -> torch.Tensor:
    """An inference tensor (made under torch.inference_mode())."""
    with torch.inference_mode():
        return torch.zeros(n)


def free_cuda_bytes() -> int:
    """Free memory on the current CUDA device."""
    free, _ = torch.cuda.mem_get_info()
    return free


def shard_sizes(world_size: int) -> list[int]:
    """Per-rank shard sizes of the 11B model's 1082 tensors."""
    return [shard_numel(math.prod(s), world_size) for s in flux_mmdit_11b_shapes()]


def assert_ema_matches_reference(
    a: torch.Tensor, b: torch.Tensor, src: torch.Tensor, decay: float, same_reduced: bool
) -> None:
    """An EMA result ``a`` against the reference's ``b``: bitwise, except that
    torch's own bf16/bf16 and fp16/fp16 add (the compat reference) rounds the
    scalar remainder of its thread chunks differently: it rounds (1-d)*src to
    the dtype first, so there the two differ by at most one rounding of
    (1-d)*src plus one of the result (several ulps of the result when the sum
    cancels). ``same_reduced``: ema and src are that same reduced dtype and the
    update is not stochastic."""
    if not same_reduced:
        return assert_bitwise_equal(a, b)
    a, b, src = a.cpu(), b.cpu(), src.cpu()
    diff = (a.float() != b.float()) & ~(a.isnan() & b.isnan())
    eps, tiny = torch.finfo(a.dtype).eps, torch.finfo(a.dtype).tiny
    bound = eps * (b.float().abs() + ((1 - decay) * src.float()).abs()) + tiny
    within = ((a.float() - b.float()).abs() <= bound)[diff]
    assert bool(within.all()), f"{int((~within).sum())} of {a.numel()} elements differ beyond the bound"


# ---- native-only tests and the CPU ISA variants (csrc/cpu_isa.h) ----------------------

needs_native = pytest.mark.skipif(not HAS_NATIVE, reason="needs the native extension")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
CPU_ISAS = ("baseline", "avx2", "avx512")


def skip_without_native() -> None:
    """Skips the running test (inside its body) where the extension did not load."""
    if not _ext.HAS_NATIVE:
        pytest.skip(f"no native extension: {_ext._IMPORT_ERROR}")


def supported_isas() -> list[str]:
    """The CPU variants this machine runs (the private switch refuses the others)."""
    op = torch.ops.opensora_fast
    have = []
    prev = op._cpu_isa()
    try:
        for isa in CPU_ISAS:
            try:
                op._cpu_isa(isa)
                have.append(isa)
            except ValueError:
                pass
    finally:
        op._cpu_isa(prev)
    return have


def each_isa(fn: Callable[[], Any]) -> dict[str, Any]:
    """``fn()`` under every supported CPU variant, the caller's variant restored after: {isa: result}."""
    op = torch.ops.opensora_fast
    prev = op._cpu_isa()
    out = {}
    try:
        for isa in supported_isas():
            op._cpu_isa(isa)
            out[isa] = fn()
    finally:
        op._cpu_isa(prev)
    return out


def with_specials(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random values with NaN, infinities, signed zeros and subnormals (of dtype and of fp32) mixed in."""
    x = torch.randn(n, generator=gen)
    if n == 0:
        return x.to(dtype)
    odd = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -3e-39, 1e-45, 6e-8, 1e-5])
    idx = torch.randint(0, n, (max(n // 7, 1),), generator=gen)
    x[idx] = odd[torch.randint(0, len(odd), idx.shape, generator=gen)]
    return x.to(dtype)


def unpad_shards(world: int, shapes: list, dtype: torch.dtype, g: torch.Generator) -> tuple:
    """(gathered [world, bucket], offset, shard, begin, count) for ``unpad_``, with each
    tensor's shards side by side (model_sharding's zero padding included)."""
    numels = [torch.Size(s).numel() for s in shapes]
    shard = [-(-n // world) for n in numels]
    offset = [sum(shard[:i]) for i in range(len(shard))]
    gathered = (torch.randn(world, sum(shard), generator=g) * 50).to(dtype)
    return gathered, offset, shard, [0] * len(shard), list(shard)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a gloo rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
