"""Autograd plumbing shared by the differentiable ops, and every private torch
API the ops use, in one place.

The private names below are checked on torch 2.14 (``CHECKED_ON``): a torch that
lacks one gets a RuntimeError naming it when it is first used, not a bare
AttributeError somewhere inside an op."""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = [
    "CHECKED_ON",
    "functorch_active",
    "below_autograd",
    "NestedTensor",
    "old_style",
    "apply",
    "save",
    "per_example_vmap",
    "njt_refused",
]

CHECKED_ON = ("2.14",)  # torch major.minor whose private APIs this module was checked on


def _private(owner, name: str) -> Callable:
    fn = getattr(owner, name, None)
    if fn is not None:
        return fn

    def missing(*args, **kwargs):
        raise RuntimeError(
            f"opensora_fast needs torch's private {owner.__name__}.{name} (checked on torch "
            f"{', '.join(CHECKED_ON)}); torch {torch.__version__} has none"
        )

    return missing


# torch._C names: bound once (also saves an attribute lookup per op call)
functorch_active: Callable[[], bool] = _private(torch._C, "_are_functorch_transforms_active")
below_autograd = _private(torch._C, "_AutoDispatchBelowAutograd")  # a context manager: straight to the kernel

try:
    from torch.nested._internal.nested_tensor import NestedTensor
except ImportError:  # a torch without jagged nested tensors: nothing to register
    NestedTensor: Optional[type] = None  # type: ignore[no-redef]


def old_style(fn: type) -> type:
    """The same Function written the old way (forward(ctx, ...)). Its apply skips
    the per-call signature binding that a setup_context Function pays (~15 us on a
    2-core VM, more on slower hosts: it dominated the loss's host time on an H100
    machine); torch.func needs the setup_context form, so :func:`apply` picks per call."""

    def forward(ctx, *args):
        out = fn.forward(*args)
        fn.setup_context(ctx, args, out)
        return out

    body = {"forward": staticmethod(forward), "backward": staticmethod(fn.backward), "__doc__": fn.__doc__}
    if "jvp" in vars(fn):
        body["jvp"] = staticmethod(fn.jvp)
    return type(fn.__name__ + "Fast", (torch.autograd.Function,), body)


def apply(fn: type, *args):
    """``fn.apply(*args)``, through its :func:`old_style` twin ``fn._fast`` unless
    a torch.func transform is active."""
    if functorch_active():
        return fn.apply(*args)
    return fn._fast.apply(*args)


def save(ctx, inputs, forward_too: bool = False) -> None:
    """save_for_backward (and save_for_forward) of ``inputs``, the tensors themselves:
    no copies, except of an inference tensor when a graph is recorded (autograd
    cannot save one, and a copy keeps the backward right if it is later changed in
    place inside inference mode)."""
    if any(ctx.needs_input_grad) and any(map(torch.Tensor.is_inference, inputs)):
        inputs = tuple(x.clone() if x.is_inference() else x for x in inputs)
    ctx.save_for_backward(*inputs)
    if forward_too:
        ctx.save_for_forward(*inputs)


def per_example_vmap(op: Callable, out_dim: int) -> Callable:
    """A vmap rule for ``op``: one call per example (ops that average over their
    own batch cannot share a call across examples), stacked on dim 0."""

    def rule(info, in_dims, *args):
        cols = [a.movedim(d, 0) if d is not None else None for a, d in zip(args, in_dims)]
        outs = [op(*(a if c is None else c[i] for a, c in zip(args, cols))) for i in range(info.batch_size)]
        return torch.stack(outs), out_dim

    return rule


def njt_refused(check: Callable) -> Callable:
    """A torch_dispatch rule for a jagged nested tensor, which reaches its
    subclass's __torch_dispatch__ knowing no opensora_fast op: raises the
    reference's error (``check``) there instead."""

    def rule(cls, func, types, args, kwargs):
        check(*args)
        raise AssertionError("unreachable: the check refuses nested tensors")

    return rule
