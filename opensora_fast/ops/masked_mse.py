"""The masked per-sample MSE op (csrc/masked_mse/): wrapper, fakes, autograd."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

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

    Differentiable in ``pred`` and ``target``: reverse mode to any order
    (``create_graph=True``, ``gradgradcheck``), forward mode (``torch.func.jvp``,
    ``torch.autograd.forward_ad``) and ``torch.func.grad``:
    ``grad_pred = 2 (pred - target) g / (count_b B)`` inside the range, 0 outside.
    The result is deterministic (fixed summation order) and costs no host sync.
    """
    impl = pick("masked_mse", pred.device, reference.masked_mse)
    if impl is reference.masked_mse or torch.compiler.is_compiling():
        return impl(pred, target, ranges)  # compiled: the raw op and its autograd
    return _apply(_MaskedMSEFunction, pred, target, ranges)


def loss_ranges(frame_mask: torch.Tensor, hw: int, upstream: bool = True) -> torch.Tensor:
    """Token ranges ``[B, 2]`` (int64, on frame_mask's device) for :func:`masked_mse`
    from a ``[B, T]`` frame mask (any strides; a frame is conditioned where it
    == 1): frames ``[start, end)`` times ``hw`` tokens per frame. ``upstream=True``
    drops frame 0 (and T-1) when conditioned and no interior frame is (upstream's
    rule); ``False`` drops the leading and trailing conditioned runs. One launch,
    no host sync (the reference is about ten small ops)."""
    return pick("loss_ranges", frame_mask.device, reference.loss_ranges)(frame_mask, int(hw), bool(upstream))


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
        d_p = reference.masked_mse_backward(grad, v.to(pred.dtype).contiguous(), torch.zeros_like(pred), ranges)
    return d_g, (d_p if need_p else None), (-d_p if need_t else None), None


def _old_style(fn: type) -> type:
    """The same Function written the old way (forward(ctx, ...)). Its apply skips
    the per-call signature binding that a setup_context Function pays (~15 us on a
    2-core VM, more on slower hosts: it dominated the loss's host time on an H100
    machine); torch.func needs the setup_context form, so _apply picks per call."""

    def forward(ctx, *args):
        out = fn.forward(*args)
        fn.setup_context(ctx, args, out)
        return out

    body = {"forward": staticmethod(forward), "backward": staticmethod(fn.backward), "__doc__": fn.__doc__}
    if "jvp" in vars(fn):
        body["jvp"] = staticmethod(fn.jvp)
    return type(fn.__name__ + "Fast", (torch.autograd.Function,), body)


def _apply(fn: type, *args):
    if torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    return fn._fast.apply(*args)


if HAS_NATIVE:

    @torch.library.register_fake("opensora_fast::masked_mse")
    def _masked_mse_fake(pred, target, ranges):
        reference.masked_mse_check_inputs(pred, target, ranges)
        return pred.new_empty((), dtype=reference.masked_mse_acc_dtype(pred.dtype))

    @torch.library.register_fake("opensora_fast::loss_ranges")
    def _loss_ranges_fake(frame_mask, hw, upstream):
        reference.check_loss_ranges(frame_mask, hw)
        return frame_mask.new_empty((frame_mask.shape[0], 2), dtype=torch.int64)

    @torch.library.register_fake("opensora_fast::masked_mse_backward")
    def _masked_mse_backward_fake(grad, pred, target, ranges):
        reference.masked_mse_check_inputs(pred, target, ranges)
        reference.masked_mse_check_grad(grad, pred)
        return torch.empty_like(pred, memory_format=torch.contiguous_format)

    class _MaskedMSEFunction(torch.autograd.Function):
        """Autograd of the native op: reverse mode through the native backward
        op (which has its own derivative, so create_graph=True works), forward
        mode through jvp, torch.func through setup_context."""

        @staticmethod
        def forward(pred, target, ranges):
            with torch._C._AutoDispatchBelowAutograd():  # straight to the kernel
                return torch.ops.opensora_fast.masked_mse(pred, target, ranges)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)  # the inputs themselves: no copies
            ctx.save_for_forward(*inputs)

        @staticmethod
        def backward(ctx, grad):
            pred, target, ranges = ctx.saved_tensors
            want_pred, want_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            if not (want_pred or want_target):
                return None, None, None
            if torch.is_grad_enabled() or torch._C._are_functorch_transforms_active():
                g = _apply(_BackwardFunction, grad, pred, target, ranges)  # a graph of the backward is wanted
            else:  # plain backward (no create_graph): the kernel alone, one Python Function less
                with torch._C._AutoDispatchBelowAutograd():
                    g = torch.ops.opensora_fast.masked_mse_backward(grad, pred, target, ranges)
            return (g if want_pred else None), (-g if want_target else None), None

        @staticmethod
        def jvp(ctx, d_pred, d_target, _d_ranges):
            pred, target, ranges = ctx.saved_tensors
            acc = reference.masked_mse_acc_dtype(pred.dtype)
            # d loss = sum(F(1, pred, target) * (d_pred - d_target)), all in acc
            f1 = reference.masked_mse_backward(
                torch.ones((), dtype=acc, device=pred.device), pred.to(acc), target.to(acc), ranges
            )
            tangent = torch.zeros_like(f1)
            if d_pred is not None:
                tangent = tangent + d_pred.to(acc)
            if d_target is not None:
                tangent = tangent - d_target.to(acc)
            return (f1 * tangent).sum()

    class _RawMaskedMSEFunction(torch.autograd.Function):
        """Reverse mode of the raw op (torch.ops.opensora_fast.masked_mse)."""

        forward = _MaskedMSEFunction.forward
        setup_context = _MaskedMSEFunction.setup_context
        backward = _MaskedMSEFunction.backward

    def _raw_autograd(pred, target, ranges):
        # torch.library cannot register a forward-mode formula for a custom op;
        # without this check forward mode would silently give a zero tangent.
        if any(fwAD.unpack_dual(x).tangent is not None for x in (pred, target)):
            raise RuntimeError(
                "opensora_fast::masked_mse: forward-mode AD is not supported on the raw op; "
                "call opensora_fast.ops.masked_mse, which has a jvp"
            )
        return _apply(_RawMaskedMSEFunction, pred, target, ranges)

    _lib = torch.library.Library("opensora_fast", "IMPL")  # kept alive: it owns the registration
    _lib.impl("masked_mse", _raw_autograd, "Autograd")

    class _BackwardFunction(torch.autograd.Function):
        """The native backward op with its own derivative (_vjp_of_backward),
        so the loss is differentiable to any order."""

        @staticmethod
        def forward(grad, pred, target, ranges):
            with torch._C._AutoDispatchBelowAutograd():
                return torch.ops.opensora_fast.masked_mse_backward(grad, pred, target, ranges)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        backward = staticmethod(_vjp_of_backward)

    for _fn in (_MaskedMSEFunction, _RawMaskedMSEFunction, _BackwardFunction):
        _fn._fast = _old_style(_fn)
    _lib.impl("masked_mse_backward", lambda *args: _apply(_BackwardFunction, *args), "Autograd")
