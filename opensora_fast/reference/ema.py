"""Reference of ``opensora_fast::ema_update_``.

compat mode is literally upstream's ``ema.mul_(decay).add_(src, alpha=1 - decay)``
per pair. Stochastic mode reproduces the native kernels bit for bit: the same
fp32 value ``fma(src, 1-decay, fp32(ema*decay))`` and the same counter-based
random numbers, so the fallback and the kernels agree exactly.
"""

from __future__ import annotations

from itertools import repeat
from typing import Sequence

import torch

from ._checks import find_overlap, shape_str, tensor_span
from ._nan import canonical_nan_

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor_lists(ema: Sequence, src: Sequence) -> None:
    """Every item of both lists is a tensor (ema first, then src): TypeError naming the first that is not."""
    for name, items in (("ema", ema), ("src", src)):
        if not all(map(isinstance, items, repeat(torch.Tensor))):  # C-level: no Python call per item
            i, bad = next((i, x) for i, x in enumerate(items) if not isinstance(x, torch.Tensor))
            raise TypeError(f"ema_update_: {name}[{i}] must be a tensor, got {type(bad).__name__}")


def check_inputs(ema: Sequence[torch.Tensor], src: Sequence[torch.Tensor], decay: float) -> None:
    """The native op's checks, in its order and with its messages (csrc/ema/ema.cpp):
    first the autograd rule, then every pair, then aliasing. Nothing is
    written by a call that fails any of them."""
    check_tensor_lists(ema, src)
    if torch.is_grad_enabled():
        for i, e in enumerate(ema):
            if e.requires_grad:
                raise RuntimeError(
                    f"ema_update_: ema[{i}] requires grad and grad mode is on; ema_update_ is not "
                    "differentiable: call it under torch.no_grad()"
                )
    if len(ema) != len(src):
        raise ValueError(
            f"ema_update_: ema and src must have the same length, got len(ema)={len(ema)} and len(src)={len(src)}"
        )
    if not (0.0 <= decay <= 1.0):
        raise ValueError(f"ema_update_: decay must be in [0, 1], got {float(decay)!r}")
    spans, storages = [], {}
    for i, (e, s) in enumerate(zip(ema, src)):
        if e.layout != torch.strided or s.layout != torch.strided or e.is_nested or s.is_nested:
            raise ValueError(f"ema_update_: ema[{i}] and src[{i}] must be dense (strided) tensors")
        if e.dtype not in _FLOATS:
            raise TypeError(f"ema_update_: ema[{i}] has dtype {e.dtype}; expected float32, bfloat16 or float16")
        if s.dtype not in _FLOATS:
            raise TypeError(f"ema_update_: src[{i}] has dtype {s.dtype}; expected float32, bfloat16 or float16")
        for name, t in (("ema", e), ("src", s)):
            if t.is_neg():  # checked before any pair is written (upstream's mul_ would refuse it midway)
                raise ValueError(
                    f"ema_update_: {name}[{i}] is a negated view (neg bit set, as in x.conj().imag); "
                    "pass a tensor without it (.resolve_neg() makes a copy)"
                )
        if e.shape != s.shape:
            raise ValueError(
                f"ema_update_: ema[{i}] has shape {shape_str(e.shape)} but src[{i}] has shape {shape_str(s.shape)}"
            )
        if e.device != s.device:
            raise ValueError(f"ema_update_: ema[{i}] is on {e.device} but src[{i}] is on {s.device}")
        if e.device != ema[0].device:
            raise ValueError(
                f"ema_update_: all pairs must be on one device; ema[0] is on {ema[0].device} but ema[{i}] is on {e.device}"
            )
        if not e.is_contiguous():
            raise ValueError(f"ema_update_: ema[{i}] is not contiguous")
        if not s.is_contiguous():
            raise ValueError(f"ema_update_: src[{i}] is not contiguous")
        if e.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"ema_update_: ema[{i}] is an inference tensor; it can only be updated in place inside "
                "torch.inference_mode()"
            )
        spans.append(tensor_span(e, True, "ema", i, storages))
        spans.append(tensor_span(s, False, "src", i, storages))
    hit = find_overlap(spans)
    if hit is not None:
        a, b = hit
        raise ValueError(
            f"ema_update_: {a.arg}[{a.index}] and {b.arg}[{b.index}] overlap in memory; every ema tensor must "
            "share no memory with any other tensor of the call"
        )


def ema_update_(
    ema: Sequence[torch.Tensor],
    src: Sequence[torch.Tensor],
    decay: float,
    stochastic: bool = False,
    seed: int = 0,
) -> None:
    check_inputs(ema, src, decay)
    with torch.no_grad():
        _update(ema, src, decay, stochastic, seed)


def _update(ema, src, decay, stochastic, seed) -> None:
    if not stochastic:
        for e, s in zip(ema, src):
            e.mul_(decay).add_(s, alpha=1 - decay)
            canonical_nan_(e)
        return
    alpha = torch.tensor(1.0 - decay, dtype=torch.float32).item()  # fp32(1 - decay)
    d32 = torch.tensor(decay, dtype=torch.float32).item()
    base = 0
    for e, s in zip(ema, src):
        n = e.numel()
        if n:
            prod = (e.float() * d32).double()  # fp32 product, rounded once
            r = _fma_to_float(s.double().reshape(-1), alpha, prod.reshape(-1))
            u = _uniform01(seed, torch.arange(base, base + n, device=e.device, dtype=torch.int64))
            e.copy_(_round_stochastic(r, u, e.dtype).view(e.shape))
            canonical_nan_(e)
        base += n


def _fma_to_float(x: torch.Tensor, a: float, c: torch.Tensor) -> torch.Tensor:
    """fp32(x*a + c) rounded once, for fp32-representable x, a, c. x*a is exact
    in float64; the add is rounded to odd in float64 (a TwoSum gives its exact
    error), which makes the final rounding to float32 correct."""
    p = x * a
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    s = torch.where((err != 0) & even & torch.isfinite(s), torch.nextafter(s, toward), s)
    return s.float()


_M32 = 0xFFFFFFFF


def _uniform01(seed: int, index: torch.Tensor) -> torch.Tensor:
    """csrc/common.h uniform01: fmix32 over a bijection of the index, top 24 bits.
    uint32 arithmetic in int64, masked after every product."""
    seed_lo, seed_hi = seed & _M32, (seed >> 32) & _M32
    x = ((index & _M32) * 0x9E3779B1 + seed_lo) & _M32
    x = x ^ ((((index >> 32) & _M32) * 0x85EBCA77 + seed_hi) & _M32)
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    x = x ^ (x >> 16)
    return (x >> 8).float() * (1.0 / 16777216.0)


def _round_stochastic(r: torch.Tensor, u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """csrc/ema/ema.h round_stochastic, elementwise (NaN made canonical by the caller)."""
    if dtype == torch.float32:
        return r
    n = r.to(dtype)
    bits = n.view(torch.int16).to(torch.int32) & 0xFFFF
    t_bits = torch.where(n.float().abs() > r.abs(), bits - 1, bits)
    h_bits = (t_bits + 1) & 0xFFFF
    lo = _from_bits(t_bits, dtype).float().abs()
    hi = _from_bits(h_bits, dtype).float().abs()
    p = (r.abs() - lo) / (hi - lo)
    return _from_bits(torch.where(u < p, h_bits, t_bits), dtype)


def _from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b = bits & 0xFFFF
    return torch.where(b >= 0x8000, b - 0x10000, b).to(torch.int16).view(dtype)
