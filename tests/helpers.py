"""Shared test utilities."""

import math

import torch

from benchmarks.layouts import flux_mmdit_11b_shapes, shard_numel

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
PAIRS = [(e, s) for e in FLOATS for s in FLOATS]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view, so equality is bitwise (NaN-safe, -0 != +0)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


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
