"""The public gather-free checkpoint functions (the EMA as ``model_sharding``
left it; the fp32 master weights in each process group's own layout) and
their use by ``CheckpointIO.save/load(parallel=True)``: a probe of the
shared filesystem, the fallback to the gather path, the checksums. The file
work is :mod:`._ckpt_parallel`."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import _ckpt_dist
from ._ckpt_parallel import Part, group_rank, shared_dir, write_file
from ._ckpt_parallel_load import read_file
from ._ckpt_plan import numel
from .logger import log_message

EMA_FILE, MASTER_FILE = "ema.safetensors", "master.safetensors"


def _model_parts(fn: str, model: torch.nn.Module, shape_dict: Optional[dict], group) -> List[Part]:
    """The model's parameters as shards of ``group`` (world 1: whole tensors
    are accepted as their own shard) and its buffers, written by rank 0.
    ``shape_dict`` None: a load (the shapes come from the file)."""
    world, me = _ckpt_dist.world_size(group), group_rank(group)
    parts, names = [], set()
    for name, p in model.named_parameters():
        names.add(name)
        local = p.data
        if world == 1 and local.dim() != 1 and local.is_contiguous():
            local = local.view(-1)
        if shape_dict is not None:
            if name not in shape_dict:
                raise ValueError(f"{fn}: the shape dict has no entry for parameter {name!r}")
            shape = tuple(int(d) for d in shape_dict[name])
            want = -(-numel(shape) // world)
            if local.dim() != 1 or local.numel() != want:
                raise ValueError(
                    f"{fn}: parameter {name!r} has a local shard of shape {list(p.shape)}, but shape "
                    f"{list(shape)} sharded over {world} ranks gives [{want}] (the shape dict does not match "
                    "the model, or the model is not sharded by model_sharding)"
                )
        else:
            shape = ()
            if local.dim() != 1:
                raise ValueError(
                    f"{fn}: parameter {name!r} has shape {list(p.shape)}: not a 1-D shard (shard the model "
                    "with model_sharding before loading into it)"
                )
        parts.append(Part(name, shape, p.dtype, local, world, me, True))
    for k, v in model.state_dict(keep_vars=True).items():
        if k not in names:
            parts.append(Part(k, v.shape, v.dtype, v.data, 0, me, me == 0))
    return parts


def _master_parts(fn: str, model: torch.nn.Module, optimizer, group) -> List[Part]:
    """Each working parameter's master shard in its own process group's
    layout; the bytes are written by the members of the process group that
    holds the group's rank 0 (other groups hold replicas of the same bytes)."""
    w2m = optimizer.get_working_to_master_map()
    anchor = dist.get_global_rank(group, 0) if group is not None and _ckpt_dist.dist_on() else 0
    owns: Dict[int, bool] = {}
    parts = []
    for name, p in model.named_parameters():
        master = w2m.get(id(p)) if hasattr(w2m, "get") else w2m[id(p)]
        if master is None:
            raise ValueError(f"{fn}: the optimizer has no master weight for parameter {name!r}")
        pg = optimizer.param_to_pg[p]
        world = _ckpt_dist.world_size(pg)
        n = p.numel()
        if master.dim() != 1 or master.numel() * world < n:
            raise ValueError(
                f"{fn}: the master weight of {name!r} has shape {list(master.shape)}; {world} shards of it "
                f"cannot hold the {n} elements of shape {list(p.shape)}"
            )
        if id(pg) not in owns:
            owns[id(pg)] = world == 1 or anchor in dist.get_process_group_ranks(pg)
        rank = dist.get_rank(pg) if world > 1 else 0
        own = owns[id(pg)] and (world > 1 or _ckpt_dist.rank() == anchor)
        parts.append(Part(name, p.shape, master.dtype, master.data, world, rank, own, strict_shard=False))
    return parts


def _build(fn: str, make) -> Tuple[Optional[List[Part]], Optional[BaseException]]:
    try:
        return make(), None
    except Exception as e:
        return None, e


def save_sharded_as_consolidated(
    model: torch.nn.Module,
    shape_dict: dict,
    path: str,
    group=None,
    *,
    progress: Optional[bool] = None,
    staging_bytes: Optional[int] = None,
) -> str:
    """Write a model sharded by ``model_sharding`` over ``group`` (default:
    the world) as one consolidated safetensors file at ``path``, every rank
    writing its own shards' bytes in place (no gather); the same bytes as
    ``model_gathering`` then the gather path's writer. ``shape_dict``: every
    parameter's full shape (``record_model_param_shape`` before sharding);
    buffers are written by rank 0 as they are. Every rank of ``group`` must
    call it, and all must see ``path``'s directory (a shared filesystem:
    probed; otherwise a ValueError on every rank). ``staging_bytes``: the
    size of each of the two host staging buffers used for device shards
    (default 64 MiB; CPU shards are written from their memory). The file
    appears at ``path`` only complete (written as ``.<name>.partial``,
    fsynced, renamed); a failure on any rank raises on every rank and leaves
    the previous file at ``path`` as it was. Returns the file's checksum
    (``crc32:...``) on every rank."""
    fn = "save_sharded_as_consolidated"
    parts, failure = _build(fn, lambda: _model_parts(fn, model, shape_dict, group))
    return write_file(fn, parts, failure, path, group, progress=progress, staging_bytes=staging_bytes)


def load_sharded_from_consolidated(
    model: torch.nn.Module,
    path: str,
    group=None,
    *,
    checksum: Optional[str] = None,
    progress: Optional[bool] = None,
    staging_bytes: Optional[int] = None,
) -> Dict[str, torch.Size]:
    """Load a consolidated safetensors file (ours, the gather path's, or any
    with the model's names and dtypes) into a model already sharded by
    ``model_sharding`` over ``group``: each rank reads only the byte ranges
    of its own shards (and the buffers, which every rank keeps), straight
    into them; no rank holds a whole parameter. The header is checked
    against the model first (names, dtypes, shapes that shard to the local
    shards, a file long enough); ``checksum`` (as recorded in
    running_states.json): the ranks verify the whole file together before
    anything is loaded. Returns the file's shapes (a shape dict for the next
    save). A failure on any rank raises on every rank."""
    fn = "load_sharded_from_consolidated"
    parts, failure = _build(fn, lambda: _model_parts(fn, model, None, group))
    return read_file(fn, parts, failure, path, group, checksum=checksum, progress=progress, staging_bytes=staging_bytes)


def save_master_sharded_as_consolidated(
    model: torch.nn.Module,
    optimizer,
    path: str,
    group=None,
    *,
    progress: Optional[bool] = None,
    staging_bytes: Optional[int] = None,
) -> str:
    """The fp32 master weights (``optimizer.get_working_to_master_map()``,
    each sharded over ``optimizer.param_to_pg[param]``) as one consolidated
    file, each at its working parameter's shape: the bytes of
    ``master_weights_gathering`` then the gather path's writer. ``group``:
    the ranks that call it (default: the world). Otherwise as
    :func:`save_sharded_as_consolidated`."""
    fn = "save_master_sharded_as_consolidated"
    parts, failure = _build(fn, lambda: _master_parts(fn, model, optimizer, group))
    return write_file(fn, parts, failure, path, group, progress=progress, staging_bytes=staging_bytes)


def load_master_sharded_from_consolidated(
    model: torch.nn.Module,
    optimizer,
    path: str,
    group=None,
    *,
    checksum: Optional[str] = None,
    progress: Optional[bool] = None,
    staging_bytes: Optional[int] = None,
) -> None:
    """Each rank reads its own master shards (in its process group's
    layout) from a consolidated master file; the inverse of
    :func:`save_master_sharded_as_consolidated` (and of the gather path's
    ``master.safetensors``), as :func:`load_sharded_from_consolidated`."""
    fn = "load_master_sharded_from_consolidated"
    parts, failure = _build(fn, lambda: _master_parts(fn, model, optimizer, group))
    read_file(fn, parts, failure, path, group, checksum=checksum, progress=progress, staging_bytes=staging_bytes)


def use_parallel(fn: str, tmp_dir: str) -> bool:
    """CheckpointIO: whether every rank sees rank 0's temporary directory;
    if not, one log line and the gather path."""
    if shared_dir(fn, tmp_dir):
        return True
    if _ckpt_dist.rank() == 0:
        log_message(
            "%s(parallel=True): the ranks do not all see %s (no shared filesystem); using the gather path",
            fn,
            os.path.dirname(tmp_dir) or ".",
            level="warning",
        )
    return False


def save_files(tmp_dir: str, ema, ema_shape_dict, model, optimizer, masters: bool, progress) -> Dict[str, str]:
    """CheckpointIO.save(parallel=True): the EMA and master files written by
    every rank into the temporary directory; their checksums."""
    sums: Dict[str, str] = {}
    if masters:
        fn = "CheckpointIO.save"
        parts, failure = _build(fn, lambda: _master_parts(fn, model, optimizer, None))
        sums[MASTER_FILE] = write_file(
            fn,
            parts,
            failure,
            os.path.join(tmp_dir, MASTER_FILE),
            None,
            progress=progress,
            staging_bytes=None,
        )
    if ema is not None:
        fn = "CheckpointIO.save"
        parts, failure = _build(fn, lambda: _model_parts(fn, ema, ema_shape_dict, None))
        sums[EMA_FILE] = write_file(
            fn,
            parts,
            failure,
            os.path.join(tmp_dir, EMA_FILE),
            None,
            progress=progress,
            staging_bytes=None,
        )
    return sums


def load_files(load_dir: str, ema, model, optimizer, masters: bool, sums: Optional[dict], progress) -> None:
    """CheckpointIO.load(parallel=True): each rank reads its own shards of the
    EMA (sharded by model_sharding) and of the master weights; with ``sums``
    (the recorded checksums, when verifying) each file is verified first."""
    sums = sums if isinstance(sums, dict) else {}
    if ema is not None:
        load_sharded_from_consolidated(
            ema, os.path.join(load_dir, EMA_FILE), checksum=sums.get(EMA_FILE), progress=progress
        )
    if masters:
        load_master_sharded_from_consolidated(
            model, optimizer, os.path.join(load_dir, MASTER_FILE), checksum=sums.get(MASTER_FILE), progress=progress
        )
