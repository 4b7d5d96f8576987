"""The bucketed gather behind ``model_gathering`` and ``master_weights_gathering``.

:class:`GatherPlan` makes every decision before anything moves (collective,
who receives and unpacks, whether shards are sent as views, staging, bucket
size, agreed across the group); :class:`BucketGather` owns the buffers and
runs the steps: start a bucket's collective, unpack the previous one (into
its destinations, or a staging buffer copied out by the copy engine), so the
next collective overlaps the current unpack. In a group of one there is
nothing to gather: :func:`copy_local` copies each shard's prefix instead."""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..ops.unpad import unpad_lists
from ._ckpt_dist import progress as _progress
from ._ckpt_plan import Entry, Item, bucket_cols, collective_mode, flat_range, plan_buckets, run_starts, side_by_side

# all_gather_into_tensor was renamed all_gather_single (torch 2.13+ warns on the old name)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

DST_RANK = 0  # the global rank that receives the checkpoint


class GatherPlan:
    """Every decision of one gather of ``items`` (one dtype and device) over
    ``group``. Build it with :meth:`make`."""

    def __init__(self, items: Sequence[Item], group, cols: int, mode: str, total: int):
        self.items, self.group, self.mode, self.total = items, group, mode, total
        self.world = dist.get_world_size(group)
        self.me = dist.get_rank()
        self.dtype, self.device = items[0].shard.dtype, items[0].shard.device
        self.receive = self.me == DST_RANK or mode == "all_gather"
        self.unpack = self.me == DST_RANK
        # Shards side by side in one buffer (model_sharding's): a bucket is sent
        # as a view of it, nothing packed.
        self.flat_src = side_by_side([it.shard for it in items])
        self.cols = self.cols_asked = cols
        self.staging = self.to_host_pageable = False
        self._buckets: Optional[Tuple[int, List[List[Entry]]]] = None  # (cols, every bucket) of a whole run
        self.n_buckets = self.width = 0
        self.wire: Optional[torch.dtype] = None

    @classmethod
    def make(
        cls, items: Sequence[Item], group, *, bucket_bytes, collective: str, fn: str, staging: Optional[bool]
    ) -> Optional["GatherPlan"]:
        """The plan, or None when there is nothing to move (every item empty)."""
        world = dist.get_world_size(group)
        cols = bucket_cols(bucket_bytes, world, items[0].shard.dtype, fn)
        mode = collective_mode(collective, group)
        if mode == "gather" and DST_RANK not in dist.get_process_group_ranks(group):
            mode = "all_gather"
        total = sum(it.snumel for it in items)
        if total == 0:  # only empty parameters: nothing to move
            return None
        plan = cls(items, group, cols, mode, total)
        plan._choose_staging(staging)
        plan._size_buckets()
        return plan

    def reuse(self) -> "GatherPlan":
        """The plan for another gather of the same items (the caller checked
        that nothing it was derived from changed): only the bucket size is
        agreed again, so every rank runs the same collectives whether it
        re-planned or not."""
        self._size_buckets()
        return self

    def buckets(self) -> Iterator[List[Entry]]:
        """The buckets in order: those of the last whole run at this bucket
        size, or planned lazily (kept once a run took them all)."""
        if self._buckets is not None and self._buckets[0] == self.cols:
            return iter(self._buckets[1])
        return self._plan_and_keep(self.cols)

    def _plan_and_keep(self, cols: int) -> Iterator[List[Entry]]:
        done: List[List[Entry]] = []
        for b in plan_buckets(self.items, cols):
            done.append(b)
            if len(done) == self.n_buckets:  # the run takes no more than these
                self._buckets = (cols, done)
            yield b

    def _choose_staging(self, staging: Optional[bool]) -> None:
        dsts = [it.dst for it in self.items] if self.unpack else []
        # The destinations' runs of side-by-side tensors (one per allocation for
        # CheckpointIO's segments, one per tensor for separate allocations).
        starts = run_starts(dsts)
        flat_dst = self.unpack and len(starts) <= max(1, len(dsts) // 16)
        to_host = False
        if self.unpack and self.device.type == "cuda":
            to_host = not dsts[0].is_cuda
            # is_pinned asks the CUDA driver: once per run (one allocation) is enough
            # to choose; the copies and the kernel handle any tensor either way
            self.to_host_pageable = any(not (dsts[j].is_cuda or dsts[j].is_pinned()) for j in starts)
        if staging is None:
            # Staging pays when the destinations lie side by side in a few pinned
            # buffers (CheckpointIO's): the copy engine then moves each bucket in
            # one or a few transfers. Separate tensors would cost one transfer each.
            staging = to_host and flat_dst and not self.to_host_pageable
        self.staging = bool(staging and self.unpack and not self.to_host_pageable)

    def _size_buckets(self) -> None:
        # Extra memory stays within two buckets (2 * world * cols elements): the
        # gathered buffers (two; rank 0 staging on CUDA: one, plus two staging
        # buffers) and a send buffer of cols where shards must be packed. Every
        # rank of the group must size buckets alike, so they agree first.
        world = self.world
        three = self.staging and self.device.type == "cuda"
        need_send = not self.flat_src
        if world > 1:
            flags = torch.tensor([int(three), int(need_send)], dtype=torch.int32, device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            three, need_send = (bool(v) for v in flags.tolist())
        units = (3 if three else 2) * world + int(need_send)
        self.cols = max(1, self.cols_asked * 2 * world // units)
        self.n_buckets = -(-self.total // self.cols)
        self.width = min(self.cols, self.total)
        # A gather moves bytes: on gloo, bf16/fp16 travel as uint8 (gloo has no
        # fast path for bf16; same bits either way).
        if self.dtype in (torch.bfloat16, torch.float16) and dist.get_backend(self.group) == "gloo":
            self.wire = torch.uint8


# (collective's work handle, gathered buffer or None, used columns)
Pending = Tuple[object, Optional[torch.Tensor], int]


class BucketGather:
    """Runs a :class:`GatherPlan`: its buffers and its per-bucket steps."""

    def __init__(self, plan: GatherPlan):
        self.plan = p = plan
        dtype, device, width, world = p.dtype, p.device, p.width, p.world
        self.planned = p.buckets()
        self.buckets: List[List[Entry]] = []  # planned as the loop reaches them
        # Two gathered buffers, so the next collective runs while this one is
        # unpacked; one when staging, whose collective runs during the copy out
        # of the staging buffer instead. A send buffer only to pack shards that
        # are not side by side.
        self.send = None if p.flat_src else torch.empty(width, dtype=dtype, device=device)
        self.n_recv = min(1 if p.staging else 2, p.n_buckets) if p.receive else 0
        self.recv = [torch.empty(world * width, dtype=dtype, device=device) for _ in range(self.n_recv)]
        # staging: whole parameters are unpacked into a buffer laid out as their
        # destinations are, then copied there (on CUDA by the copy engine into
        # pinned memory, instead of the kernel's stores over PCIe). On CUDA two
        # such buffers and a copy stream: bucket k is copied out while bucket
        # k + 1 is unpacked.
        cuda_staging = p.staging and device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device=device) if cuda_staging else None
        n_stages = min(2 if cuda_staging else 1, p.n_buckets) if p.staging else 0
        self.stages = [torch.empty(world * width, dtype=dtype, device=device) for _ in range(n_stages)]
        self.copied: List[Optional[torch.cuda.Event]] = [None] * n_stages  # copies out of stages[i] done

    def start(self, k: int) -> Pending:
        """Plans bucket ``k`` and starts its collective."""
        p = self.plan
        self.buckets.append(next(self.planned))
        entries = self.buckets[k]
        used = entries[-1].offset + entries[-1].count
        if self.send is None:
            e0 = entries[0]
            sbuf = flat_range(e0.item.shard.detach(), e0.item.shard.storage_offset() + e0.begin, used)
        else:
            sbuf = self.send[:used]
            torch.cat([e.item.shard.detach()[e.begin : e.begin + e.count] for e in entries], out=sbuf)
        rbuf = self.recv[k % self.n_recv][: p.world * used] if p.receive else None
        cs, cr = sbuf, rbuf
        if p.wire is not None:
            cs, cr = sbuf.view(p.wire), (rbuf.view(p.wire) if rbuf is not None else None)
        if p.mode == "all_gather":
            work = _all_gather_flat(cr, cs, group=p.group, async_op=True)
        else:
            rows = list(cr.view(p.world, -1).unbind(0)) if p.me == DST_RANK else None
            work = dist.gather(cs, rows, dst=DST_RANK, group=p.group, async_op=True)
        return work, rbuf, used

    @staticmethod
    def _stage_outputs(entries: List[Entry], outs: List[torch.Tensor], stage: torch.Tensor) -> List[list]:
        """Points each whole parameter of the bucket at its place in ``stage``
        (in ``outs``); returns the runs of destinations to copy out, each
        [first destination, its storage offset, its address, stage position,
        length, end of its storage]."""
        runs: List[list] = []
        pos = 0
        esize = stage.element_size()
        for j, e in enumerate(entries):
            if e.begin == 0 and e.count == e.item.snumel:  # the whole parameter is here
                d, n = outs[j], e.item.numel
                run = runs[-1] if runs else None
                ptr = d.data_ptr()
                if (
                    run is not None
                    and run[3] + run[4] == pos
                    and ptr == run[2] + run[4] * esize
                    and ptr + n * esize <= run[5]
                ):
                    run[4] += n  # right after the previous one, in its storage: one copy for both
                else:
                    st = d.untyped_storage()
                    runs.append([d, d.storage_offset(), ptr, pos, n, st.data_ptr() + st.nbytes()])
                outs[j] = flat_range(stage, pos, n)  # the kernel needs only the element count
                pos += n
        return runs

    def unpack_bucket(self, k: int, rbuf: torch.Tensor, used: int, stage: Optional[torch.Tensor] = None) -> list:
        """Unpacks bucket ``k`` (whole parameters into ``stage`` when given);
        returns the (destination, staged) copies still to make."""
        entries = self.buckets[k]
        gathered = rbuf.view(self.plan.world, used)
        if self.plan.to_host_pageable:
            gathered = gathered.cpu()
        outs = [e.item.dst for e in entries]
        runs = self._stage_outputs(entries, outs, stage) if stage is not None else []
        unpad_lists(
            gathered,
            outs,
            [e.offset for e in entries],
            [e.item.snumel for e in entries],
            [e.begin for e in entries],
            [e.count for e in entries],
        )
        return [(flat_range(d, off, n), flat_range(stage, pos, n)) for d, off, _, pos, n, _ in runs]

    def _step_staged(self, k: int, rbuf: torch.Tensor, used: int) -> Optional[Pending]:
        device = self.plan.device
        i = k % len(self.stages)
        if self.copied[i] is not None:  # stages[i] is free once bucket k - 2 is copied out
            torch.cuda.current_stream(device).wait_event(self.copied[i])
        copies = self.unpack_bucket(k, rbuf, used, self.stages[i])
        unpacked = torch.cuda.current_stream(device).record_event() if self.copy_stream is not None else None
        # the next collective reuses the one gathered buffer: enqueued after the
        # unpack, it runs during the copies below
        pending = self.start(k + 1) if k + 1 < self.plan.n_buckets else None
        if self.copy_stream is None:  # CPU: in order, now
            for dst, view in copies:
                dst.copy_(view)
            return pending
        self.copy_stream.wait_event(unpacked)
        with torch.cuda.stream(self.copy_stream):
            for dst, view in copies:
                dst.copy_(view, non_blocking=True)
        self.copied[i] = self.copy_stream.record_event()
        if pending is None:
            self.copy_stream.synchronize()
        return pending

    def _step_direct(self, k: int, rbuf: Optional[torch.Tensor], used: int) -> Optional[Pending]:
        # The next bucket's collective runs while this one is unpacked.
        pending = self.start(k + 1) if k + 1 < self.plan.n_buckets else None
        if self.plan.unpack:
            self.unpack_bucket(k, rbuf, used)
        return pending

    def run(self, desc: str, show: bool) -> None:
        """Every bucket: wait for its collective, start the next, unpack it."""
        p = self.plan
        pending = self.start(0)
        try:
            with torch.no_grad():
                for k in _progress(range(p.n_buckets), p.n_buckets, desc, show):
                    work, rbuf, used = pending
                    work.wait()
                    step = self._step_staged if p.staging else self._step_direct
                    pending = step(k, rbuf, used)
                    if pending is None and p.device.type == "cuda":
                        torch.cuda.current_stream(p.device).synchronize()
        finally:
            self._drain()

    def _drain(self) -> None:
        """Waits for the copies still queued on the copy stream, also when the
        loop raised: they read staging buffers that are freed with this object,
        and the allocator, which knows only the stream that allocated them,
        could hand them out again while the copy engine still reads them.
        Nothing to wait for on the CPU (copies there run in order, at once)
        or after the last bucket (its step synchronised already)."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()


def gather_items(
    items: Sequence[Item],
    group,
    *,
    bucket_bytes: Optional[int],
    collective: str,
    desc: str,
    show: bool,
    fn: str,
    staging: Optional[bool] = None,
    cache: Optional[Dict[str, object]] = None,
) -> None:
    """Gathers every item's shard over ``group`` and writes its unpadded
    tensor into ``item.dst`` on global rank 0. Items share one dtype and device.
    ``cache``: where the plan is kept for the next gather of the same items
    (under "gather"), the caller having checked that they did not change."""
    if not items:
        return
    plan = cache.get("gather", _NOTHING) if cache is not None else _NOTHING
    if plan is _NOTHING:
        plan = GatherPlan.make(items, group, bucket_bytes=bucket_bytes, collective=collective, fn=fn, staging=staging)
        if cache is not None:
            cache["gather"] = plan
    elif plan is not None:
        plan.reuse()
    if plan is not None:
        BucketGather(plan).run(desc, show)


_NOTHING = object()  # no plan cached yet (None: nothing to move)


class _LocalRun:
    """Items whose shards and destinations both lie one after another in one
    storage each: copied in one call. A shard longer than its tensor (padding)
    ends the run: the next shard then starts past ``src_end``."""

    __slots__ = ("first", "src", "dst", "n", "src_end", "dst_end", "src_cap", "dst_cap")

    def __init__(self, first: int, src: torch.Tensor, dst: torch.Tensor):
        self.first, self.src, self.dst, self.n = first, src, dst, 0
        self.src_end, self.dst_end = src.data_ptr(), dst.data_ptr()
        s, d = src.untyped_storage(), dst.untyped_storage()
        self.src_cap, self.dst_cap = s.data_ptr() + s.nbytes(), d.data_ptr() + d.nbytes()

    def takes(self, src: torch.Tensor, dst: torch.Tensor, nbytes: int) -> bool:
        """``src`` and ``dst`` continue this run, inside its storages."""
        return (
            src.device == self.src.device
            and dst.device == self.dst.device
            and src.data_ptr() == self.src_end
            and dst.data_ptr() == self.dst_end
            and self.src_end + nbytes <= self.src_cap
            and self.dst_end + nbytes <= self.dst_cap
        )

    def add(self, n: int, nbytes: int) -> None:
        self.n += n
        self.src_end += nbytes
        self.dst_end += nbytes


class LocalPlan:
    """:func:`copy_local`'s runs of one list of items: (index of the run's
    first item, elements), and the CUDA devices to synchronise. A shard that is
    not contiguous is a run of its own, copied through a contiguous copy. It
    holds no tensor, so a cache may keep it."""

    __slots__ = ("runs", "devices")

    def __init__(self, items: Sequence[Item]):
        runs: List[_LocalRun] = []
        self.devices = set()
        open_run = False  # the last run may be continued (not a temporary copy)
        for i, it in enumerate(items):
            if it.dst is None or not it.numel:
                continue
            src, dst = it.shard.detach(), it.dst
            alone = not src.is_contiguous()
            if alone:
                src = src.contiguous()
            nbytes = it.numel * src.element_size()
            if not (open_run and runs[-1].takes(src, dst, nbytes)):
                runs.append(_LocalRun(i, src, dst))
            runs[-1].add(it.numel, nbytes)
            open_run = not alone
            for t in (src, dst):
                if t.is_cuda:
                    self.devices.add(t.device)
        self.runs = [(r.first, r.n) for r in runs]


def copy_local(items: Sequence[Item], plan: Optional[LocalPlan] = None) -> None:
    """A group of one: each shard is its whole (padded) tensor, so its first
    ``numel`` elements are copied straight into the destination; no collective,
    no bucket, nothing packed. Shards and destinations that lie side by side
    (model_sharding's, CheckpointIO's buffers) go in one copy per run. Same
    bits as the gather's unpack. ``plan``: the items' runs, when cached."""
    if plan is None:
        plan = LocalPlan(items)
    with torch.no_grad():
        for first, n in plan.runs:
            it = items[first]
            src, dst = it.shard.detach(), it.dst
            if not src.is_contiguous():
                src = src.contiguous()
            flat_range(dst, dst.storage_offset(), n).copy_(flat_range(src, src.storage_offset(), n), non_blocking=True)
    for d in plan.devices:  # the destinations are read as soon as this returns
        torch.cuda.synchronize(d)
