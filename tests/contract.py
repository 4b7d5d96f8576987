"""The three-way contract harness every op's tests use.

On a bad input, every way of calling an op (the raw native op, the PyTorch
reference, the op under FakeTensorMode, and where an op has them its CPU grid
walk or its public wrapper on either backend) raises the same exception type
with the same first line, and writes nothing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map

WAYS = ("native", "reference", "fake")


def raises(fn: Callable[[], object], exc: type[BaseException], text: str, exact: bool = False) -> str:
    """The first line of the error ``fn()`` raises, after checking that it is of
    type ``exc`` exactly and contains ``text`` (``exact``: its first line is ``text``)."""
    with pytest.raises(Exception) as info:
        fn()
    err = info.value
    assert type(err) is exc, f"{type(err).__name__}: {err}"
    line = str(err).splitlines()[0] if str(err) else ""
    if exact:
        assert line == text, str(err)
    else:
        assert text in str(err), str(err)
    return line


def raw(name: str) -> Callable[..., object]:
    """The raw ``torch.ops.opensora_fast.<name>`` op, looked up at call time (so a
    module naming it still imports where the extension is absent)."""
    return lambda *args: getattr(torch.ops.opensora_fast, name)(*args)


def fake_call(fn: Callable[..., object], args: tuple) -> object:
    """``fn(*args)`` with every tensor in ``args`` made a fake of one FakeTensorMode
    (views of one storage stay aliased, so the op sees the same overlaps)."""
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fargs = tree_map(lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x, args)
        return fn(*fargs)


def faked(fn: Callable[..., object]) -> Callable[..., object]:
    """The "fake" way of a raw op: ``fn`` called on fakes of its arguments."""
    return lambda *args: fake_call(fn, args)


def with_backend(backend: str, fn: Callable[..., object]) -> Callable[..., object]:
    """A way that calls the public wrapper ``fn`` with OPENSORA_FAST_BACKEND=backend."""

    def call(*args: object) -> object:
        with mock.patch.dict(os.environ, {"OPENSORA_FAST_BACKEND": backend}):
            return fn(*args)

    return call


@dataclass(frozen=True)
class Contract:
    """One op's ways of being called, by name, each taking the op's arguments;
    ``compare``: the ways whose errors must agree line for line."""

    ways: Mapping[str, Callable[..., object]]
    compare: tuple[str, ...] = WAYS


# Dtypes whose bytes a snapshot can copy and compare (not the sub-byte or bits ones).
_WATCHED = {
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
}


def _watched(args: tuple) -> list[torch.Tensor]:
    """The dense CPU tensors among ``args`` (in lists, tuples and dicts too)."""
    leaves, _ = tree_flatten(args)
    return [
        t
        for t in leaves
        if isinstance(t, torch.Tensor)
        and t.layout == torch.strided
        and not t.is_nested
        and t.device.type == "cpu"
        and t.dtype in _WATCHED
    ]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    x = t.detach().resolve_conj().resolve_neg().clone(memory_format=torch.contiguous_format)
    return x.reshape(-1).view(torch.uint8)


def _call_checked(op: Contract, way: str, args: tuple, exc: type[BaseException], text: str, exact: bool) -> str:
    watched = _watched(args)
    before = [_bytes(t) for t in watched]
    line = raises(lambda: op.ways[way](*args), exc, text, exact)
    for i, (t, b) in enumerate(zip(watched, before)):
        assert torch.equal(_bytes(t), b), f"{way}: input tensor {i} written before the error"
    return line


def assert_three_way(
    op: Contract,
    way: str,
    fresh: Callable[[], tuple],
    exc: type[BaseException],
    text: str,
    *,
    exact: bool = False,
    compare: Iterable[str] | None = None,
) -> str:
    """Calls ``op`` the way ``way`` on ``fresh()`` arguments and checks the error
    (type ``exc``, ``text`` in it); then the same for every other way of
    ``compare`` (default ``op.compare``), each on new ``fresh()`` arguments, and
    that they all say the same first line. No way may change a dense CPU tensor
    among the arguments. Returns that first line."""
    line = _call_checked(op, way, fresh(), exc, text, exact)
    for other in op.compare if compare is None else compare:
        if other != way:
            assert _call_checked(op, other, fresh(), exc, text, exact) == line, (way, other)
    return line
