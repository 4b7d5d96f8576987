"""Public ops: thin wrappers over ``torch.ops.opensora_fast.*`` that fall back to
the references in :mod:`opensora_fast.reference` (see :mod:`opensora_fast._ext`)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import reference
from .._ext import HAS_NATIVE, pick

__all__ = ["ema_update_", "draw_seed", "masked_mse", "condition", "condition_cat_"]


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A 63-bit seed from a CPU generator (torch's default one when None).
    Never touches a GPU, so it costs no device sync."""
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, dtype=torch.int64))


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
      so there (< 64 elements per torch thread) results may differ by 1 ulp.
      CUDA runs the same arithmetic as the CPU kernel.
    * ``stochastic=True``: the fp32 result is rounded stochastically to the EMA's
      dtype (unbiased), so a bf16 EMA keeps moving at decay 0.9999 where
      round-to-nearest discards every increment. ``seed`` makes it
      reproducible (same result on CPU and GPU); when None a seed is drawn from
      ``generator`` (a CPU generator; torch's default when None).

    Raises ValueError/TypeError naming the argument and pair index on bad input;
    nothing is written unless every pair is valid.
    """
    ema = list(ema)
    src = list(src)
    decay = float(decay)
    if stochastic and seed is None:
        seed = draw_seed(generator)
    seed = int(seed or 0)
    if not ema and not src:
        return
    dev = ema[0].device if ema else src[0].device
    pick("ema_update_", dev, reference.ema_update_)(ema, src, decay, stochastic, seed)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE over token ranges of packed ``[B, L, D]`` tensors.

    ``mean_b( mean over tokens [ranges[b, 0], ranges[b, 1]) and all D of (pred - target)^2 )``
    as a 0-dim fp32 tensor (fp64 for fp64 inputs), accumulated in fp32 without
    fp32 copies of the inputs. ``pred``/``target``: same shape and dtype (fp32,
    bf16, fp16, fp64); ``ranges``: int64 ``[B, 2]`` on their device. Ranges are
    clamped to ``[0, L]`` (end >= start); an empty range gives NaN, as upstream's
    mean over an empty slice does. Differentiable in ``pred`` and ``target``:
    ``grad_pred = 2 (pred - target) g / (count_b B)`` inside the range, 0 outside.
    The result is deterministic (fixed summation order) and costs no host sync.
    """
    return pick("masked_mse", pred.device, reference.masked_mse)(pred, target, ranges)


if HAS_NATIVE:

    @torch.library.register_fake("opensora_fast::masked_mse")
    def _masked_mse_fake(pred, target, ranges):
        reference.check_mse_inputs(pred, target, ranges)
        return pred.new_empty((), dtype=reference.masked_mse_acc_dtype(pred.dtype))

    @torch.library.register_fake("opensora_fast::masked_mse_backward")
    def _masked_mse_backward_fake(grad, pred, target, ranges):
        reference.check_mse_inputs(pred, target, ranges)
        return torch.empty_like(pred, memory_format=torch.contiguous_format)

    def _masked_mse_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)  # the inputs themselves: no copies

    def _masked_mse_backward(ctx, grad):
        pred, target, ranges = ctx.saved_tensors
        want_pred, want_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_pred or want_target):
            return None, None, None
        g = torch.ops.opensora_fast.masked_mse_backward(grad, pred, target, ranges)
        return (g if want_pred else None), (-g if want_target else None), None

    torch.library.register_autograd(
        "opensora_fast::masked_mse", _masked_mse_backward, setup_context=_masked_mse_setup
    )

    @torch.library.register_fake("opensora_fast::ema_update_")
    def _ema_update_fake(ema, src, decay, stochastic=False, seed=0):
        # Same checks as the kernels, so tracing (and meta tensors) fail alike.
        reference.check_ema_inputs(ema, src, decay)
        return None


from .condition import condition, condition_cat_  # noqa: E402
