"""The fused multi-tensor EMA op (csrc/ema/): wrapper and fake."""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

from ..reference import ema as _ref
from ._registry import explain_dispatch_refusal, pick, register_fake

_U64 = 1 << 64


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A 63-bit seed from a CPU generator (torch's default one when None).
    Never touches a GPU, so it costs no device sync."""
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, dtype=torch.int64))


def _as_int64(seed) -> int:
    """Any Python int as the int64 the schema carries: the same 64 bits (a seed
    >= 2**63 wraps to its two's complement, which the kernels read back as uint64)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"ema_update_: seed must be an int, got {type(seed).__name__}")
    s = int(seed) % _U64
    return s - _U64 if s >= 1 << 63 else s


def ema_update_(
    ema: Sequence[torch.Tensor],
    src: Sequence[torch.Tensor],
    decay: float,
    *,
    stochastic: bool = False,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> None:
    """In place, for every pair: ``ema[i] = ema[i] * decay + src[i] * (1 - decay)``.

    One fused call for all pairs. Each pair may mix float32, bfloat16 and
    float16 on either side; the math is fp32.

    * ``stochastic=False`` (compat): bit-identical on CPU to upstream's
      ``ema.mul_(decay).add_(src, alpha=1 - decay)`` for every mixed or fp32
      pair (the Open-Sora case: bf16 EMA, fp32 master). For bf16/bf16 and
      fp16/fp16 we apply torch's vectorised rule to every element; torch itself
      computes the scalar remainder of each of its thread chunks differently,
      so there (< 64 elements per torch thread) results may differ by one
      rounding of ``(1 - decay) * src`` (usually 1 ulp).
      CUDA runs the same arithmetic as the CPU kernel, bit for bit.
    * ``stochastic=True``: the fp32 result is rounded stochastically to the EMA's
      dtype (unbiased), so a bf16 EMA keeps moving at decay 0.9999 where
      round-to-nearest discards every increment. ``seed`` (any int; 64 bits are
      used) makes it reproducible, the same on CPU and GPU; when None a seed is
      drawn from ``generator`` (a CPU generator; torch's default when None).
      Refused inside CUDA graph capture (a replay would reuse the seed).
    * NaN results are written as one canonical quiet NaN (e.g. bf16 0x7FC0) on
      every device.

    Rules, the same on every backend (native kernels and the PyTorch reference):

    * Every ``ema[i]`` must share no memory with any other tensor of the call
      (another ema, any src, its own src): a ValueError names the pair. Sources
      may alias each other.
    * Like torch's own in-place ops: each written tensor's version counter is
      bumped (autograd notices a saved tensor was modified); an ema that
      requires grad while grad mode is on, or an inference tensor outside
      ``torch.inference_mode()``, is refused (RuntimeError). The op is not
      differentiable.
    * Bad input (types, a non-bool ``stochastic``, a bool ``decay`` or ``seed``,
      length, shape, dtype, device, layout (sparse, nested), negated views,
      contiguity, decay outside [0, 1]) raises TypeError/ValueError naming the
      argument and pair index. Every check runs before anything is written.
    """
    ema = list(ema)
    src = list(src)
    # bool is an int (and "False" is truthy): refuse both rather than guess
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"ema_update_: decay must be a real number, got {type(decay).__name__}")
    if not isinstance(stochastic, bool):
        raise TypeError(f"ema_update_: stochastic must be a bool, got {type(stochastic).__name__}")
    decay = float(decay)
    if seed is not None:
        seed = _as_int64(seed)  # type-checked even when compat mode ignores it
    elif stochastic:
        seed = draw_seed(generator)
    seed = seed if stochastic else 0
    _ref.check_tensor_lists(ema, src)  # in our words, before the schema parser
    first = ema[0] if ema else (src[0] if src else None)
    if first is None:  # nothing to do, but the call is still validated
        return _ref.ema_update_(ema, src, decay, stochastic, seed)
    impl = pick("ema_update_", first.device, _ref.ema_update_)
    explain_dispatch_refusal(impl, (ema, src, decay, stochastic, seed), lambda: _ref.check_inputs(ema, src, decay))


@register_fake("ema_update_")
def _ema_update_fake(ema, src, decay, stochastic=False, seed=0):
    # The kernels' checks, so tracing and meta tensors fail alike.
    _ref.check_inputs(ema, src, decay)
    return None
