"""What every op module repeats, written once: whether the extension has an op,
its fake registration, the native-or-reference choice, and turning the
dispatcher's own refusals into the reference's errors."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from .._ext import HAS_NATIVE, pick

__all__ = ["HAS_NATIVE", "has_op", "pick", "register_fake", "explain_dispatch_refusal", "explain_schema_refusal"]

_F = TypeVar("_F", bound=Callable)


def has_op(name: str) -> bool:
    """The extension registered ``opensora_fast::<name>`` (an extension built
    before the op was added has not)."""
    if not HAS_NATIVE:
        return False
    try:
        return torch._C._dispatch_has_kernel(f"opensora_fast::{name}")
    except RuntimeError:
        return False


def register_fake(name: str) -> Callable[[_F], _F]:
    """``torch.library.register_fake("opensora_fast::<name>")`` when the extension
    has the op; otherwise the function is returned unregistered."""

    def wrap(fn: _F) -> _F:
        if has_op(name):
            torch.library.register_fake(f"opensora_fast::{name}")(fn)
        return fn

    return wrap


def explain_dispatch_refusal(impl: Callable, args: tuple, explain: Callable[[], object]):
    """``impl(*args)``; a tensor subclass without this op (e.g. a jagged nested
    tensor) refuses it at dispatch with NotImplementedError, before any write:
    ``explain()`` then raises what the reference says."""
    try:
        return impl(*args)
    except NotImplementedError:
        explain()
        raise


def explain_schema_refusal(impl: Callable, args: tuple, explain: Callable[[], object]):
    """``impl(*args)``; the schema parser refuses a non-tensor or an int outside
    int64 before any check runs: ``explain()`` then raises what the reference says
    (no cost on success)."""
    try:
        return impl(*args)
    except RuntimeError as e:
        if "Expected a value of type" in str(e):
            explain()
        raise
