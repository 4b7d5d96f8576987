"""Upstream-faithful ports of Open-Sora's checkpoint gathers
(``opensora/utils/ckpt.py``): one ``all_gather`` of a list per parameter, a
``cat``, a slice and a copy on rank 0. Written from their semantics; the
oracle of the tests and the baseline of benchmarks/bench_ckpt.py."""

from __future__ import annotations

import functools
import operator

import torch
import torch.distributed as dist


def remove_padding(tensor: torch.Tensor, original_shape: tuple) -> torch.Tensor:
    """Upstream's: ``tensor[:prod(shape)]`` by ``functools.reduce`` without an
    initial value, so a 0-dim shape raises TypeError (as upstream does)."""
    return tensor[: functools.reduce(operator.mul, original_shape)]


def model_sharding(model: torch.nn.Module, device: torch.device = None) -> None:
    """Upstream's: per parameter, flatten, zero-pad to a multiple of the world,
    keep chunk ``rank`` (a view of the padded tensor) moved to ``device`` (the
    first parameter's device when None)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for _, param in model.named_parameters():
        if device is None:
            device = param.device
        flat = param.data.flatten()
        pad = (world - flat.numel() % world) % world
        if pad:
            flat = torch.nn.functional.pad(flat, [0, pad])
        chunk = flat.numel() // world
        param.data = flat.split(chunk)[rank].to(device)


def model_gathering(model: torch.nn.Module, model_shape_dict: dict, pinned_state_dict: dict) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    names = set()
    for name, param in model.named_parameters():
        names.add(name)
        parts = [torch.empty_like(param.data) for _ in range(world)]
        dist.all_gather(parts, param.data, group=dist.group.WORLD)
        if rank == 0:
            full = remove_padding(torch.cat(parts), model_shape_dict[name]).view(model_shape_dict[name])
            pinned_state_dict[name].copy_(full)
    if rank == 0:
        for k, v in model.state_dict(keep_vars=True).items():
            if k not in names:
                pinned_state_dict[k].copy_(v)
    dist.barrier()


def master_weights_gathering(model: torch.nn.Module, optimizer, pinned_state_dict: dict) -> None:
    w2m = optimizer.get_working_to_master_map()
    for name, param in model.named_parameters():
        master = w2m[id(param)]
        pg = optimizer.param_to_pg[param]
        parts = [torch.empty_like(master) for _ in range(dist.get_world_size(pg))]
        dist.all_gather(parts, master, group=pg)
        if dist.get_rank() == 0:
            full = remove_padding(torch.cat(parts), param.shape).view(param.shape)
            pinned_state_dict[name].copy_(full)
    dist.barrier()
