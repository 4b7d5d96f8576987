"""The masked per-sample MSE op (csrc/masked_mse/): wrapper, fakes, autograd."""
from __future__ import annotations

import torch

from .. import reference
from .._ext import HAS_NATIVE, pick


def masked_mse(pred: torch.Tensor, target: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE over token ranges of packed ``[B, L, D]`` tensors.

    ``mean_b( mean over tokens [ranges[b, 0], ranges[b, 1]) and all D of (pred - target)^2 )``
    as a 0-dim fp32 tensor (fp64 for fp64 inputs), accumulated in fp32 without
    fp32 copies of the inputs. ``pred``/``target``: same shape and dtype (fp32,
    bf16, fp16, fp64), dense and contiguous; ``ranges``: int64 ``[B, 2]`` on
    their device. Ranges are clamped to ``[0, L]`` (end >= start); an empty
    range gives NaN, as upstream's mean over an empty slice does. Tokens outside
    the ranges are never read into the result (NaN/Inf there changes nothing).

    Differentiable in ``pred`` and ``target`` to any order (reverse mode;
    ``create_graph=True`` works): ``grad_pred = 2 (pred - target) g / (count_b B)``
    inside the range, 0 outside. Forward mode (``torch.func.jvp``,
    ``torch.autograd.forward_ad``) raises a clear error on the native path.
    The result is deterministic (fixed summation order) and costs no host sync.
    """
    return pick("masked_mse", pred.device, reference.masked_mse)(pred, target, ranges)


def _vjp_of_backward(ctx, v):
    """Derivatives of grad_pred = F(g, pred, target) = 2 (pred - target) g / (count_b B)
    [inside]: towards g, pred and target, in differentiable ops (so any order works)."""
    grad, pred, target, ranges = ctx.saved_tensors
    need_g, need_p, need_t = ctx.needs_input_grad[:3]
    one = torch.ones((), dtype=grad.dtype, device=grad.device)
    d_g = d_p = None
    if need_g:  # sum(v * F(1, pred, target)), accumulated in fp32/fp64
        f1 = reference.masked_mse_backward(one, pred, target, ranges)
        d_g = (v.to(f1.dtype) * f1).sum().to(reference.masked_mse_acc_dtype(pred.dtype)).to(grad.dtype)
    if need_p or need_t:  # F is linear in (pred - target): F(g, v, 0)
        d_p = reference.masked_mse_backward(grad, v.to(pred.dtype), torch.zeros_like(pred), ranges)
    return d_g, (d_p if need_p else None), (-d_p if need_t else None), None


if HAS_NATIVE:

    @torch.library.register_fake("opensora_fast::masked_mse")
    def _masked_mse_fake(pred, target, ranges):
        reference.masked_mse_check_inputs(pred, target, ranges)
        return pred.new_empty((), dtype=reference.masked_mse_acc_dtype(pred.dtype))

    @torch.library.register_fake("opensora_fast::masked_mse_backward")
    def _masked_mse_backward_fake(grad, pred, target, ranges):
        reference.masked_mse_check_inputs(pred, target, ranges)
        reference.masked_mse_check_grad(grad, pred)
        return torch.empty_like(pred, memory_format=torch.contiguous_format)

    def _masked_mse_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)  # the inputs themselves: no copies

    def _masked_mse_backward(ctx, grad):
        pred, target, ranges = ctx.saved_tensors
        want_pred, want_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_pred or want_target):
            return None, None, None
        # The native backward op carries its own derivative (below), so this is
        # differentiable again when create_graph=True.
        g = torch.ops.opensora_fast.masked_mse_backward(grad, pred, target, ranges)
        return (g if want_pred else None), (-g if want_target else None), None

    def _backward_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    torch.library.register_autograd(
        "opensora_fast::masked_mse", _masked_mse_backward, setup_context=_masked_mse_setup
    )
    torch.library.register_autograd(
        "opensora_fast::masked_mse_backward", _vjp_of_backward, setup_context=_backward_setup
    )
