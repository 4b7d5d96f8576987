"""Drop-in for ``opensora.utils.ckpt``: the same names, signatures and results,
with a bucketed gather, an async crash-safe ``CheckpointIO`` and safe loading.

What differs from upstream (each on purpose):

* **Gathers** (``model_gathering``, ``master_weights_gathering``): parameters are
  grouped by process group and dtype into buckets of at most ``bucket_bytes``
  (default 256 MiB, for the ``[world, bucket]`` gathered buffer; a shard larger
  than a bucket is split across buckets); one collective per bucket (a
  ``gather`` to rank 0 on gloo, where only rank 0 needs the bytes;
  ``all_gather_into_tensor`` on NCCL); one ``opensora_fast::unpad_`` call per
  bucket writes every parameter's unpadded tensor straight into its pinned
  destination, or (``staging``, the default when the destinations lie side by
  side in a few pinned buffers, as CheckpointIO's 1 GiB segments do) into a
  device buffer laid out like them,
  which the copy engine then moves in one transfer per bucket. The next
  bucket's collective runs while the current one is unpacked (or copied out).
  Extra memory per rank: at most two buckets (``2 * bucket_bytes``), every
  buffer counted: two gathered buffers (when staging on a GPU, rank 0 holds
  one gathered and two staging buffers, so one bucket is copied out while the
  next is unpacked) and, where shards are not side by side, a send buffer to
  pack them (``model_sharding``'s are, so a bucket is sent as a view of them);
  the ranks agree on a bucket size that fits. The results are upstream's, bit for bit;
  0-dim parameters work (upstream's ``remove_padding`` fails on them).
* **Writing**: the EMA and master weights are written as safetensors from the
  pinned buffers by a background thread; ``save`` returns once the buffers are
  filled, ``_sync_io`` waits, and a new save waits for the previous one. The
  thread writes each file through tensornvme's ``AsyncFileWriter`` (reached, as
  upstream does, through ``colossalai.utils.safetensors.save``) when both import,
  else with our own streaming writer; tensornvme's AsyncFileWriter is not on
  PyPI, so the second is what a pip install gets. Either way the file is
  fsynced before the checkpoint is renamed complete.
* **Crash safety**: a checkpoint is written under a hidden temporary name
  (``.epochE-global_stepS.partial``), every file fsynced, ``running_states.json``
  last, then renamed. A directory named ``epoch*-global_step*`` with a
  ``running_states.json`` is complete; ``load`` refuses anything else and
  ``rm_checkpoints`` ignores it. ``rm_checkpoints`` removes ``running_states.json``
  first, so a removal cut short never leaves a loadable half checkpoint; it
  lists ``save_dir`` (upstream globbed it: ``exp[12]`` matched ``exp1``).
  ``epoch`` and ``actual_update_step`` name the directory: non-negative ints only.
* **Checksums**: a CRC-32 of every file (computed while writing it where we
  write it) is recorded under ``"checksums"`` in ``running_states.json``;
  ``load`` checks the files it reads first (``verify=False`` skips it), so a
  flipped bit is a ValueError naming the file, not silently wrong weights.
* **Failures**: a failed background write is raised by ``_sync_io`` /
  ``close`` and by the next ``save``; one never asked for is logged and makes
  the interpreter exit with status 1 (:mod:`._ckpt_exit`). In a process group
  a failure on any rank, before or inside the gathers, raises on every rank
  (one small ``all_reduce`` agrees on success before each collective step),
  and the gathers refuse ranks passing different ``bucket_bytes`` or
  ``collective``.
* **Loading**: ``.pt``/``.pth`` with ``weights_only=True`` unless
  ``weights_only=False`` is passed for a trusted legacy file; safetensors
  errors name the file; ``rename_keys`` applies to both formats.
* **Without colossalai** (``booster=None``): the model's state dict is saved as
  ``model.safetensors`` and the optimizer, lr scheduler and sampler states as
  ``*.pt`` files loaded back with ``weights_only=True``. Booster-sharded models
  and optimizers (ZeRO, hybrid parallel), LoRA saving and sharded-directory
  loading need colossalai's Booster (``pip install opensora_fast[colossalai]``);
  with a booster those parts are written synchronously inside the temporary
  directory so the rename covers them.
* ``CheckpointIO.save`` also writes the EMA as ``ema.safetensors`` when
  ``async_io=False`` (upstream then ``torch.save``s the still-sharded EMA).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import struct
import sys
import threading
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..ops.unpad import unpad_lists
from . import _ckpt_exit, _ckpt_files, _ckpt_state
from ._ckpt_agree import agree as _agree_ranks, agree_exception as _agree_exception
from .logger import log_message

__all__ = [
    "CheckpointIO",
    "load_checkpoint",
    "load_from_hf_hub",
    "load_from_sharded_state_dict",
    "load_json",
    "load_master_weights",
    "master_weights_gathering",
    "model_gathering",
    "model_sharding",
    "print_load_warning",
    "record_model_param_shape",
    "remove_padding",
    "rm_checkpoints",
    "save_json",
    "DEFAULT_BUCKET_BYTES",
]

hf_endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"

DEFAULT_BUCKET_BYTES = 256 << 20
PIN_SEGMENT_BYTES = 1 << 30  # CheckpointIO's pinned buffers: segments of at most this (a larger tensor: its own)
_CKPT_RE = re.compile(r"epoch(\d+)-global_step(\d+)$")
_COMPLETE = "running_states.json"

# Test hook: called with a phase name at every step of a checkpoint write
# (tests/test_ckpt_crash.py kills the process there).
_phase_hook: Optional[Callable[[str], None]] = None


def _phase(name: str) -> None:
    if _phase_hook is not None:
        _phase_hook(name)


# ----------------------------------------------------------------- dist glue


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _show_progress(progress: Optional[bool]) -> bool:
    if progress is not None:
        return bool(progress) and _rank() == 0
    if os.environ.get("OPENSORA_FAST_PROGRESS", "").strip() == "0":
        return False
    return _rank() == 0 and sys.stderr.isatty()


def _progress(iterable, total: int, desc: str, show: bool):
    if not show:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


# ----------------------------------------------------------------- small helpers


def _numel(shape) -> int:
    return int(math.prod(shape))


def remove_padding(tensor: torch.Tensor, original_shape: tuple) -> torch.Tensor:
    """Remove padding from a tensor: its first ``prod(original_shape)`` elements
    (1 for a 0-dim shape, where upstream raises TypeError)."""
    return tensor[: _numel(original_shape)]


def record_model_param_shape(model: torch.nn.Module) -> dict:
    """The shape of every parameter, by name (before sharding)."""
    return {name: param.shape for name, param in model.named_parameters()}


def model_sharding(model: torch.nn.Module, device: torch.device = None):
    """Shard every parameter across the world: flatten, zero-pad to a multiple
    of the world size, keep this rank's chunk as a 1-D tensor (on ``device``,
    default: where the first parameter is, as upstream).

    Same shards as upstream. Unlike upstream (whose shards are views that keep
    each full parameter alive), the shards are copied side by side into one
    flat buffer per dtype, in parameter order, so the full parameters are freed
    (while the call runs, the model and one set of shards are both alive) and a
    gather bucket of adjacent shards is sent without packing it first."""
    rank, world = dist.get_rank(), dist.get_world_size()
    params = [p for _, p in model.named_parameters()]
    if not params:
        return
    if device is None:
        device = params[0].device
    shards = [-(-p.numel() // world) for p in params]
    # zeros: the padding
    views = _side_by_side_views(zip(shards, (p.dtype for p in params)),
                                lambda n, dt: torch.zeros(n, dtype=dt, device=device))
    with torch.no_grad():
        for p, shard, view in zip(params, shards, views):
            mine = p.data.reshape(-1)[rank * shard : min((rank + 1) * shard, p.numel())]
            view[: mine.numel()].copy_(mine)
            p.data = view


def _side_by_side_views(entries: Iterable[tuple], new_buffer, cap_bytes: Optional[int] = None) -> List[torch.Tensor]:
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


def load_json(file_path: str) -> dict:
    """Load a JSON file."""
    with open(file_path, "r", encoding="utf-8") as f:
        return json.load(f)


_fsync = _ckpt_files.fsync_path


def save_json(data, file_path: str):
    """Save ``data`` as indented JSON; written to a temporary name, fsynced
    and renamed, so the file is either the old one or the whole new one (a
    write that fails leaves the old one and no temporary file)."""
    tmp = f"{file_path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=4)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file_path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


# ----------------------------------------------------------------- bucketed gather


class _Entry:
    __slots__ = ("item", "begin", "count", "offset")

    def __init__(self, item, begin, count, offset):
        self.item, self.begin, self.count, self.offset = item, begin, count, offset


class _Item:
    """One tensor to gather: its local 1-D shard (``snumel`` elements), the
    element count of the whole tensor, and its destination (rank 0)."""
    __slots__ = ("name", "shard", "snumel", "numel", "dst")

    def __init__(self, name, shard, numel, dst):
        self.name, self.shard, self.numel, self.dst = name, shard, numel, dst
        self.snumel = shard.numel()


def _plan_buckets(items: Sequence[_Item], cols: int) -> Iterator[List[_Entry]]:
    """Greedy packing in order: a bucket holds ``cols`` shard elements per rank;
    a shard that does not fit is continued in the next bucket. So every bucket
    but the last is full: there are ``ceil(total / cols)``. Lazy, so the first
    collective starts before the rest is planned."""
    cur: List[_Entry] = []
    used = 0
    for it in items:
        s = it.snumel
        begin = 0
        while begin < s:
            if used == cols:
                yield cur
                cur, used = [], 0
            take = min(cols - used, s - begin)
            cur.append(_Entry(it, begin, take, used))
            used += take
            begin += take
    if cur:
        yield cur


def _bucket_cols(bucket_bytes, world: int, dtype: torch.dtype, fn: str) -> int:
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


_COLLECTIVES = ("auto", "gather", "all_gather")


def _gather_options(fn: str, groups, bucket_bytes, collective, staging) -> tuple:
    """Checks the options against every (group, dtype) before anything moves;
    returns (the problem or None, the values every rank must pass alike)."""
    try:
        if staging is not None and not isinstance(staging, bool):
            raise TypeError(f"{fn}: staging must be None or a bool, got {type(staging).__name__}")
        if collective not in _COLLECTIVES:
            raise ValueError(f"{fn}: collective must be 'auto', 'gather' or 'all_gather', got {collective!r}")
        _bucket_cols(bucket_bytes, 1, torch.uint8, fn)  # the type, even with nothing to gather
        for group, dtype in groups:
            _bucket_cols(bucket_bytes, dist.get_world_size(group), dtype, fn)
    except (TypeError, ValueError) as e:
        return e, {}
    bb = DEFAULT_BUCKET_BYTES if bucket_bytes is None else bucket_bytes
    return None, {"bucket_bytes": bb, "collective": _COLLECTIVES.index(collective)}


# all_gather_into_tensor was renamed all_gather_single (torch 2.13+ warns on the old name)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _collective_mode(collective: str, group) -> str:
    if collective not in ("auto", "gather", "all_gather"):
        raise ValueError(f"collective must be 'auto', 'gather' or 'all_gather', got {collective!r}")
    if collective != "auto":
        return collective
    return "gather" if dist.get_backend(group) == "gloo" else "all_gather"


def _run_starts(tensors: Sequence[torch.Tensor]) -> List[int]:
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


def _side_by_side(tensors: Sequence[torch.Tensor]) -> bool:
    """The tensors lie one after another in one storage, in order (model_sharding's
    shards; CheckpointIO's pinned buffers): one run, and its ends in one
    storage (storages do not overlap, so all between them are in it too)."""
    tensors = [t for t in tensors if t.numel()]
    return (bool(tensors) and len(_run_starts(tensors)) == 1
            and tensors[0].untyped_storage().data_ptr() == tensors[-1].untyped_storage().data_ptr())


def _flat_range(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Elements ``[start, start + n)`` of t's storage (in t's dtype) as a 1-D view."""
    return t.as_strided((n,), (1,), start)


def _gather_items(
    items: Sequence[_Item],
    group,
    *,
    bucket_bytes: Optional[int],
    collective: str,
    desc: str,
    show: bool,
    fn: str,
    staging: Optional[bool] = None,
) -> None:
    """Gathers every item's shard over ``group`` and writes its unpadded
    tensor into ``item.dst`` on global rank 0. Items share one dtype and device."""
    if not items:
        return
    world = dist.get_world_size(group)
    dst_rank = 0
    me = dist.get_rank()
    dtype, device = items[0].shard.dtype, items[0].shard.device
    cols = _bucket_cols(bucket_bytes, world, dtype, fn)
    mode = _collective_mode(collective, group)
    if mode == "gather" and dst_rank not in dist.get_process_group_ranks(group):
        mode = "all_gather"
    total = sum(it.snumel for it in items)
    if total == 0:  # only empty parameters: nothing to move
        return
    receive = me == dst_rank or mode == "all_gather"
    unpack = me == dst_rank
    # Shards side by side in one buffer (model_sharding's): a bucket is sent as
    # a view of it, nothing packed.
    flat_src = _side_by_side([it.shard for it in items])
    dsts = [it.dst for it in items] if unpack else []
    # The destinations' runs of side-by-side tensors (one per allocation for
    # CheckpointIO's segments, one per tensor for separate allocations).
    run_starts = _run_starts(dsts)
    flat_dst = unpack and len(run_starts) <= max(1, len(dsts) // 16)
    to_host = to_host_pageable = False
    if unpack and device.type == "cuda":
        to_host = not dsts[0].is_cuda
        # is_pinned asks the CUDA driver: once per run (one allocation) is enough to
        # choose; the copies and the kernel handle any tensor either way
        to_host_pageable = any(not (dsts[j].is_cuda or dsts[j].is_pinned()) for j in run_starts)
    if staging is None:
        # Staging pays when the destinations lie side by side in a few pinned
        # buffers (CheckpointIO's): the copy engine then moves each bucket in one
        # or a few transfers. Separate tensors would cost one transfer each.
        staging = to_host and flat_dst and not to_host_pageable
    staging = bool(staging and unpack and not to_host_pageable)
    # Extra memory stays within two buckets (2 * world * cols elements): the
    # gathered buffers (two; rank 0 staging on CUDA: one, plus two staging
    # buffers) and a send buffer of cols where shards must be packed. Every
    # rank of the group must size buckets alike, so they agree first.
    three = staging and device.type == "cuda"
    need_send = not flat_src
    if world > 1:
        flags = torch.tensor([int(three), int(need_send)], dtype=torch.int32, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        three, need_send = (bool(v) for v in flags.tolist())
    units = (3 if three else 2) * world + int(need_send)
    cols = max(1, cols * 2 * world // units)
    n_buckets = -(-total // cols)
    planned = _plan_buckets(items, cols)
    buckets: List[List[_Entry]] = []  # planned as the loop reaches them
    width = min(cols, total)
    wire = torch.uint8 if dtype in (torch.bfloat16, torch.float16) and dist.get_backend(group) == "gloo" else None
    # Two gathered buffers, so the next collective runs while this one is
    # unpacked; one when staging, whose collective runs during the copy out of
    # the staging buffer instead. A send buffer only to pack shards that are
    # not side by side.
    send = None if flat_src else torch.empty(width, dtype=dtype, device=device)
    n_recv = min(1 if staging else 2, n_buckets) if receive else 0
    recv = [torch.empty(world * width, dtype=dtype, device=device) for _ in range(n_recv)]
    # staging: whole parameters are unpacked into a buffer laid out as their
    # destinations are, then copied there (on CUDA by the copy engine into
    # pinned memory, instead of the kernel's stores over PCIe). On CUDA two
    # such buffers and a copy stream: bucket k is copied out while bucket k + 1
    # is unpacked.
    copy_stream = torch.cuda.Stream(device=device) if staging and device.type == "cuda" else None
    stages = [torch.empty(world * width, dtype=dtype, device=device)
              for _ in range(min(2 if copy_stream is not None else 1, n_buckets) if staging else 0)]
    copied: List[Optional[torch.cuda.Event]] = [None] * len(stages)  # the copies out of stages[i] are done

    def start(k):
        buckets.append(next(planned))
        entries = buckets[k]
        used = entries[-1].offset + entries[-1].count
        if send is None:
            e0 = entries[0]
            sbuf = _flat_range(e0.item.shard.detach(), e0.item.shard.storage_offset() + e0.begin, used)
        else:
            sbuf = send[:used]
            torch.cat([e.item.shard.detach()[e.begin : e.begin + e.count] for e in entries], out=sbuf)
        rbuf = recv[k % n_recv][: world * used] if receive else None
        # A gather moves bytes: on gloo, bf16/fp16 travel as uint8 (gloo has no
        # fast path for bf16; same bits either way).
        cs, cr = (sbuf.view(wire), rbuf.view(wire) if rbuf is not None else None) if wire is not None else (sbuf, rbuf)
        if mode == "all_gather":
            work = _all_gather_flat(cr, cs, group=group, async_op=True)
        else:
            rows = list(cr.view(world, -1).unbind(0)) if me == dst_rank else None
            work = dist.gather(cs, rows, dst=dst_rank, group=group, async_op=True)
        return work, rbuf, used

    def unpack_bucket(k, rbuf, used, stage=None):
        """Unpacks bucket k (whole parameters into ``stage`` when given); returns
        the (destination, staged) copies still to make."""
        entries = buckets[k]
        gathered = rbuf.view(world, used)
        if to_host_pageable:
            gathered = gathered.cpu()
        outs = [e.item.dst for e in entries]
        # [first destination, its storage offset, its address, stage position, length, end of its storage]
        runs = []
        if stage is not None:
            pos = 0
            esize = stage.element_size()
            for j, e in enumerate(entries):
                if e.begin == 0 and e.count == e.item.snumel:  # the whole parameter is here
                    d, n = outs[j], e.item.numel
                    run = runs[-1] if runs else None
                    ptr = d.data_ptr()
                    if (run is not None and run[3] + run[4] == pos and ptr == run[2] + run[4] * esize
                            and ptr + n * esize <= run[5]):
                        run[4] += n  # right after the previous one, in its storage: one copy for both
                    else:
                        st = d.untyped_storage()
                        runs.append([d, d.storage_offset(), ptr, pos, n, st.data_ptr() + st.nbytes()])
                    outs[j] = _flat_range(stage, pos, n)  # the kernel needs only the element count
                    pos += n
        unpad_lists(
            gathered,
            outs,
            [e.offset for e in entries],
            [e.item.snumel for e in entries],
            [e.begin for e in entries],
            [e.count for e in entries],
        )
        return [(_flat_range(d, off, n), _flat_range(stage, pos, n)) for d, off, _, pos, n, _ in runs]

    pending = start(0)
    with torch.no_grad():
        for k in _progress(range(n_buckets), n_buckets, desc, show):
            work, rbuf, used = pending
            work.wait()
            if staging:
                i = k % len(stages)
                if copied[i] is not None:  # stages[i] is free once bucket k - 2 is copied out
                    torch.cuda.current_stream(device).wait_event(copied[i])
                copies = unpack_bucket(k, rbuf, used, stages[i])
                unpacked = torch.cuda.current_stream(device).record_event() if copy_stream is not None else None
                # the next collective reuses the one gathered buffer: enqueued
                # after the unpack, it runs during the copies below
                pending = start(k + 1) if k + 1 < n_buckets else None
                if copy_stream is None:  # CPU: in order, now
                    for dst, view in copies:
                        dst.copy_(view)
                    continue
                copy_stream.wait_event(unpacked)
                with torch.cuda.stream(copy_stream):
                    for dst, view in copies:
                        dst.copy_(view, non_blocking=True)
                copied[i] = copy_stream.record_event()
                if pending is None:
                    copy_stream.synchronize()
            else:
                # The next bucket's collective runs while this one is unpacked.
                pending = start(k + 1) if k + 1 < n_buckets else None
                if unpack:
                    unpack_bucket(k, rbuf, used)
            if pending is None and device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()


def _check_dst(fn: str, name: str, shape, dtype, pinned_state_dict) -> Optional[str]:
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


def _run_grouped(fn, items_by_group, *, bucket_bytes, collective, progress, staging=None):
    if staging is not None and not isinstance(staging, bool):
        raise TypeError(f"{fn}: staging must be None or a bool, got {type(staging).__name__}")
    show = _show_progress(progress)
    for (group, _dtype), items in items_by_group.items():
        _gather_items(items, group, bucket_bytes=bucket_bytes, collective=collective, desc=fn, show=show, fn=fn,
                      staging=staging)


def model_gathering(
    model: torch.nn.Module,
    model_shape_dict: dict,
    pinned_state_dict: dict,
    *,
    bucket_bytes: Optional[int] = None,
    collective: str = "auto",
    progress: Optional[bool] = None,
    staging: Optional[bool] = None,
) -> None:
    """Gather the parameters of a model sharded by ``model_sharding`` into
    ``pinned_state_dict`` on rank 0 (every parameter at its recorded shape, and
    the buffers copied as they are); all ranks must call it.

    Keyword extras: ``bucket_bytes`` (gathered bytes per collective, default
    256 MiB), ``collective`` ("auto": gather on gloo, all_gather_into_tensor
    otherwise), ``progress`` (tqdm on rank 0; default when stderr is a TTY),
    ``staging`` (True: unpack each whole parameter into a device buffer laid
    out as its destination, then copy it there with the copy engine, one copy
    per run of destinations that lie side by side, on a side stream while the
    next bucket is unpacked (buckets then shrink so that rank 0's gathered and
    two staging buffers stay within two buckets); False: the
    unpack kernel stores into pinned memory directly; None, the default:
    staging when the destinations lie side by side in a few pinned buffers
    (at least 16 tensors a run on average), as CheckpointIO's do, and the shards are on a GPU. Same results either way;
    see benchmarks/RESULTS.md for the measured rates).
    Bad input (a shape dict that does not match the sharded model, a pinned dict
    missing a key or with a wrong shape or dtype) raises on every rank before
    anything is written."""
    fn = "model_gathering"
    world = dist.get_world_size()
    rank = dist.get_rank()
    groups: Dict[tuple, List[_Item]] = {}
    problem = None
    names = set()
    world_group = dist.group.WORLD
    # Per-parameter host time counts here (an 11B model has ~1100 parameters and
    # the first collective waits for this loop): one lookup of each thing.
    for name, param in model.named_parameters():
        names.add(name)
        if problem is not None:
            continue
        if name not in model_shape_dict:
            problem = f"{fn}: model_shape_dict has no entry for parameter {name!r}"
            continue
        shape = tuple(model_shape_dict[name])
        n = _numel(shape)
        want = -(-n // world)
        if param.dim() != 1 or param.numel() != want:
            problem = (
                f"{fn}: parameter {name!r} has a local shard of shape {list(param.shape)}, but shape "
                f"{list(shape)} sharded over {world} ranks gives [{want}] (model_shape_dict does not match "
                "the model, or the model is not sharded by model_sharding)"
            )
            continue
        dtype = param.dtype
        dst = None
        if rank == 0:
            problem = _check_dst(fn, name, shape, dtype, pinned_state_dict)
            if problem is not None:
                continue
            dst = pinned_state_dict[name]
        groups.setdefault((world_group, dtype), []).append(_Item(name, param, n, dst))
    buffers = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in names}
    if problem is None and rank == 0:
        for k, v in buffers.items():
            problem = _check_dst(fn, k, v.shape, v.dtype, pinned_state_dict)
            if problem:
                break
    values = {}
    if problem is None:
        problem, values = _gather_options(fn, groups, bucket_bytes, collective, staging)
    _agree_ranks(fn, problem, values=values)
    _run_grouped(fn, groups, bucket_bytes=bucket_bytes, collective=collective, progress=progress, staging=staging)
    if rank == 0:
        with torch.no_grad():
            for k, v in buffers.items():
                pinned_state_dict[k].copy_(v)
    dist.barrier()


def master_weights_gathering(
    model: torch.nn.Module,
    optimizer,
    pinned_state_dict: dict,
    *,
    bucket_bytes: Optional[int] = None,
    collective: str = "auto",
    progress: Optional[bool] = None,
    staging: Optional[bool] = None,
) -> None:
    """Gather the fp32 master weights of a ZeRO optimizer into
    ``pinned_state_dict`` on rank 0, each at its working parameter's shape.
    ``optimizer`` needs ``get_working_to_master_map()`` (id(param) -> 1-D master
    shard) and ``param_to_pg`` (param -> its process group), as ColossalAI's
    LowLevelZeroOptimizer has; every rank must call it. Keyword extras as in
    :func:`model_gathering`."""
    fn = "master_weights_gathering"
    rank = dist.get_rank()
    w2m = optimizer.get_working_to_master_map()
    groups: Dict[tuple, List[_Item]] = {}
    problem = None
    for name, param in model.named_parameters():
        master = w2m.get(id(param)) if hasattr(w2m, "get") else w2m[id(param)]
        if master is None:
            problem = problem or f"{fn}: the optimizer has no master weight for parameter {name!r}"
            continue
        pg = optimizer.param_to_pg[param]
        world = dist.get_world_size(pg)
        n = param.numel()
        if problem is None and (master.dim() != 1 or master.numel() * world < n):
            problem = (
                f"{fn}: the master weight of {name!r} has shape {list(master.shape)}; {world} shards of it "
                f"cannot hold the {n} elements of shape {list(param.shape)}"
            )
        if problem is None and rank == 0:
            problem = _check_dst(fn, name, param.shape, master.dtype, pinned_state_dict)
        if problem is None:
            dst = pinned_state_dict[name] if rank == 0 else None
            groups.setdefault((pg, master.dtype), []).append(_Item(name, master, n, dst))
    values = {}
    if problem is None:
        problem, values = _gather_options(fn, groups, bucket_bytes, collective, staging)
    _agree_ranks(fn, problem, values=values)
    _run_grouped(fn, groups, bucket_bytes=bucket_bytes, collective=collective, progress=progress, staging=staging)
    dist.barrier()


def load_master_weights(model: torch.nn.Module, optimizer, state_dict: dict, group=None) -> None:
    """Write this rank's shard of each full fp32 weight in ``state_dict`` into
    the optimizer's master weights (the inverse of master_weights_gathering).
    ``group``: the ZeRO data-parallel group (default: the registered
    data-parallel group, as upstream's ``get_data_parallel_group(get_mixed_dp_pg=True)``)."""
    if group is None:
        from .misc import get_data_parallel_group

        group = get_data_parallel_group()
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    w2m = optimizer.get_working_to_master_map()
    with torch.no_grad():
        for name, param in model.named_parameters():
            master = w2m[id(param)]
            if name not in state_dict:
                raise KeyError(f"load_master_weights: the state dict has no entry {name!r}")
            state = state_dict[name].reshape(-1)
            s = master.numel()
            if s * world < state.numel():
                raise ValueError(
                    f"load_master_weights: {name!r} has {state.numel()} elements; {world} master shards of {s} "
                    "cannot hold them"
                )
            lo = min(rank * s, state.numel())
            k = min(s, state.numel() - lo)
            master[:k].copy_(state[lo : lo + k].to(master.dtype))
            master[k:].zero_()  # upstream pads the state with zeros


# ----------------------------------------------------------------- safetensors writer

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def _write_safetensors(path: str, tensors: Dict[str, torch.Tensor], show: bool = False) -> str:
    """Writes ``tensors`` (CPU, contiguous) as a safetensors file, streaming
    each tensor's bytes from its buffer (no serialised copy), then fsyncs.
    Returns the file's checksum, computed from the bytes as they are written."""
    names = sorted(tensors)
    header, pos = {}, 0
    for k in names:
        t = tensors[k]
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"safetensors cannot store {k!r} of dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    with open(path, "wb") as raw:
        f = _ckpt_files.ChecksumWriter(raw)
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k in _progress(names, len(names), os.path.basename(path), show):
            t = tensors[k]
            if t.numel():
                f.write(memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()))
            _phase("tensor")
        f.flush()
        _phase("flushed")
        os.fsync(raw.fileno())
    _phase("fsynced")
    return f.checksum()


def _tensornvme_save():
    """``colossalai.utils.safetensors.save`` (which writes through tensornvme's
    AsyncFileWriter and returns it) when colossalai and tensornvme both import,
    else None."""
    try:
        import tensornvme.async_file_io  # noqa: F401  (save needs it; the PyPI tensornvme lacks it)
        from colossalai.utils.safetensors import save
    except Exception:  # ImportError, or an install that fails at import
        return None
    return save


def _write_file(path: str, tensors: Dict[str, torch.Tensor], show: bool, save=None) -> str:
    """One checkpoint file: through ``save`` (:func:`_tensornvme_save`'s) when
    given (its checksum then read back), else our writer. Returns the checksum."""
    if save is None:
        return _write_safetensors(path, tensors, show)
    writer = save(path, tensors)
    if writer is not None:  # upstream's contract: an AsyncFileWriter to synchronize()
        writer.synchronize()
    _phase("flushed")
    _fsync(path)
    _phase("fsynced")
    return _ckpt_files.file_checksum(path)


class _Job:
    """One checkpoint's rank-0 file work: write the files, fsync and checksum
    every file in the temporary directory (``sums``: those already written,
    relative path -> checksum), running_states.json (with the checksums) last,
    fsync, rename the temporary directory to its final name. A failure is
    kept for :meth:`wait`; one nobody waits for is reported at exit
    (:mod:`._ckpt_exit`)."""

    def __init__(self, tmp_dir, final_dir, files, running_states, show, sums=None):
        self.tmp_dir, self.final_dir = tmp_dir, final_dir
        self.files, self.running_states, self.show = files, running_states, show
        self.sums: Dict[str, str] = dict(sums or {})
        self.error: Optional[BaseException] = None
        self.thread: Optional[threading.Thread] = None

    def run(self):
        try:
            save = _tensornvme_save()  # looked up once per checkpoint
            for path, tensors in self.files:
                self.sums[path] = _write_file(os.path.join(self.tmp_dir, path), tensors, self.show, save)
            _ckpt_files.sync_tree(self.tmp_dir, self.sums)  # the Booster's and other ranks' files
            states = dict(self.running_states, checksums=dict(sorted(self.sums.items())))
            save_json(states, os.path.join(self.tmp_dir, _COMPLETE))
            _phase("states")
            _fsync(self.tmp_dir)
            _phase("dir-fsynced")
            os.rename(self.tmp_dir, self.final_dir)
            _phase("renamed")
            _fsync(os.path.dirname(self.final_dir) or ".")
            _phase("done")
        except BaseException as e:  # reported by wait(), or at exit
            self.error = e
            if os.path.isdir(self.tmp_dir):  # not renamed: free the space (a full disk, most likely)
                shutil.rmtree(self.tmp_dir, ignore_errors=True)
        else:
            _ckpt_exit.untrack(self)

    def start(self):
        _ckpt_exit.track(self)
        self.thread = threading.Thread(target=self.run, name="opensora_fast-ckpt-writer", daemon=False)
        self.thread.start()

    def join(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def failure_message(self) -> str:
        return f"CheckpointIO: writing {self.final_dir} failed: {type(self.error).__name__}: {self.error}"

    def wait(self):
        self.join()
        if self.error is not None:
            e, msg = self.error, self.failure_message()
            self.error = None
            _ckpt_exit.untrack(self)
            raise RuntimeError(f"{msg} (the checkpoint was not written; the previous ones are intact)") from e


def _is_complete(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, _COMPLETE))


def _partial_name(final_dir: str) -> str:
    parent, base = os.path.split(final_dir)
    return os.path.join(parent, f".{base}.partial")


def _search_valid_path(path: str) -> str:
    if os.path.exists(f"{path}.safetensors"):
        return f"{path}.safetensors"
    if os.path.exists(f"{path}.pt"):
        return f"{path}.pt"
    return path


def _torch_load(path: str, map_location="cpu", weights_only: bool = True):
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if not weights_only:
            raise
        raise pickle.UnpicklingError(
            f"{path}: refused by weights_only loading (it holds objects other than tensors and plain "
            f"containers, which unpickling would run as code). Pass weights_only=False only for a file you "
            f"trust. Detail: {str(e).splitlines()[0]}"
        ) from e


def _load_safetensors(path: str, device: str = "cpu") -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupted?): {e}") from e


def _needs_colossalai(what: str):
    try:
        import colossalai  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{what} needs colossalai: pip install opensora_fast[colossalai]") from e


def _check_target(fn: str, final: str) -> None:
    """A checkpoint is never overwritten, nor saved over a stray directory."""
    if not os.path.exists(final):
        return
    if _is_complete(final):
        try:
            held = load_json(os.path.join(final, _COMPLETE))
        except Exception:
            held = {}
        raise FileExistsError(
            f"{fn}: {final} already holds a complete checkpoint (step {held.get('step')}, "
            f"global_step {held.get('global_step')}); refusing to overwrite it"
        )
    raise FileExistsError(f"{fn}: {final} exists but is not a complete checkpoint (no {_COMPLETE}); remove it first")


def _save_plain_parts(tmp: str, model, optimizer, lr_scheduler) -> Dict[str, str]:
    """Rank 0 without a Booster: the model as safetensors, the optimizer and
    lr scheduler states with torch.save; each fsynced. Returns their checksums."""
    sums: Dict[str, str] = {}
    if model is not None:
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        sums["model.safetensors"] = _write_safetensors(os.path.join(tmp, "model.safetensors"), sd)
    if optimizer is not None:
        sums["optimizer.pt"] = _ckpt_files.torch_save_synced(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    if lr_scheduler is not None:
        sums["lr_scheduler.pt"] = _ckpt_files.torch_save_synced(
            lr_scheduler.state_dict(), os.path.join(tmp, "lr_scheduler.pt"))
    return sums


def _save_booster_parts(booster, tmp: str, model, optimizer, lr_scheduler, lora: bool) -> None:
    """Every rank: the Booster's (sharded) model, LoRA, optimizer and lr
    scheduler, written synchronously inside the temporary directory (fsynced
    and checksummed by the writer job before the rename)."""
    if model is not None:
        sub = os.path.join(tmp, "lora" if lora else "model")
        os.makedirs(sub, exist_ok=True)
        if lora:
            booster.save_lora_as_pretrained(model, sub)
        else:
            booster.save_model(model, sub, shard=True, use_safetensors=True, size_per_shard=4096)
    if optimizer is not None:
        booster.save_optimizer(optimizer, os.path.join(tmp, "optimizer"), shard=True, size_per_shard=4096)
    if lr_scheduler is not None:
        booster.save_lr_scheduler(lr_scheduler, os.path.join(tmp, "lr_scheduler"))


class CheckpointIO:
    """Open-Sora's CheckpointIO: ``save``/``load`` of model, EMA, optimizer,
    master weights, lr scheduler, sampler and running states, with the EMA and
    master weights written in the background and every checkpoint crash-safe
    (see the module doc). ``booster`` may be None (plain torch state dicts)."""

    def __init__(self, n_write_entries: int = 32, *, bucket_bytes: Optional[int] = None, progress: Optional[bool] = None):
        self.n_write_entries = n_write_entries
        self.bucket_bytes = bucket_bytes
        self.progress = progress
        self.writer: Optional[_Job] = None
        self.master_writer = None  # kept for upstream's attribute; one job writes both files
        self.pinned_state_dict: Optional[Dict[str, torch.Tensor]] = None
        self.master_pinned_state_dict: Optional[Dict[str, torch.Tensor]] = None

    def _sync_io(self):
        """Waits until the previous save's files are written and renamed;
        raises RuntimeError if that write failed (once: the failure is then
        reported)."""
        job, self.writer = self.writer, None
        if job is not None:
            job.wait()

    def close(self) -> None:
        """Waits for the last background write, raising its failure (as
        :meth:`_sync_io`). Call it before a script ends."""
        self._sync_io()

    def __del__(self):
        try:
            self._sync_io()
        except Exception as e:  # nobody to raise to: logged, and the exit status will say so
            _ckpt_exit.swallowed(f"{e} (found when the CheckpointIO was dropped)")

    @staticmethod
    def _pinned_dict(entries) -> Dict[str, torch.Tensor]:
        """Host buffers for ``entries`` (name, shape, dtype): views side by side
        in pinned segments (when CUDA is there) of up to ``PIN_SEGMENT_BYTES``
        per dtype, in order, so a gathered bucket reaches them in one or two
        copy-engine transfers and pinning is paid per segment, not per tensor.
        Segments, not one buffer: torch's pinned allocator rounds every
        allocation up to a power of two, so one 22 GB buffer would pin 32 GB;
        1 GiB segments waste at most the unused tail of each."""
        pin = torch.cuda.is_available()
        entries = [(k, tuple(int(d) for d in shape), dt) for k, shape, dt in entries]
        views = _side_by_side_views(((_numel(shape), dt) for _, shape, dt in entries),
                                    lambda n, dt: torch.empty(n, dtype=dt, device="cpu", pin_memory=pin),
                                    PIN_SEGMENT_BYTES)
        return {k: v.view(shape) for (k, shape, _), v in zip(entries, views)}

    def _prepare_pinned_state_dict(self, ema: nn.Module, ema_shape_dict: dict):
        """Rank 0: host buffers for the EMA, reused while they still fit it."""
        if _rank() == 0:
            entries = _ckpt_state.ema_entries("CheckpointIO.save", ema, ema_shape_dict)
            if not _ckpt_state.fits(self.pinned_state_dict, entries):
                self.pinned_state_dict = None  # the old buffers go before the new ones are pinned
                self.pinned_state_dict = self._pinned_dict(entries)

    def _prepare_master_pinned_state_dict(self, model: nn.Module, optimizer):
        """Rank 0: host buffers for the master weights, reused while they fit."""
        if _rank() == 0:
            entries = _ckpt_state.master_entries(model, optimizer)
            if not _ckpt_state.fits(self.master_pinned_state_dict, entries):
                self.master_pinned_state_dict = None
                self.master_pinned_state_dict = self._pinned_dict(entries)

    def save(
        self,
        booster,
        save_dir: str,
        model: nn.Module = None,
        ema: nn.Module = None,
        optimizer=None,
        lr_scheduler=None,
        sampler=None,
        epoch: int = None,
        step: int = None,
        global_step: int = None,
        batch_size: int = None,
        lora: bool = False,
        actual_update_step: int = None,
        ema_shape_dict: dict = None,
        async_io: bool = True,
        include_master_weights: bool = False,
    ) -> str:
        """Save a checkpoint to ``save_dir/epoch{epoch}-global_step{actual_update_step}``
        and return that path. Every rank must call it. Returns once the EMA and
        master weights are in pinned host memory; with ``async_io`` the files are
        written (and the directory appears under its final name) in the
        background — ``_sync_io()`` waits; the next save waits too, and raises
        if that write failed. A failure on any rank raises on every rank."""
        fn = "CheckpointIO.save"
        rank = _rank()
        made: List[str] = []  # rank 0: the temporary directory, once made (removed if the save fails)
        failure = final = tmp = states = None
        sums: Dict[str, str] = {}
        # 1. local work: checks, rank 0's plain files and host buffers
        try:
            self._sync_io()
            states = _ckpt_state.check_counters(fn, epoch=epoch, step=step, global_step=global_step,
                                                batch_size=batch_size, actual_update_step=actual_update_step)
            final = os.path.join(save_dir, f"epoch{states['epoch']}-global_step{states['actual_update_step']}")
            tmp = _partial_name(final)
            _check_target(fn, final)
            if ema is not None and ema_shape_dict is None:
                raise ValueError(f"{fn}: ema_shape_dict is required with ema (record_model_param_shape)")
            if model is not None and booster is None and lora:
                _needs_colossalai("CheckpointIO.save(lora=True)")
            if rank == 0:
                if os.path.exists(tmp):
                    shutil.rmtree(tmp)  # left by a save that was killed
                os.makedirs(tmp)
                made.append(tmp)
                _phase("mkdir")
                if booster is None:
                    sums = _save_plain_parts(tmp, model, optimizer, lr_scheduler)
                if sampler is not None:  # only for VariableVideoBatchSampler
                    sums["sampler"] = _ckpt_files.torch_save_synced(sampler.state_dict(step),
                                                                    os.path.join(tmp, "sampler"))
                if ema is not None:
                    self._prepare_pinned_state_dict(ema, ema_shape_dict)
                if optimizer is not None and include_master_weights:
                    self._prepare_master_pinned_state_dict(model, optimizer)
        except Exception as e:
            failure = e
        self._agree(fn, failure, made)
        # 2. the collectives: the Booster's parts, the gathers
        try:
            if booster is not None:
                _save_booster_parts(booster, tmp, model, optimizer, lr_scheduler, lora)
            if optimizer is not None and include_master_weights:
                master_weights_gathering(model, optimizer, self.master_pinned_state_dict,
                                         bucket_bytes=self.bucket_bytes, progress=self.progress)
            if ema is not None:
                if _dist_on():
                    model_gathering(
                        ema, ema_shape_dict, self.pinned_state_dict, bucket_bytes=self.bucket_bytes,
                        progress=self.progress,
                    )
                else:  # one process: the EMA is whole (model_sharding needs a process group)
                    _ckpt_state.copy_whole_ema(fn, ema, self.pinned_state_dict)
        except Exception as e:
            failure = e
        self._agree(fn, failure, made)
        # 3. rank 0 writes the rest (in the background with async_io) and renames
        try:
            if rank == 0:
                files = []
                if ema is not None:
                    files.append(("ema.safetensors", self.pinned_state_dict))
                if optimizer is not None and include_master_weights:
                    files.append(("master.safetensors", self.master_pinned_state_dict))
                job = _Job(tmp, final, files, states, _show_progress(self.progress), sums)
                self.writer = job
                if async_io:
                    job.start()
                else:
                    job.run()
                    self._sync_io()
        except Exception as e:
            failure = e
        self._agree(fn, failure, made if not async_io else [])
        return final

    @staticmethod
    def _agree(fn: str, failure: Optional[BaseException], made: List[str]) -> None:
        """Raises on every rank when any rank failed; rank 0 then removes the
        temporary directory it made."""
        try:
            _agree_exception(fn, failure)
        except BaseException:
            for d in made:
                shutil.rmtree(d, ignore_errors=True)
            raise

    def load(
        self,
        booster,
        load_dir: str,
        model: nn.Module = None,
        ema: nn.Module = None,
        optimizer=None,
        lr_scheduler=None,
        sampler=None,
        strict: bool = False,
        include_master_weights: bool = False,
        *,
        verify: bool = True,
    ) -> tuple:
        """Load a complete checkpoint; returns ``(epoch, step)``. A directory
        without running_states.json (a save cut short) is refused. With
        ``verify`` (the default) every file to be read is first checked
        against the checksum recorded at save time (a checkpoint written
        before checksums, or by upstream, has none to check): a damaged file
        is a ValueError naming it, raised before anything is loaded. A
        failure on any rank raises on every rank."""
        fn = "CheckpointIO.load"
        failure = running_states = None
        try:
            running_states = self._open_checkpoint(load_dir)
            if verify:
                parts = _parts_read(model, ema, optimizer, lr_scheduler, sampler, include_master_weights)
                _ckpt_files.verify(fn, load_dir, running_states.get("checksums"), parts)
        except Exception as e:
            failure = e
        _agree_exception(fn, failure)
        try:
            self._load_parts(booster, load_dir, model, ema, optimizer, lr_scheduler, sampler, strict,
                             include_master_weights)
        except Exception as e:
            failure = e
        _agree_exception(fn, failure)
        return (running_states["epoch"], running_states["step"])

    @staticmethod
    def _open_checkpoint(load_dir: str) -> dict:
        """The running states of a complete checkpoint (refuses anything else)."""
        if not os.path.isdir(load_dir):
            raise FileNotFoundError(f"CheckpointIO.load: checkpoint directory {load_dir} does not exist")
        base = os.path.basename(os.path.normpath(load_dir))
        if not os.path.isfile(os.path.join(load_dir, _COMPLETE)) or (base.startswith(".") and base.endswith(".partial")):
            raise FileNotFoundError(
                f"CheckpointIO.load: {load_dir} is not a complete checkpoint (no {_COMPLETE}: its save did not "
                "finish)"
            )
        running_states = load_json(os.path.join(load_dir, _COMPLETE))
        if not isinstance(running_states, dict):
            raise ValueError(f"CheckpointIO.load: {os.path.join(load_dir, _COMPLETE)} is not a JSON object")
        return running_states

    @staticmethod
    def _load_parts(booster, load_dir, model, ema, optimizer, lr_scheduler, sampler, strict, include_master_weights):
        if model is not None:
            plain = os.path.join(load_dir, "model.safetensors")
            if booster is None or os.path.isfile(plain):
                if not os.path.isfile(plain):
                    _needs_colossalai(f"loading the sharded model in {load_dir}")
                missing, unexpected = model.load_state_dict(_load_safetensors(plain), strict=strict)
                print_load_warning(missing, unexpected)
            else:
                booster.load_model(
                    model, _search_valid_path(os.path.join(load_dir, "model")), strict=strict,
                    low_cpu_mem_mode=False, num_threads=32,
                )
        if ema is not None:
            st = os.path.join(load_dir, "ema.safetensors")
            if os.path.exists(st):
                ema_state_dict = _load_safetensors(st)
            else:
                ema_state_dict = _torch_load(os.path.join(load_dir, "ema.pt"))
            ema.load_state_dict(ema_state_dict, strict=strict, assign=True)
        if optimizer is not None:
            plain = os.path.join(load_dir, "optimizer.pt")
            if booster is None or os.path.isfile(plain):
                if not os.path.isfile(plain):
                    _needs_colossalai(f"loading the sharded optimizer in {load_dir}")
                optimizer.load_state_dict(_torch_load(plain))
            else:
                booster.load_optimizer(optimizer, os.path.join(load_dir, "optimizer"), low_cpu_mem_mode=False, num_threads=32)
            if include_master_weights:
                master = _load_safetensors(os.path.join(load_dir, "master.safetensors"))
                load_master_weights(model, optimizer, master)
        if lr_scheduler is not None:
            plain = os.path.join(load_dir, "lr_scheduler.pt")
            if booster is None or os.path.isfile(plain):
                lr_scheduler.load_state_dict(_torch_load(plain))
            else:
                booster.load_lr_scheduler(lr_scheduler, os.path.join(load_dir, "lr_scheduler"))
        if sampler is not None:
            sampler.load_state_dict(_torch_load(os.path.join(load_dir, "sampler")))


def _parts_read(model, ema, optimizer, lr_scheduler, sampler, include_master_weights) -> List[str]:
    """The checkpoint files (or folders) a load with these arguments reads."""
    parts: List[str] = []
    if model is not None:
        parts += ["model.safetensors", "model.pt", "model"]
    if ema is not None:
        parts += ["ema.safetensors", "ema.pt"]
    if optimizer is not None:
        parts += ["optimizer.pt", "optimizer"] + (["master.safetensors"] if include_master_weights else [])
    if lr_scheduler is not None:
        parts += ["lr_scheduler.pt", "lr_scheduler"]
    if sampler is not None:
        parts.append("sampler")
    return parts


# ----------------------------------------------------------------- loading


def load_from_hf_hub(repo_path: str, cache_dir: str = None) -> str:
    """Download (or find in the cache) ``org/repo/file`` from the Hugging Face
    Hub; returns the local path. Honours HF_HUB_OFFLINE and HF_ENDPOINT."""
    from huggingface_hub import hf_hub_download

    repo_id, _, repo_file = repo_path.rpartition("/")
    if not repo_id or "/" not in repo_id:
        raise ValueError(f"load_from_hf_hub: expected 'org/repo/file', got {repo_path!r}")
    return hf_hub_download(repo_id=repo_id, filename=repo_file, cache_dir=cache_dir)


def load_from_sharded_state_dict(model: nn.Module, ckpt_path: str, model_name: str = "model", strict=False):
    """Load a ColossalAI sharded checkpoint directory (needs colossalai)."""
    _needs_colossalai("load_from_sharded_state_dict")
    from colossalai.checkpoint_io import GeneralCheckpointIO

    GeneralCheckpointIO().load_model(model, os.path.join(ckpt_path, model_name), strict=strict)


def print_load_warning(missing: list, unexpected: list) -> None:
    """Log the missing and unexpected keys of a load_state_dict."""
    if len(missing) > 0 and len(unexpected) > 0:
        log_message(f"Got {len(missing)} missing keys:\n\t" + "\n\t".join(missing))
        log_message("\n" + "-" * 79 + "\n")
        log_message(f"Got {len(unexpected)} unexpected keys:\n\t" + "\n\t".join(unexpected))
    elif len(missing) > 0:
        log_message(f"Got {len(missing)} missing keys:\n\t" + "\n\t".join(missing))
    elif len(unexpected) > 0:
        log_message(f"Got {len(unexpected)} unexpected keys:\n\t" + "\n\t".join(unexpected))
    else:
        log_message("Model loaded successfully")


def _rename(ckpt: dict, rename_keys: Optional[dict]) -> dict:
    """Upstream's rule: the first old key of ``rename_keys`` found anywhere in
    a checkpoint key (not only at its start) is replaced, every occurrence."""
    if rename_keys is None:
        return ckpt
    out = {}
    for old_key, v in ckpt.items():
        new_key = old_key
        for old_prefix, new_prefix in rename_keys.items():
            if old_prefix in old_key:
                new_key = old_key.replace(old_prefix, new_prefix)
                log_message(f"Renamed {old_key} to {new_key} in the loaded state_dict")
                break
        out[new_key] = v
    return out


def load_checkpoint(
    model: nn.Module,
    path: str,
    cache_dir: str = None,
    device_map: torch.device | str = "cpu",
    cai_model_name: str = "model",
    strict: bool = False,
    rename_keys: dict = None,
    *,
    weights_only: bool = True,
) -> nn.Module:
    """Load a checkpoint into ``model``: a ``.safetensors`` file, a ``.pt``/``.pth``
    file (``weights_only=True`` by default: a pickle that would run code is
    refused; pass ``weights_only=False`` only for a trusted legacy file), a
    ColossalAI sharded directory (needs colossalai), or, when ``path`` does not
    exist locally, ``org/repo/file`` on the Hugging Face Hub. ``rename_keys``
    maps old key substrings to new ones (both file formats)."""
    if not os.path.exists(path):
        log_message(f"Checkpoint not found at {path}, trying to download from Hugging Face Hub")
        path = load_from_hf_hub(path, cache_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_checkpoint: could not find checkpoint at {path}")
    log_message(f"Loading checkpoint from {path}")
    if path.endswith(".safetensors"):
        ckpt = _rename(_load_safetensors(path), rename_keys)
        missing, unexpected = model.load_state_dict(ckpt, strict=strict)
        print_load_warning(missing, unexpected)
    elif path.endswith(".pt") or path.endswith(".pth"):
        ckpt = _rename(_torch_load(path, map_location=device_map, weights_only=weights_only), rename_keys)
        missing, unexpected = model.load_state_dict(ckpt, strict=strict)
        print_load_warning(missing, unexpected)
    else:
        if not os.path.isdir(path):
            raise ValueError(f"load_checkpoint: invalid checkpoint path {path} (not .safetensors, .pt, .pth or a directory)")
        load_from_sharded_state_dict(model, path, model_name=cai_model_name, strict=strict)
    return model


def rm_checkpoints(save_dir: str, keep_n_latest: int = 0):
    """Keep the ``keep_n_latest`` newest complete checkpoints in ``save_dir``
    (by epoch, then step, as numbers); empty the older ones except their
    ``eval`` folder. Incomplete directories are neither counted nor touched.
    Rank 0 only. ``save_dir`` is listed, not globbed (upstream's glob read
    ``exp[12]`` as a pattern and emptied ``exp1``'s checkpoints)."""
    if keep_n_latest <= 0 or _rank() != 0:
        return
    found = []
    for name in os.listdir(save_dir):
        m = _CKPT_RE.fullmatch(name)
        f = os.path.join(save_dir, name)
        if m and _is_complete(f):
            found.append((tuple(map(int, m.groups())), f))
    found.sort(reverse=True)
    for _, f in found[keep_n_latest:]:
        # running_states.json first: from here on the directory is no checkpoint,
        # whenever the removal is cut short.
        os.remove(os.path.join(f, _COMPLETE))
        _fsync(f)
        for name in os.listdir(f):
            if name.startswith("."):  # upstream's glob("*") leaves hidden entries
                continue
            item = os.path.join(f, name)
            if os.path.isdir(item):
                if name != "eval":
                    shutil.rmtree(item)
            else:
                os.remove(item)
