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


def tensor_span(t: torch.Tensor, written: bool, arg: str, index: int, storages: dict) -> Span | None:
    """The bytes a contiguous tensor covers. Real tensors: their addresses.
    Fake tensors have none, so each storage gets its own address range
    (views of one storage still overlap, distinct storages never do).
    Meta tensors are skipped, as the native check skips them."""
    if t.device.type == "meta":
        return None
    nbytes = t.numel() * t.element_size()
    if isinstance(t, torch._subclasses.fake_tensor.FakeTensor):
        key = StorageWeakRef(t.untyped_storage())
        base = storages.setdefault(key, (len(storages) + 1) << 48)
        start = base + t.storage_offset() * t.element_size()
    else:
        start = t.data_ptr()
    return Span(start, start + nbytes, written, arg, index)


def find_overlap(spans: Sequence[Span | None]) -> tuple[Span, Span] | None:
    """A written span overlapping any other span (read-read overlaps are fine):
    csrc/host.h find_overlap, the same sweep and the same pair reported."""
    live = sorted((s for s in spans if s is not None and s.end > s.start), key=lambda s: (s.start, s.index, not s.written))
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
