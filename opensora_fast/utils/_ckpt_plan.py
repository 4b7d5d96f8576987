"""Bucket planning for the checkpoint gathers: what is gathered (``Item``),
how shards are packed into buckets (``plan_buckets``, ``bucket_cols``), the
option checks every rank runs before anything moves, and the memory-layout
tests (tensors side by side, runs of them) that decide whether a bucket is
sent as a view and copied out in one transfer; what a plan cached across
saves was derived from (``ModuleSlots``, ``tensor_layout``). No collective
runs here."""

from __future__ import annotations

import math
import operator
import weakref
from typing import Callable, Iterable, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

from .._module_tree import ModuleTree

DEFAULT_BUCKET_BYTES = 256 << 20
COLLECTIVES = ("auto", "gather", "all_gather")


def numel(shape) -> int:
    """Elements of ``shape`` (1 for a 0-dim shape)."""
    return int(math.prod(shape))


class Entry:
    """One piece of an item in one bucket: shard elements ``[begin, begin +
    count)`` at column ``offset`` of the bucket."""

    __slots__ = ("item", "begin", "count", "offset")

    def __init__(self, item: "Item", begin: int, count: int, offset: int):
        self.item, self.begin, self.count, self.offset = item, begin, count, offset


class Item:
    """One tensor to gather: its local 1-D shard (``snumel`` elements), the
    element count of the whole tensor, and its destination (rank 0)."""

    __slots__ = ("name", "shard", "snumel", "numel", "dst")

    def __init__(self, name: str, shard: torch.Tensor, numel: int, dst: Optional[torch.Tensor]):
        self.name, self.shard, self.numel, self.dst = name, shard, numel, dst
        self.snumel = shard.numel()


def plan_buckets(items: Sequence[Item], cols: int) -> Iterator[List[Entry]]:
    """Greedy packing in order: a bucket holds ``cols`` shard elements per rank;
    a shard that does not fit is continued in the next bucket. So every bucket
    but the last is full: there are ``ceil(total / cols)``. Lazy, so the first
    collective starts before the rest is planned."""
    cur: List[Entry] = []
    used = 0
    for it in items:
        s = it.snumel
        begin = 0
        while begin < s:
            if used == cols:
                yield cur
                cur, used = [], 0
            take = min(cols - used, s - begin)
            cur.append(Entry(it, begin, take, used))
            used += take
            begin += take
    if cur:
        yield cur


def bucket_cols(bucket_bytes, world: int, dtype: torch.dtype, fn: str) -> int:
    """Shard elements per rank in a bucket of ``bucket_bytes`` gathered bytes."""
    if bucket_bytes is None:
        bucket_bytes = DEFAULT_BUCKET_BYTES
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int):
        raise TypeError(f"{fn}: bucket_bytes must be an int, got {type(bucket_bytes).__name__}")
    esize = dtype.itemsize
    cols = bucket_bytes // (world * esize)
    if cols < 1:
        raise ValueError(
            f"{fn}: bucket_bytes={bucket_bytes} holds less than one {dtype} element per rank "
            f"(world size {world}); use at least {world * esize}"
        )
    return cols


def check_staging(fn: str, staging) -> None:
    if staging is not None and not isinstance(staging, bool):
        raise TypeError(f"{fn}: staging must be None or a bool, got {type(staging).__name__}")


def gather_options(fn: str, groups, bucket_bytes, collective, staging, world_of: Callable) -> tuple:
    """Checks the options against every (group, dtype) before anything moves
    (``world_of(group)``: its size); returns (the problem or None, the values
    every rank must pass alike)."""
    try:
        check_staging(fn, staging)
        if collective not in COLLECTIVES:
            raise ValueError(f"{fn}: collective must be 'auto', 'gather' or 'all_gather', got {collective!r}")
        bucket_cols(bucket_bytes, 1, torch.uint8, fn)  # the type, even with nothing to gather
        for group, dtype in groups:
            bucket_cols(bucket_bytes, world_of(group), dtype, fn)
    except (TypeError, ValueError) as e:
        return e, {}
    bb = DEFAULT_BUCKET_BYTES if bucket_bytes is None else bucket_bytes
    return None, {"bucket_bytes": bb, "collective": COLLECTIVES.index(collective)}


def collective_mode(collective: str, group) -> str:
    """ "gather" or "all_gather": "auto" picks gather on gloo (only rank 0
    needs the bytes), all_gather_into_tensor elsewhere."""
    if collective not in COLLECTIVES:
        raise ValueError(f"collective must be 'auto', 'gather' or 'all_gather', got {collective!r}")
    if collective != "auto":
        return collective
    return "gather" if dist.get_backend(group) == "gloo" else "all_gather"


def run_starts(tensors: Sequence[torch.Tensor]) -> List[int]:
    """Indices where a run of contiguous tensors lying one after another in
    memory starts (by address). Empty tensors take no memory (their data_ptr
    is 0): they belong to the run they sit in."""
    starts, nxt = [], None
    for j, t in enumerate(tensors):
        n = t.numel()
        if not n and starts:
            continue
        p = t.data_ptr()
        if p != nxt or not t.is_contiguous():
            starts.append(j)
        nxt = p + n * t.element_size()
    return starts


def side_by_side(tensors: Sequence[torch.Tensor]) -> bool:
    """The tensors lie one after another in one storage, in order (model_sharding's
    shards; CheckpointIO's pinned buffers): one run, and its ends in one
    storage (storages do not overlap, so all between them are in it too)."""
    tensors = [t for t in tensors if t.numel()]
    return (
        bool(tensors)
        and len(run_starts(tensors)) == 1
        and tensors[0].untyped_storage().data_ptr() == tensors[-1].untyped_storage().data_ptr()
    )


def flat_range(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Elements ``[start, start + n)`` of t's storage (in t's dtype) as a 1-D view."""
    return t.as_strided((n,), (1,), start)


def side_by_side_views(entries: Iterable[tuple], new_buffer, cap_bytes: Optional[int] = None) -> List[torch.Tensor]:
    """1-D views for ``entries`` (numel, dtype), in order, side by side in
    buffers of one dtype made by ``new_buffer(numel, dtype)``: one per dtype, or
    (``cap_bytes``) a new one whenever the next view would pass that size (a
    larger view gets its own)."""
    plan, sizes, current = [], [], {}  # (buffer, offset, numel); [numel, dtype]; dtype -> open buffer
    for n, dt in entries:
        j = current.get(dt)
        if j is None or (cap_bytes is not None and sizes[j][0] and (sizes[j][0] + n) * dt.itemsize > cap_bytes):
            j = current[dt] = len(sizes)
            sizes.append([0, dt])
        plan.append((j, sizes[j][0], n))
        sizes[j][0] += n
    bufs = [new_buffer(n, dt) for n, dt in sizes]
    return [bufs[j][off : off + n] for j, off, n in plan]


def check_dst(fn: str, name: str, shape, dtype, pinned_state_dict) -> Optional[str]:
    """None when ``pinned_state_dict[name]`` is a contiguous tensor of ``shape``
    and ``dtype``; otherwise what is wrong."""
    if name not in pinned_state_dict:
        return f"{fn}: pinned_state_dict has no entry {name!r}"
    t = pinned_state_dict[name]
    if type(t) is torch.Tensor and t.dtype == dtype and t.shape == shape and t.is_contiguous():
        return None  # the common case, in as few calls as possible (~1100 parameters)
    if not isinstance(t, torch.Tensor):
        return f"{fn}: pinned_state_dict[{name!r}] is a {type(t).__name__}, not a tensor"
    if tuple(t.shape) != tuple(shape):
        return f"{fn}: pinned_state_dict[{name!r}] has shape {list(t.shape)}, expected {list(shape)}"
    if t.dtype != dtype:
        return f"{fn}: pinned_state_dict[{name!r}] has dtype {t.dtype}, expected {dtype}"
    if not t.is_contiguous():
        return f"{fn}: pinned_state_dict[{name!r}] is not contiguous"
    return None


_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")
_is = operator.is_
_deref = weakref.ref.__call__
_slot_names = ("_parameters", "_modules", "_buffers")
_nonpersistent = operator.attrgetter("_non_persistent_buffers_set")
_hooks = tuple(map(operator.attrgetter, ("_state_dict_hooks", "_state_dict_pre_hooks")))
# Methods whose override could make state_dict() differ from the slots' contents.
_STATE_METHODS = ("state_dict", "_save_to_state_dict", "get_extra_state")


def tensor_layout(tensors: Sequence[torch.Tensor]) -> list:
    """What a gather plan reads of each tensor: shape, dtype, device, address,
    contiguity. Compared whole (``==``), in C-level passes (~1100 tensors)."""
    return [
        list(map(_shape, tensors)),
        list(map(_dtype, tensors)),
        list(map(_device, tensors)),
        list(map(torch.Tensor.data_ptr, tensors)),
        list(map(torch.Tensor.is_contiguous, tensors)),
    ]


def weak_refs(tensors: Sequence[torch.Tensor]) -> list:
    """Weak references to ``tensors``: a cache holding them would keep pinned
    host buffers (or master shards) alive after their owner dropped them."""
    return list(map(weakref.ref, tensors))


def same_objects(now: Sequence, refs: Sequence) -> bool:
    """Each of ``now`` is the very object its weak reference in ``refs`` names."""
    return len(now) == len(refs) and all(map(_is, now, map(_deref, refs)))


class ModuleSlots(ModuleTree):
    """The parameter, submodule and buffer slots of one module tree, which
    decide ``named_parameters()`` and ``state_dict(keep_vars=True)``: the
    checks of :class:`ModuleTree` over the buffers too, and the same
    non-persistent buffer names, and no state-dict hook registered.
    :meth:`usable` is False where ``state_dict`` may hold more than the slots
    (hooks, overrides)."""

    __slots__ = ("nonpersist",)
    SLOTS = _slot_names

    def __init__(self, root: torch.nn.Module) -> None:
        super().__init__(root)
        self.nonpersist = [set(s) for s in map(_nonpersistent, [root] + self.mods)]

    @staticmethod
    def usable(root: torch.nn.Module) -> bool:
        """No module of the tree changes what state_dict() returns."""
        base = torch.nn.Module
        for m in root.modules():
            t = type(m)
            if any(getattr(t, k) is not getattr(base, k) for k in _STATE_METHODS) or any(h(m) for h in _hooks):
                return False
        return True

    def unchanged(self, root: torch.nn.Module) -> bool:
        if not super().unchanged(root):
            return False
        mods = [root] + self.mods
        try:
            return list(map(_nonpersistent, mods)) == self.nonpersist and not any(any(map(h, mods)) for h in _hooks)
        except (TypeError, AttributeError):
            return False
