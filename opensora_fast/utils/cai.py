"""Drop-in for ``opensora.utils.cai``: ColossalAI glue for inference.

Importable without colossalai; the functions that need it raise ImportError naming
``pip install opensora_fast[colossalai]``. ``get_booster`` needs the shard policies
of Open-Sora's own models (``MMDiTPolicy``, ``HunyuanVaePolicy``): they are taken
from an installed ``opensora`` package, or passed with ``policy=``.

Differences from upstream, on purpose:

- ``set_group_size`` raises ValueError when both ``tp_size`` and ``sp_size`` exceed 1
  (upstream: ``assert``).
- ``get_booster`` raises ValueError for an unknown plugin name (upstream returns None
  for anything but "hybrid", silently, also for typos); "zero1"/"zero2" still give None.
- ``get_is_saving_process`` reads ``tp_size``/``sp_size`` with a default of 1
  (upstream: KeyError when the config leaves one out).
"""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist

from .logger import is_distributed, log_message
from .misc import get_sequence_parallel_group, get_tensor_parallel_group, set_sequence_parallel_group

__all__ = ["set_group_size", "init_inference_environment", "get_booster", "get_is_saving_process"]

_PLUGINS = ("zero1", "zero2", "hybrid")


def _colossalai(what: str):
    try:
        return importlib.import_module("colossalai")
    except ImportError as e:
        raise ImportError(f"{what} needs ColossalAI: pip install opensora_fast[colossalai]") from e


def set_group_size(plugin_config: dict) -> None:
    """Clamp ``tp_size`` / ``sp_size`` of ``plugin_config`` (in place) to the number of
    visible GPUs, logging the size in use; at most one of them may exceed 1."""
    tp_size = int(plugin_config.get("tp_size", 1))
    sp_size = int(plugin_config.get("sp_size", 1))
    if tp_size > 1 and sp_size > 1:
        raise ValueError(
            f"set_group_size: tensor and sequence parallelism cannot be combined (tp_size={tp_size}, sp_size={sp_size})"
        )
    if tp_size > 1:
        plugin_config["tp_size"] = tp_size = min(tp_size, torch.cuda.device_count())
        log_message(f"Using TP with size {tp_size}")
    if sp_size > 1:
        plugin_config["sp_size"] = sp_size = min(sp_size, torch.cuda.device_count())
        log_message(f"Using SP with size {sp_size}")


def init_inference_environment() -> None:
    """Under a launcher (``WORLD_SIZE`` set): ``colossalai.launch_from_torch`` and, with more
    than one process, the world as the sequence-parallel group. Nothing otherwise."""
    if not is_distributed():
        return
    colossalai = _colossalai("init_inference_environment")
    colossalai.launch_from_torch({})
    from colossalai.cluster import DistCoordinator

    coordinator = DistCoordinator()
    if coordinator.world_size > 1:
        set_sequence_parallel_group(dist.group.WORLD)


def _default_policy(ae: bool):
    module, name = (
        ("opensora.models.hunyuan_vae.policy", "HunyuanVaePolicy")
        if ae
        else ("opensora.models.mmdit.distributed", "MMDiTPolicy")
    )
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ImportError(
            f"get_booster(plugin='hybrid') needs a shard policy: pass policy=..., or install Open-Sora ({module}.{name})"
        ) from e


def get_booster(cfg: dict, ae: bool = False, policy=None):
    """A ColossalAI ``Booster`` for the "hybrid" plugin of ``cfg`` (``plugin``/``plugin_config``,
    or ``plugin_ae``/``plugin_config_ae`` when ``ae``); None for "zero1"/"zero2"."""
    suffix = "_ae" if ae else ""
    plugin_type = cfg.get(f"plugin{suffix}", "zero2")
    plugin_config = cfg.get(f"plugin_config{suffix}", {})
    if plugin_type not in _PLUGINS:
        raise ValueError(f"get_booster: unknown plugin {plugin_type!r}; accepted: {', '.join(_PLUGINS)}")
    if plugin_type != "hybrid":
        return None
    _colossalai("get_booster")
    from colossalai.booster import Booster

    from .train import create_colossalai_plugin

    set_group_size(plugin_config)
    plugin = create_colossalai_plugin(
        plugin=plugin_type,
        dtype=cfg.get("dtype", "bf16"),
        grad_clip=cfg.get("grad_clip", 0),
        **plugin_config,
        custom_policy=policy if policy is not None else _default_policy(ae),
    )
    return Booster(plugin=plugin)


def get_is_saving_process(cfg: dict) -> bool:
    """True on the process that should write outputs: every process for non-hybrid plugins,
    else rank 0 of the tensor-parallel (tp_size > 1) or sequence-parallel (sp_size > 1) group."""
    plugin_type = cfg.get("plugin", "zero2")
    plugin_config = cfg.get("plugin_config", {})
    if plugin_type != "hybrid":
        return True
    if plugin_config.get("tp_size", 1) > 1 and dist.get_rank(get_tensor_parallel_group()) == 0:
        return True
    return plugin_config.get("sp_size", 1) > 1 and dist.get_rank(get_sequence_parallel_group()) == 0
