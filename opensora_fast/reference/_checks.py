"""Helpers of the Python input checks, mirroring csrc/host.h word for word, so
the reference and the fakes raise what the native kernels raise."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef


class Span(NamedTuple):
    start: int
    end: int
    written: bool
    arg: str
    index: int


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def check_int64(op: str, name: str, values: Sequence[int]) -> None:
    """ValueError naming the first of ``values`` outside int64 (the native ops'
    schemas take int64 only; their wrappers and the references say this alike)."""
    for k, v in enumerate(values):
        if not INT64_MIN <= v <= INT64_MAX:
            raise ValueError(f"{op}: {name}[{k}] = {v} does not fit in int64")


def is_dense(t: torch.Tensor) -> bool:
    """A strided tensor that is not nested (nested tensors report torch.strided)."""
    return t.layout == torch.strided and not t.is_nested


def tensor_span(
    t: torch.Tensor, written: bool, arg: str, index: int, storages: dict, *, strided: bool = False
) -> Span | None:
    """The bytes a contiguous tensor covers; with ``strided=True`` those from a
    strided tensor's first element to the end of its last (csrc/host.h
    extent_bytes). Real tensors: their addresses. Fake tensors have none, so
    each storage gets its own address range (views of one storage still
    overlap, distinct storages never do). Meta tensors are skipped, as the
    native checks skip them."""
    if t.device.type == "meta":
        return None
    nbytes = extent_bytes(t.shape, t.stride(), t.element_size()) if strided else t.numel() * t.element_size()
    if isinstance(t, torch._subclasses.fake_tensor.FakeTensor):
        key = StorageWeakRef(t.untyped_storage())
        base = storages.setdefault(key, (len(storages) + 1) << 48)
        start = base + t.storage_offset() * t.element_size()
    else:
        start = t.data_ptr()
    return Span(start, start + nbytes, written, arg, index)


def extent_bytes(shape, strides, element_size: int) -> int:
    """Bytes from a strided tensor's first element to the end of its last
    (non-negative strides); 0 when it has no element."""
    if any(int(d) == 0 for d in shape):
        return 0
    return (1 + sum((int(d) - 1) * int(st) for d, st in zip(shape, strides))) * element_size


def find_overlap(spans: Sequence[Span | None]) -> tuple[Span, Span] | None:
    """A written span overlapping any other span (read-read overlaps are fine):
    csrc/host.h find_overlap, the same sweep and the same pair reported."""
    live = sorted(
        (s for s in spans if s is not None and s.end > s.start), key=lambda s: (s.start, s.index, not s.written)
    )
    far_all = far_written = None
    for s in live:
        hit = far_all if s.written else far_written
        if hit is not None and s.start < hit.end:
            return hit, s
        if far_all is None or s.end > far_all.end:
            far_all = s
        if s.written and (far_written is None or s.end > far_written.end):
            far_written = s
    return None


def shape_str(shape) -> str:
    """A shape as C++'s IntArrayRef prints it: [2, 3]."""
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"
