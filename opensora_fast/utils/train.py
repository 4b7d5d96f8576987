"""Drop-in for ``opensora.utils.train``: ``from opensora_fast.utils.train import update_ema``."""
from __future__ import annotations

import operator
import weakref
from typing import Optional

import torch

from ..ops import ema_update_

__all__ = ["update_ema"]

# Bumped whenever any module registers a parameter (including `m.w = Parameter(..)`),
# so cached EMA pairings notice replaced parameters without walking the model.
_param_epoch = 0


def _on_param_registered(module, name, param):
    global _param_epoch
    _param_epoch += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_on_param_registered)

_requires_grad = operator.attrgetter("requires_grad")
_dtype = operator.attrgetter("dtype")

_ROUNDING = ("compat", "stochastic")


class _Plan:
    """The (ema, src) pairing of one (ema_model, model, optimizer, sharded), and
    what it was derived from. Parameters are held as objects, so ``p.data = x``
    is seen without re-deriving."""

    __slots__ = ("key", "epoch", "candidates", "requires_grad", "dtypes", "ema", "src")


_plans: "weakref.WeakKeyDictionary[torch.nn.Module, _Plan]" = weakref.WeakKeyDictionary()


def _master_map(optimizer):
    getter = getattr(optimizer, "get_working_to_master_map", None)
    if getter is None:
        raise ValueError(
            "update_ema(sharded=True): a non-fp32 parameter takes its source from its fp32 master "
            "shard, so `optimizer` must provide get_working_to_master_map() (a ZeRO optimizer); "
            f"got {type(optimizer).__name__}"
        )
    return getter()


def _derive(ema_model, model, optimizer, sharded, masters) -> _Plan:
    ema_params = dict(ema_model.named_parameters())
    plan = _Plan()
    plan.candidates, plan.ema, plan.src = [], [], []
    for name, param in model.named_parameters():
        if name == "pos_embed":
            continue
        plan.candidates.append(param)
        if not param.requires_grad:
            continue
        if name not in ema_params:
            raise KeyError(f"update_ema: ema_model has no parameter {name!r} (model has it)")
        if sharded and param.dtype != torch.float32:
            if masters is None:
                masters = _master_map(optimizer)
            try:
                src = masters[id(param)]
            except KeyError:
                raise KeyError(
                    f"update_ema: parameter {name!r} has no master shard in optimizer.get_working_to_master_map()"
                ) from None
        else:
            src = param
        plan.ema.append(ema_params[name])
        plan.src.append(src)
    plan.requires_grad = list(map(_requires_grad, plan.candidates))
    plan.dtypes = list(map(_dtype, plan.candidates))
    return plan


@torch.no_grad()
def update_ema(
    ema_model: torch.nn.Module,
    model: torch.nn.Module,
    optimizer=None,
    decay: float = 0.9999,
    sharded: bool = True,
    *,
    rounding: str = "compat",
    generator: Optional[torch.Generator] = None,
) -> None:
    """Step the EMA model towards the current model, as upstream does, in one fused call.

    Same semantics as ``opensora.utils.train.update_ema``: every parameter of
    ``model`` except ``pos_embed`` and those without ``requires_grad`` moves
    its EMA twin: ``ema = ema * decay + src * (1 - decay)``, where ``src`` is
    the parameter, or, when ``sharded`` and the parameter is not fp32, its fp32
    master shard from ``optimizer.get_working_to_master_map()``.

    The pairing is derived once and reused while the parameters stay the same
    objects with the same ``requires_grad`` and dtype, and the master map is
    the same; any change re-derives it.

    Args beyond upstream (keyword-only):
        rounding: ``"compat"`` (default) rounds like upstream, bit for bit on CPU
            (see :func:`opensora_fast.ops.ema_update_`). ``"stochastic"`` rounds
            a bf16/fp16 EMA stochastically, so it tracks an fp32 EMA at decay
            0.9999 instead of stalling.
        generator: CPU generator for the stochastic seeds (torch's default when None).
    """
    if rounding not in _ROUNDING:
        raise ValueError(f"update_ema: rounding must be one of {_ROUNDING}, got {rounding!r}")
    masters = _master_map(optimizer) if (sharded and optimizer is not None) else None
    key = (id(model), id(optimizer), bool(sharded), id(masters), len(masters) if masters is not None else -1)
    plan = _plans.get(ema_model)
    if (
        plan is None
        or plan.key != key
        or plan.epoch != _param_epoch
        or list(map(_requires_grad, plan.candidates)) != plan.requires_grad
        or list(map(_dtype, plan.candidates)) != plan.dtypes
    ):
        plan = _derive(ema_model, model, optimizer, sharded, masters)
        plan.key, plan.epoch = key, _param_epoch
        _plans[ema_model] = plan
    ema_update_(plan.ema, plan.src, decay, stochastic=rounding == "stochastic", generator=generator)
