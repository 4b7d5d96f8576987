"""``update_ema`` (the drop-in of upstream's ``opensora.utils.train.update_ema``)
and its pairing cache: which EMA tensor pairs with which source, derived once
per (model, optimizer) and checked on every call, by the native plan of
csrc/ema/ema_plan.cpp while nothing changed and here otherwise. Re-exported by
:mod:`opensora_fast.utils.train`."""

from __future__ import annotations

import operator
import weakref
from typing import Optional

import torch

from .._ext import _C
from .._module_tree import ModuleTree as _Tree
from ..ops import ema_update_
from ..ops._registry import pick
from ..ops.ema import draw_seed
from ..optim import fused_ema_step_taken

__all__ = ["update_ema"]

_requires_grad = operator.attrgetter("requires_grad")
_dtype = operator.attrgetter("dtype")
_is = operator.is_

_ROUNDING = ("compat", "stochastic")


class _Plan:
    """The (ema, src) pairing of one (ema_model, model, optimizer, sharded) and
    what it was derived from, checked every step before it is reused: both
    module trees' slots (:class:`_Tree`), every model parameter's
    ``requires_grad`` (which decides the skips) and, when sharded, its dtype
    (which decides master or parameter), and each master shard's identity in
    the map. It holds the parameter objects themselves, so their ids cannot be
    reused while it lives, and ``p.data = x`` (a new shape or storage) needs
    no re-derivation: the op reads each tensor afresh."""

    __slots__ = (
        "sharded",
        "model_tree",
        "ema_tree",
        "params",
        "grads",
        "dtypes",
        "ema",
        "src",
        "m_ids",
        "m_srcs",
        "fast",
        "device",
    )

    def still_valid(self, ema_model, model, masters, sharded) -> bool:
        if sharded != self.sharded:
            return False
        if not (self.model_tree.unchanged(model) and self.ema_tree.unchanged(ema_model)):
            return False
        if list(map(_requires_grad, self.params)) != self.grads:
            return False
        if sharded and not all(map(_is, map(_dtype, self.params), self.dtypes)):
            return False
        if self.m_ids:  # each master shard still the one the map holds now
            if masters is None:
                return False
            if not all(map(_is, map(masters.get, self.m_ids), self.m_srcs)):
                return False
        return True


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
    ema_named = dict(ema_model.named_parameters())
    plan = _Plan()
    plan.sharded = sharded
    plan.model_tree, plan.ema_tree = _Tree(model), _Tree(ema_model)
    plan.params = list(model.parameters())
    plan.grads = list(map(_requires_grad, plan.params))
    plan.dtypes = list(map(_dtype, plan.params))
    plan.ema, plan.src, plan.m_ids, plan.m_srcs = [], [], [], []
    plan.fast = None
    for name, param in model.named_parameters():
        if name == "pos_embed" or not param.requires_grad:
            continue
        if name not in ema_named:
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
            plan.m_ids.append(id(param))
            plan.m_srcs.append(src)
        else:
            src = param
        plan.ema.append(ema_named[name])
        plan.src.append(src)
    plan.device = plan.ema[0].device if plan.ema else None
    return plan


def _arm(plan: _Plan, ema_model, model, masters):
    """The native fast path for the next steps (csrc/ema/ema_plan.cpp), armed
    right after a call that validated this plan and ran the native op on its
    lists; None where it cannot be built (no extension, CPython 3.13+, a
    module without a plain ``__dict__``, a master map that is not a dict)."""
    make = getattr(_C, "EmaPlan", None)
    if make is None:
        return None
    try:
        return make(
            model,
            ema_model,
            plan.model_tree.mods,
            plan.ema_tree.mods,
            plan.params,
            plan.ema,
            plan.src,
            masters,
            plan.m_ids,
            plan.m_srcs,
            plan.sharded,
        )
    except (TypeError, ValueError):
        return None


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def _decay_value(decay):
    """``decay`` as the float the op takes, and whether upstream's
    ``add_(src, alpha=1 - decay)`` sees the same alpha as the op's fp32 ``1 - d``.
    A 0-dim tensor works upstream (``mul_``/``add_`` take it as a number);
    a bf16/fp16 one computes ``1 - decay`` in its own dtype, which can differ."""
    if not isinstance(decay, torch.Tensor):
        return decay, True
    if decay.dim() != 0 or decay.dtype == torch.bool or decay.is_complex():
        raise TypeError(
            f"update_ema: decay must be a real number or a 0-dim real tensor, got a {decay.dtype} tensor "
            f"of shape {list(decay.shape)}"
        )
    d = float(decay)
    return d, _f32(float(1 - decay)) == _f32(1.0 - d)


def _is_dense(t: torch.Tensor) -> bool:
    """Its elements fill one gap-free block of memory, each once (any dim order)."""
    expected = 1
    for size, stride in sorted((d for d in zip(t.shape, t.stride()) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _contiguous_pairs(ema: list, src: list):
    """Upstream's elementwise ``mul_``/``add_`` take parameters of any strides;
    the op takes contiguous ones. A pair whose tensors are dense with the same
    strides (channels_last, transposed) is passed as 1-D views of its memory
    (elementwise, so the same result); any other pair goes through contiguous
    copies, written back after the op succeeded. Returns (ema, src, write_back)."""
    ema, src, back = list(ema), list(src), []
    for i, (e, s) in enumerate(zip(ema, src)):
        if e.is_contiguous() and s.is_contiguous():
            continue
        if e.shape == s.shape and e.stride() == s.stride() and _is_dense(e) and _is_dense(s):
            ema[i] = e.as_strided((e.numel(),), (1,))
            src[i] = s.as_strided((s.numel(),), (1,))
        else:
            if not e.is_contiguous():
                ema[i] = e.contiguous()
                back.append((e, ema[i]))
            src[i] = s.contiguous()
    return ema, src, back


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

    The pairing is derived once and checked every step before reuse: the same
    parameter objects in both models (none replaced, added or deleted, even
    behind ``module._parameters``), the same ``requires_grad`` and dtypes, and
    each master shard still the one in ``get_working_to_master_map()``, the
    same ``sharded``; any change re-derives it. After a validated call on the
    native op, the next steps run through a native plan that compares what
    that call read (dict version tags of both module trees, ``requires_grad``
    and dtypes, the master map, each tensor's pointer, shape, dtype and
    device) and runs the kernel on held lists: the host cost of a step no
    longer grows with Python work per parameter (docs/ops/ema.md). As
    upstream, parameters of any strides (channels_last, transposed, views)
    and a 0-dim tensor ``decay`` work.

    Args beyond upstream (keyword-only):
        rounding: ``"compat"`` (default) rounds like upstream, bit for bit on CPU
            (see :func:`opensora_fast.ops.ema_update_`). ``"stochastic"`` rounds
            a bf16/fp16 EMA stochastically, so it tracks an fp32 EMA at decay
            0.9999 instead of stalling.
        generator: CPU generator for the stochastic seeds (torch's default when None).
    """
    if rounding not in _ROUNDING:
        raise ValueError(f"update_ema: rounding must be one of {_ROUNDING}, got {rounding!r}")
    if fused_ema_step_taken(ema_model, decay, rounding):
        return  # an attached FusedAdamW stepped it in its last step(): one EMA step per optimizer step
    # fetched only where it exists: an fp32 model needs no master map (upstream never asks)
    has_map = sharded and hasattr(optimizer, "get_working_to_master_map")
    masters = optimizer.get_working_to_master_map() if has_map else None
    stochastic = rounding == "stochastic"
    seed = None
    plan = _plans.get(ema_model)
    if plan is not None and plan.fast is not None and type(decay) is float:
        seed = draw_seed(generator) if stochastic else 0  # one draw per step, whichever path runs
        native = pick("ema_update_", plan.device, None) is not None
        if native and plan.fast.step(model, ema_model, masters, bool(sharded), decay, stochastic, seed):
            return  # nothing the last validated call depended on changed: the op ran on its lists
    if plan is None or not plan.still_valid(ema_model, model, masters, bool(sharded)):
        plan = _derive(ema_model, model, optimizer, bool(sharded), masters)
        _plans[ema_model] = plan
    value, same_alpha = _decay_value(decay)
    if not same_alpha and rounding == "compat":  # a bf16/fp16 tensor decay: upstream's own two ops
        for e, s in zip(plan.ema, plan.src):
            e.mul_(decay).add_(s, alpha=1 - decay)
        return
    decay = value
    if seed is None:
        seed = draw_seed(generator) if stochastic else 0
    try:
        if _run(plan, decay, stochastic, seed):
            plan.fast = _arm(plan, ema_model, model, masters)
    except ValueError:
        # Checked before any write, so nothing was written. Non-contiguous
        # parameters run as upstream runs them; anything else re-raises.
        if all(t.is_contiguous() for t in plan.ema) and all(t.is_contiguous() for t in plan.src):
            raise
        ema, src, back = _contiguous_pairs(plan.ema, plan.src)
        ema_update_(ema, src, decay, stochastic=stochastic, seed=seed)
        for dst, tmp in back:
            dst.copy_(tmp)


def _run(plan: _Plan, decay, stochastic: bool, seed: int) -> bool:
    """The op over the plan's lists; True when the native op ran (and
    validated them). Its elements were tensors when the plan was derived and
    are the same objects now (the plan checks them), so the native op takes
    them directly, without the wrapper's per-item checks; if it refuses them,
    the wrapper runs instead and raises in its words (the op checks everything
    before it writes)."""
    if plan.ema and type(decay) is float:
        native = pick("ema_update_", plan.device, None)
        if native is not None:
            try:
                native(plan.ema, plan.src, decay, stochastic, seed)
                return True
            except Exception:
                pass
    ema_update_(plan.ema, plan.src, decay, stochastic=stochastic, seed=seed)
    return False
