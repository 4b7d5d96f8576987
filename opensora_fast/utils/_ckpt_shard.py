"""Upstream's sharding helpers: ``model_sharding``, the two gathers
(``model_gathering``, ``master_weights_gathering``) and their inverse
``load_master_weights``. Each gather checks its input on every rank, agrees
on success and options, then runs one bucketed gather per (process group,
dtype) (:mod:`._ckpt_gather`), or, in a group of one, copies shard prefixes.
What a gather derives (its items, checks and plans) is kept per model and
reused by the next gather of the same model into the same buffers after a
cheap check that nothing it was derived from changed (:class:`_Cached`)."""

from __future__ import annotations

import operator
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import _ckpt_dist
from ._ckpt_dist import agree as _agree_ranks
from ._ckpt_gather import LocalPlan, copy_local, gather_items
from ._ckpt_plan import (
    Item,
    ModuleSlots,
    check_dst,
    check_staging,
    gather_options,
    numel,
    same_objects,
    side_by_side_views,
    tensor_layout,
    weak_refs,
)

Groups = Dict[tuple, List[Item]]  # (process group, dtype) -> items


def remove_padding(tensor: torch.Tensor, original_shape: tuple) -> torch.Tensor:
    """Remove padding from a tensor: its first ``prod(original_shape)`` elements
    (1 for a 0-dim shape, where upstream raises TypeError)."""
    return tensor[: numel(original_shape)]


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
    views = side_by_side_views(
        zip(shards, (p.dtype for p in params)), lambda n, dt: torch.zeros(n, dtype=dt, device=device)
    )
    with torch.no_grad():
        for p, shard, view in zip(params, shards, views):
            mine = p.data.reshape(-1)[rank * shard : min((rank + 1) * shard, p.numel())]
            view[: mine.numel()].copy_(mine)
            p.data = view


def _run_grouped(
    fn: str, groups: Groups, *, bucket_bytes, collective, progress, staging=None, plans: Optional[dict] = None
) -> None:
    """One gather per (group, dtype); a group of one copies locally.
    ``plans``: each group's plan, kept there for the next call (the caller
    checked that the items did not change)."""
    check_staging(fn, staging)
    show = _ckpt_dist.show_progress(progress)
    for key, items in groups.items():
        cache = plans.setdefault(key, {}) if plans is not None else None
        if _ckpt_dist.world_size(key[0]) == 1:
            local = cache.get("local") if cache is not None else None
            if local is None:
                local = LocalPlan(items)
                if cache is not None:
                    cache["local"] = local
            copy_local(items, local)
        else:
            gather_items(
                items,
                group=key[0],
                bucket_bytes=bucket_bytes,
                collective=collective,
                desc=fn,
                show=show,
                fn=fn,
                staging=staging,
                cache=cache,
            )


_shard = operator.attrgetter("shard")
_shape = operator.attrgetter("shape")
_world_group = operator.attrgetter("WORLD")


class _Cached:
    """What one gather derived, kept for the next gather of the same model:
    its items by (group, dtype), the buffers to copy, each group's plan (under
    the options it was made with), and what they were derived from, checked
    before every reuse in C-level passes: the model's slots
    (:class:`ModuleSlots`), the process group, rank and world size, the
    caller's per-parameter inputs (shape dict entries; master shards' groups),
    each shard the same object (master shards held weakly), and on rank 0
    each destination the same object (held weakly, so buffers that their
    owner replaced are freed). Every tensor a plan reads is checked for its
    shape, dtype, device, address and contiguity (:func:`tensor_layout`).
    Anything changed: the gather derives everything afresh. Between calls the
    items hold no destination (nor master shard): they are attached for one
    call (:meth:`attach`) and dropped after it (:meth:`release`)."""

    __slots__ = (
        "slots",
        "dist",
        "inputs",
        "names",
        "params",
        "shard_refs",
        "layout",
        "dst_names",
        "dst_refs",
        "dst_layout",
        "groups",
        "items",
        "buffers",
        "options",
        "plans",
    )

    def __init__(self, model, inputs, groups: Groups, buffers: list, params: list, masters: bool, pinned) -> None:
        self.slots = ModuleSlots(model)
        self.dist = _dist_state()
        self.inputs = inputs
        self.groups = groups
        self.items = [it for items in groups.values() for it in items]
        self.names = [it.name for it in self.items]
        self.params = params  # the items' parameters, in the items' order
        self.buffers = buffers
        shards = list(map(_shard, self.items))
        self.shard_refs = weak_refs(shards) if masters else None
        self.layout = tensor_layout(shards + [v for _, v in buffers])
        self.dst_names = self.names + [k for k, _ in buffers]
        dsts = list(map(pinned.get, self.dst_names)) if _ckpt_dist.rank() == 0 else []
        self.dst_refs = weak_refs(dsts)
        self.dst_layout = tensor_layout(dsts)
        self.options = None
        self.plans: dict = {}

    def valid(self, model, inputs, shards: Optional[list], pinned) -> Optional[list]:
        """The current destinations (rank 0; [] elsewhere) when nothing the
        gather was derived from changed, else None. ``shards``: the master
        shards now, in the items' order (None: the parameters are the shards)."""
        if not (self.slots.unchanged(model) and _dist_state() == self.dist and inputs == self.inputs):
            return None
        if shards is None:
            shards = self.params
        elif not same_objects(shards, self.shard_refs):
            return None
        if tensor_layout(shards + [v for _, v in self.buffers]) != self.layout:
            return None
        if not self.dst_refs:
            return []
        if not isinstance(pinned, dict):
            return None
        dsts = list(map(pinned.get, self.dst_names))
        if not same_objects(dsts, self.dst_refs) or tensor_layout(dsts) != self.dst_layout:
            return None
        return dsts

    def attach(self, shards: Optional[list], dsts: list) -> None:
        """Points the items at this call's master shards and destinations."""
        if shards is not None:
            for it, shard in zip(self.items, shards):
                it.shard = shard
        for it, dst in zip(self.items, dsts):
            it.dst = dst

    def release(self) -> None:
        """Drops the items' destinations (and master shards) until the next call."""
        for it in self.items:
            it.dst = None
        if self.shard_refs is not None:
            for it in self.items:
                it.shard = None

    def plans_for(self, options: tuple) -> dict:
        """The groups' plans made with ``options`` (none yet under other options)."""
        if options != self.options:
            self.options, self.plans = options, {}
        return self.plans


def _dist_state() -> tuple:
    """The process group this process is in, its rank and size (None without one)."""
    if not _ckpt_dist.dist_on():
        return (None,)
    return (_world_group(dist.group), dist.get_rank(), dist.get_world_size())


_model_cache: "weakref.WeakKeyDictionary[torch.nn.Module, _Cached]" = weakref.WeakKeyDictionary()
_master_cache: "weakref.WeakKeyDictionary[torch.nn.Module, _Cached]" = weakref.WeakKeyDictionary()


def _model_items(
    fn: str, model: torch.nn.Module, model_shape_dict: dict, pinned_state_dict: dict, world: int, rank: int
) -> Tuple[Groups, set, Optional[str]]:
    """model_gathering's items by (group, dtype), the parameter names, and the
    first problem found (or None)."""
    groups: Groups = {}
    names = set()
    problem = None
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
        n = numel(shape)
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
            problem = check_dst(fn, name, shape, dtype, pinned_state_dict)
            if problem is not None:
                continue
            dst = pinned_state_dict[name]
        groups.setdefault((world_group, dtype), []).append(Item(name, param, n, dst))
    return groups, names, problem


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
    see benchmarks/RESULTS.md for the measured rates). At world size 1 no
    collective runs: each shard's prefix is copied into its destination.
    Bad input (a shape dict that does not match the sharded model, a pinned dict
    missing a key or with a wrong shape or dtype) raises on every rank before
    anything is written."""
    fn = "model_gathering"
    world, rank = _ckpt_dist.world_size(), _ckpt_dist.rank()
    cached = _model_cache.get(model)
    dsts = None
    if cached is not None:
        dsts = cached.valid(model, _recorded_shapes(model_shape_dict, cached.names), None, pinned_state_dict)
    if dsts is None:
        _model_cache.pop(model, None)  # derived afresh below
        cached = None
        groups, names, problem = _model_items(fn, model, model_shape_dict, pinned_state_dict, world, rank)
        buffers = [(k, v) for k, v in model.state_dict(keep_vars=True).items() if k not in names]
        if problem is None and rank == 0:
            for k, v in buffers:
                problem = check_dst(fn, k, v.shape, v.dtype, pinned_state_dict)
                if problem:
                    break
        if problem is None and ModuleSlots.usable(model):
            items = [it for its in groups.values() for it in its]
            shapes = _recorded_shapes(model_shape_dict, [it.name for it in items])
            cached = _Cached(model, shapes, groups, buffers, list(map(_shard, items)), False, pinned_state_dict)
            _model_cache[model] = cached
    else:
        groups, buffers, problem = cached.groups, cached.buffers, None
        cached.attach(None, dsts)
    try:
        values = {}
        if problem is None:
            problem, values = gather_options(fn, groups, bucket_bytes, collective, staging, _ckpt_dist.world_size)
        _agree_ranks(fn, problem, values=values)
        plans = cached.plans_for((bucket_bytes, collective, staging)) if cached is not None else None
        _run_grouped(
            fn,
            groups,
            bucket_bytes=bucket_bytes,
            collective=collective,
            progress=progress,
            staging=staging,
            plans=plans,
        )
        if rank == 0:
            with torch.no_grad():
                for k, v in buffers:
                    pinned_state_dict[k].copy_(v)
    finally:
        if cached is not None:
            cached.release()
    _ckpt_dist.barrier()


def _recorded_shapes(model_shape_dict, names: List[str]) -> Optional[list]:
    """``model_shape_dict``'s shapes of ``names`` as tuples (None where one is missing or not a shape)."""
    try:
        return list(map(tuple, map(model_shape_dict.__getitem__, names)))
    except (KeyError, TypeError, AttributeError):
        return None


def _master_items(
    fn: str, model: torch.nn.Module, optimizer, pinned_state_dict: dict, rank: int
) -> Tuple[Groups, Dict[int, torch.nn.Parameter], Optional[str]]:
    """master_weights_gathering's items by (group, dtype), each item's
    parameter (by the item's id) and the first problem (or None)."""
    w2m = optimizer.get_working_to_master_map()
    groups: Groups = {}
    param_of: Dict[int, torch.nn.Parameter] = {}
    problem = None
    for name, param in model.named_parameters():
        master = w2m.get(id(param)) if hasattr(w2m, "get") else w2m[id(param)]
        if master is None:
            problem = problem or f"{fn}: the optimizer has no master weight for parameter {name!r}"
            continue
        pg = optimizer.param_to_pg[param]
        world = _ckpt_dist.world_size(pg)
        n = param.numel()
        if problem is None and (master.dim() != 1 or master.numel() * world < n):
            problem = (
                f"{fn}: the master weight of {name!r} has shape {list(master.shape)}; {world} shards of it "
                f"cannot hold the {n} elements of shape {list(param.shape)}"
            )
        if problem is None and rank == 0:
            problem = check_dst(fn, name, param.shape, master.dtype, pinned_state_dict)
        if problem is None:
            dst = pinned_state_dict[name] if rank == 0 else None
            item = Item(name, master, n, dst)
            param_of[id(item)] = param
            groups.setdefault((pg, master.dtype), []).append(item)
    return groups, param_of, problem


def _master_inputs(optimizer, params: list) -> Tuple[Optional[list], Optional[tuple]]:
    """The master shards of ``params`` now, and what else a cached master plan
    depends on (each parameter's group and shape); (None, None) when the
    optimizer cannot say (the gather then derives afresh and reports why)."""
    try:
        w2m = optimizer.get_working_to_master_map()
        get = w2m.get if hasattr(w2m, "get") else w2m.__getitem__
        shards = list(map(get, map(id, params)))
        pgs = list(map(optimizer.param_to_pg.__getitem__, params))
    except Exception:  # any failure here is reported by the derivation's own checks
        return None, None
    return shards, (pgs, list(map(_shape, params)))


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
    cached = _master_cache.get(model)
    dsts = shards = None
    if cached is not None:
        shards, inputs = _master_inputs(optimizer, cached.params)
        if shards is not None:
            dsts = cached.valid(model, inputs, shards, pinned_state_dict)
    if dsts is None:
        _master_cache.pop(model, None)  # derived afresh below
        cached = None
        groups, param_of, problem = _master_items(fn, model, optimizer, pinned_state_dict, _ckpt_dist.rank())
        if problem is None and ModuleSlots.usable(model):
            order = [param_of[id(it)] for its in groups.values() for it in its]
            _, inputs = _master_inputs(optimizer, order)
            cached = _Cached(model, inputs, groups, [], order, True, pinned_state_dict)
            _master_cache[model] = cached
    else:
        groups, problem = cached.groups, None
        cached.attach(shards, dsts)
    try:
        values = {}
        if problem is None:
            problem, values = gather_options(fn, groups, bucket_bytes, collective, staging, _ckpt_dist.world_size)
        _agree_ranks(fn, problem, values=values)
        plans = cached.plans_for((bucket_bytes, collective, staging)) if cached is not None else None
        _run_grouped(
            fn,
            groups,
            bucket_bytes=bucket_bytes,
            collective=collective,
            progress=progress,
            staging=staging,
            plans=plans,
        )
    finally:
        if cached is not None:
            cached.release()
    _ckpt_dist.barrier()


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
