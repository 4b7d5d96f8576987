"""The masked per-sample MSE op (csrc/masked_mse/): wrapper, fakes, autograd."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from ..reference import masked_mse as _ref
from ._autograd import (
    NestedTensor,
    apply,
    below_autograd,
    functorch_active,
    njt_refused,
    old_style,
    per_example_vmap,
    save,
)
from ._registry import HAS_NATIVE, has_op, pick, register_fake


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
    ``torch.autograd.forward_ad``), forward over reverse, and ``torch.func``
    (``grad``, ``vmap``: one native call per example, ``hessian``):
    ``grad_pred = 2 (pred - target) g / (count_b B)`` inside the range, 0 outside.
    Inference tensors are accepted as inputs of a graph (copied when saved).
    The result is deterministic (fixed summation order) and costs no host sync.
    """
    if type(pred) is not torch.Tensor or type(target) is not torch.Tensor or type(ranges) is not torch.Tensor:
        # non-tensors (None, lists) and tensor subclasses (jagged nested): the
        # reference's checks, so the error is the one both backends give
        _ref.check_inputs(pred, target, ranges)
    impl = pick("masked_mse", pred.device, _ref.masked_mse)
    if (functorch_active() or fwAD._current_level >= 0) and impl is not _ref.masked_mse:
        if not torch.compiler.is_compiling():
            # torch.func / forward_ad: the Python Function (jvp, setup_context, vmap rule)
            return apply(_MaskedMSEFunction, pred, target, ranges)
    # eager and compiled alike: one dispatcher call, the C++ autograd (masked_mse_autograd.cpp)
    return impl(pred, target, ranges)


def loss_ranges(frame_mask: torch.Tensor, hw: int, upstream: bool = True) -> torch.Tensor:
    """Token ranges ``[B, 2]`` (int64, on frame_mask's device) for :func:`masked_mse`
    from a ``[B, T]`` frame mask (any strides; a frame is conditioned where it
    == 1): frames ``[start, end)`` times ``hw`` tokens per frame. ``upstream=True``
    drops frame 0 (and T-1) when conditioned and no interior frame is (upstream's
    rule); ``False`` drops the leading and trailing conditioned runs. One launch,
    no host sync (the reference is about ten small ops). ``hw`` must be an int
    with ``T * hw`` in int64."""
    if type(frame_mask) is not torch.Tensor or type(hw) is not int or not 0 <= hw <= _INT64_MAX:
        # what the schema cannot carry (None, ints beyond int64, numpy ints): the reference's checks
        hw = _ref.check_loss_ranges(frame_mask, hw)
    return pick("loss_ranges", frame_mask.device, _ref.loss_ranges)(frame_mask, hw, bool(upstream))


_INT64_MAX = 2**63 - 1


def _vjp_of_backward(ctx, v):
    """Derivatives of grad_pred = F(g, pred, target) = 2 (pred - target) g / (count_b B)
    [inside]: towards g, pred and target, in differentiable ops (so any order works)."""
    grad, pred, target, ranges = ctx.saved_tensors
    need_g, need_p, need_t = ctx.needs_input_grad[:3]
    one = torch.ones((), dtype=grad.dtype, device=grad.device)
    d_g = d_p = None
    if need_g:  # sum(v * F(1, pred, target)), accumulated in fp32/fp64
        f1 = _ref.masked_mse_backward(one, pred, target, ranges)
        d_g = (v.to(f1.dtype) * f1).sum().to(_ref.acc_dtype(pred.dtype)).to(grad.dtype)
    if need_p or need_t:  # F is linear in (pred - target): F(g, v, 0)
        d_p = _ref.masked_mse_backward(grad, v.to(pred.dtype).contiguous(), torch.zeros_like(pred), ranges)
    return d_g, (d_p if need_p else None), (-d_p if need_t else None), None


if HAS_NATIVE:

    @register_fake("masked_mse")
    def _masked_mse_fake(pred, target, ranges):
        _ref.check_inputs(pred, target, ranges)
        return pred.new_empty((), dtype=_ref.acc_dtype(pred.dtype))

    @register_fake("loss_ranges")
    def _loss_ranges_fake(frame_mask, hw, upstream):
        _ref.check_loss_ranges(frame_mask, hw)
        return frame_mask.new_empty((frame_mask.shape[0], 2), dtype=torch.int64)

    @register_fake("masked_mse_backward")
    def _masked_mse_backward_fake(grad, pred, target, ranges):
        _ref.check_inputs(pred, target, ranges)
        _ref.check_grad(grad, pred)
        return torch.empty_like(pred, memory_format=torch.contiguous_format)

    class _MaskedMSEFunction(torch.autograd.Function):
        """Autograd of the native op: reverse mode through the native backward
        op (which has its own derivative, so create_graph=True works), forward
        mode through jvp, torch.func through setup_context."""

        @staticmethod
        def forward(pred, target, ranges):
            with below_autograd():  # straight to the kernel
                return torch.ops.opensora_fast.masked_mse(pred, target, ranges)

        generate_vmap_rule = True  # the ops' own vmap rules below, through forward/backward/jvp

        @staticmethod
        def setup_context(ctx, inputs, output):
            save(ctx, inputs, forward_too=True)

        @staticmethod
        def backward(ctx, grad):
            pred, target, ranges = ctx.saved_tensors
            want_pred, want_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            if not (want_pred or want_target):
                return None, None, None
            if torch.is_grad_enabled() or functorch_active():
                g = apply(_BackwardFunction, grad, pred, target, ranges)  # a graph of the backward is wanted
            else:  # plain backward (no create_graph): the kernel alone, one Python Function less
                with below_autograd():
                    g = torch.ops.opensora_fast.masked_mse_backward(grad, pred, target, ranges)
            return (g if want_pred else None), (-g if want_target else None), None

        @staticmethod
        def jvp(ctx, d_pred, d_target, _d_ranges):
            pred, target, ranges = ctx.saved_tensors
            acc = _ref.acc_dtype(pred.dtype)
            # d loss = sum(F(1, pred, target) * (d_pred - d_target)), all in acc
            f1 = _ref.masked_mse_backward(
                torch.ones((), dtype=acc, device=pred.device), pred.to(acc), target.to(acc), ranges
            )
            tangent = torch.zeros_like(f1)
            if d_pred is not None:
                tangent = tangent + d_pred.to(acc)
            if d_target is not None:
                tangent = tangent - d_target.to(acc)
            return (f1 * tangent).sum()

    # The raw op's reverse mode is a C++ Function (csrc/masked_mse/masked_mse_autograd.cpp).
    # A C++ Function has no forward-mode formula, and under torch.func its kernel
    # sees the transforms' wrapped tensors, where an autograd.Function
    # (custom_function_call) has no kernel: there (forward-mode tangents, a
    # torch.func transform) it calls _masked_mse_autograd_py, which runs the
    # reference's differentiable math (its loss equal up to summation order).
    _lib = torch.library.Library("opensora_fast", "IMPL")  # kept alive: it owns the registrations
    if has_op("_masked_mse_autograd_py"):
        _lib.impl("_masked_mse_autograd_py", _ref.masked_mse, "Autograd")

    class _BackwardFunction(torch.autograd.Function):
        """The native backward op with its own derivative (_vjp_of_backward),
        so the loss is differentiable to any order."""

        generate_vmap_rule = True

        @staticmethod
        def forward(grad, pred, target, ranges):
            with below_autograd():
                return torch.ops.opensora_fast.masked_mse_backward(grad, pred, target, ranges)

        @staticmethod
        def setup_context(ctx, inputs, output):
            save(ctx, inputs, forward_too=True)

        backward = staticmethod(_vjp_of_backward)

        @staticmethod
        def jvp(ctx, d_grad, d_pred, d_target, _d_ranges):
            # F(g, pred, target) is bilinear in g and (pred - target):
            # dF = F(dg, pred, target) + F(g, d_pred - d_target, 0)
            grad, pred, target, ranges = ctx.saved_tensors
            out = None
            if d_grad is not None:
                out = _ref.masked_mse_backward(d_grad.to(grad.dtype), pred, target, ranges)
            d = d_pred if d_target is None else (d_target.neg() if d_pred is None else d_pred - d_target)
            if d is not None:
                t = _ref.masked_mse_backward(grad, d.to(pred.dtype).contiguous(), torch.zeros_like(pred), ranges)
                out = t if out is None else out + t
            return out if out is not None else torch.zeros_like(pred)

    torch.library.register_vmap("opensora_fast::masked_mse", per_example_vmap(torch.ops.opensora_fast.masked_mse, 0))
    torch.library.register_vmap(
        "opensora_fast::masked_mse_backward", per_example_vmap(torch.ops.opensora_fast.masked_mse_backward, 0)
    )

    @torch.library.register_vmap("opensora_fast::loss_ranges")
    def _loss_ranges_vmap(info, in_dims, frame_mask, hw, upstream):
        # samples are independent: the examples' [B, T] masks as one [N*B, T]
        m = frame_mask.movedim(in_dims[0], 0)
        out = torch.ops.opensora_fast.loss_ranges(m.reshape(-1, m.shape[-1]), hw, upstream)
        return out.view(m.shape[0], m.shape[1], 2), 0

    def _check_backward(grad, pred, target, ranges):
        _ref.check_inputs(pred, target, ranges)
        _ref.check_grad(grad, pred)

    if NestedTensor is not None:
        for _name, _check in (
            ("masked_mse", _ref.check_inputs),
            ("masked_mse_backward", _check_backward),
            ("loss_ranges", lambda m, hw, upstream: _ref.check_loss_ranges(m, hw)),
        ):
            torch.library.register_torch_dispatch(f"opensora_fast::{_name}", NestedTensor, njt_refused(_check))

    for _fn in (_MaskedMSEFunction, _BackwardFunction):
        _fn._fast = old_style(_fn)
    _lib.impl("masked_mse_backward", lambda *args: apply(_BackwardFunction, *args), "Autograd")
