"""FusedAdamW: torch's AdamW over fp32 (master) parameters in one native pass
that also steps an attached EMA from the freshly updated masters."""

from __future__ import annotations

import math
import numbers
import operator
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .._module_tree import ModuleTree
from ..ops.adamw_ema import adamw_ema_
from ..ops.ema import draw_seed

__all__ = ["FusedAdamW", "attach_ema", "attached_optimizer", "fused_ema_step_taken"]

_ROUNDING = ("compat", "stochastic")
_EMA_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_grad_and_dtype = operator.attrgetter("requires_grad", "dtype")


def _same_objects(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _check_float(cls: str, name: str, value: Any, low: float = 0.0, below_one: bool = False) -> float:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{cls}: {name} must be a Python number (a tensor {name} is not supported), got a tensor")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{cls}: {name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if below_one:
        if not low <= v < 1.0:
            raise ValueError(f"{cls}: {name} must be in [0, 1), got {v!r}")
    elif not (math.isfinite(v) and v >= low):
        raise ValueError(f"{cls}: {name} must be finite and >= 0, got {v!r}")
    return v


class _Attachment:
    """One EMA model stepped by one FusedAdamW: its pairing (derived like
    update_ema's, checked before every step and re-derived on any change) and
    the count of fused steps update_ema has not yet been told about."""

    def __init__(self, optimizer, ema_model, model, zero, decay, rounding, generator):
        self.optimizer = weakref.ref(optimizer)
        self.ema_model = weakref.ref(ema_model)
        self.model = model
        self.zero = zero
        self.decay = decay
        self.rounding = rounding
        self.generator = generator
        self.pending = 0
        self.ema: List[torch.Tensor] = []
        self.src: List[torch.Tensor] = []
        self._basis: Optional[tuple] = None
        self.refresh()

    def _masters(self) -> Optional[dict]:
        return self.zero.get_working_to_master_map() if self.zero is not None else None

    def _owned(self) -> list:
        return [p for g in self.optimizer().param_groups for p in g["params"]]

    def _derived_from(self, masters) -> tuple:
        """What the pairing reads: both module trees' slots, the model's
        parameters with their requires_grad and dtype, the parameters the
        optimizer owns, and the master found for each parameter."""
        params = list(self.model.parameters())
        ids = list(map(id, params))
        mastered = list(map(masters.get, ids)) if masters is not None else None
        trees = (ModuleTree(self.model), ModuleTree(self.ema_model()))
        return trees, params, ids, list(map(_grad_and_dtype, params)), self._owned(), mastered

    def _still_valid(self, masters) -> bool:
        if self._basis is None:
            return False
        (model_tree, ema_tree), params, ids, flags, owned, mastered = self._basis
        if not (model_tree.unchanged(self.model) and ema_tree.unchanged(self.ema_model())):
            return False
        if list(map(_grad_and_dtype, params)) != flags or not _same_objects(self._owned(), owned):
            return False
        if (masters is None) != (mastered is None):
            return False
        return masters is None or _same_objects(list(map(masters.get, ids)), mastered)

    def refresh(self) -> None:
        """Re-derives the pairing when anything it was derived from changed;
        raises (before any write) when the new pairing is invalid."""
        masters = self._masters()
        if self._still_valid(masters):
            return
        basis = self._derived_from(masters)
        self.ema, self.src = _pair(self.optimizer(), self.ema_model(), self.model, self.zero, masters)
        self._basis = basis


def _pair(opt, ema_model, model, zero, masters) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """update_ema's pairing (opensora_fast/utils/train.py): every parameter of
    ``model`` but ``pos_embed`` and those without requires_grad, in order;
    the source is its fp32 master (ZeRO, non-fp32 parameter) or the parameter.
    Each source must be a parameter this optimizer steps."""
    owned = {id(p) for g in opt.param_groups for p in g["params"]}
    ema_named = dict(ema_model.named_parameters())
    ema, src = [], []
    for name, param in model.named_parameters():
        if name == "pos_embed" or not param.requires_grad:
            continue
        if name not in ema_named:
            raise KeyError(f"FusedAdamW.attach_ema: ema_model has no parameter {name!r} (model has it)")
        if zero is not None and param.dtype != torch.float32:
            s = masters.get(id(param)) if masters is not None else None
            if s is None:
                raise KeyError(
                    f"FusedAdamW.attach_ema: parameter {name!r} has no master shard in "
                    "optimizer.get_working_to_master_map()"
                )
        else:
            s = param
        if id(s) not in owned:
            raise ValueError(
                f"FusedAdamW.attach_ema: the EMA source of parameter {name!r} is not a parameter of this "
                "optimizer (attach an EMA only to parameters it steps; under ZeRO pass the wrapper as optimizer=)"
            )
        e = ema_named[name]
        if e.dtype not in _EMA_FLOATS:
            raise TypeError(
                f"FusedAdamW.attach_ema: EMA parameter {name!r} has dtype {e.dtype}; expected float32, bfloat16 "
                "or float16"
            )
        if e.shape != s.shape:
            raise ValueError(
                f"FusedAdamW.attach_ema: EMA parameter {name!r} has shape {list(e.shape)} but its source has "
                f"shape {list(s.shape)} (a sharded EMA needs the masters' layout: model_sharding)"
            )
        if e.device != s.device:
            raise ValueError(
                f"FusedAdamW.attach_ema: EMA parameter {name!r} is on {e.device} but its source is on {s.device}"
            )
        ema.append(e)
        src.append(s)
    return ema, src


# ema_model -> its attachment (at most one optimizer steps an EMA model)
_attached: "weakref.WeakKeyDictionary[torch.nn.Module, _Attachment]" = weakref.WeakKeyDictionary()


class FusedAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` over fp32 parameters (e.g. ZeRO's fp32 master
    shards) in one native multi-tensor pass, which can also step an EMA model
    from the freshly updated masters (:meth:`attach_ema`): each master is read
    from memory once for both.

    Arguments, defaults, results (bit for bit with ``AdamW(foreach=True)`` on
    the CPU) and ``state_dict`` layout are torch's AdamW's, so checkpoints
    load either way. ``foreach`` and ``fused`` are accepted and kept in the
    groups (a torch checkpoint keeps them) but ignored; ``capturable`` and
    ``differentiable`` are not supported. Parameters and gradients must be
    float32 and contiguous; hyper-parameters are Python numbers (an lr changed
    by a scheduler is read at every step) and must be finite.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
    ) -> None:
        cls = "FusedAdamW"
        lr = _check_float(cls, "lr", lr)
        eps = _check_float(cls, "eps", eps)
        weight_decay = _check_float(cls, "weight_decay", weight_decay)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{cls}: betas must be a pair of floats, got {betas!r}")
        betas = (
            _check_float(cls, "betas[0]", betas[0], below_one=True),
            _check_float(cls, "betas[1]", betas[1], below_one=True),
        )
        if capturable:
            raise ValueError(f"{cls}: capturable=True is not supported (its steps are host values)")
        if differentiable:
            raise ValueError(f"{cls}: differentiable=True is not supported")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=bool(amsgrad),
            maximize=bool(maximize),
            foreach=foreach,
            capturable=False,
            differentiable=False,
            fused=fused,
            decoupled_weight_decay=True,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:  # a group's own hyper-parameters, checked as the defaults were
            for key in ("lr", "eps", "weight_decay"):
                _check_float("FusedAdamW", key, group[key])
            for k in (0, 1):
                _check_float("FusedAdamW", f"betas[{k}]", group["betas"][k], below_one=True)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        for i, p in enumerate(group["params"]):
            if p.dtype != torch.float32:
                self.param_groups.pop()
                raise TypeError(
                    f"FusedAdamW: parameter {i} of group {len(self.param_groups)} has dtype {p.dtype}; FusedAdamW "
                    "steps float32 parameters (wrap bf16/fp16 models in a ZeRO / mixed-precision optimizer with "
                    "fp32 masters)"
                )

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (
                ("amsgrad", False),
                ("maximize", False),
                ("foreach", None),
                ("capturable", False),
                ("differentiable", False),
                ("fused", None),
                ("decoupled_weight_decay", True),
            ):
                group.setdefault(key, value)
        # torch keeps a fused/capturable step on the device; ours are CPU fp32 scalars.
        for s in self.state.values():
            step = s.get("step")
            if step is not None and (
                not torch.is_tensor(step) or step.device.type != "cpu" or step.dtype != torch.float32
            ):
                s["step"] = torch.tensor(float(step), dtype=torch.float32)

    def attach_ema(
        self,
        ema_model: torch.nn.Module,
        model: torch.nn.Module,
        decay: float = 0.9999,
        rounding: str = "compat",
        *,
        optimizer=None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        """From now on every :meth:`step` also steps ``ema_model`` towards
        ``model``, exactly as ``update_ema(ema_model, model, optimizer, decay,
        rounding=rounding)`` would right after the step (bit for bit, stochastic
        rounding included for the same ``generator`` state), in the same pass.

        ``optimizer``: the ZeRO wrapper around this optimizer (whose
        ``get_working_to_master_map()`` gives each working parameter's fp32
        master shard, which the EMA shard follows), or None when this
        optimizer steps the model's parameters themselves. The pairing is
        update_ema's, checked before every step and re-derived after any
        change (a replaced parameter, a new master). ``update_ema`` on an
        attached EMA model does not step it again
        (:func:`fused_ema_step_taken`). Bad pairings (a missing or misshaped
        EMA parameter, a dtype other than fp32/bf16/fp16, a source this
        optimizer does not step) raise here, and at the step that sees them,
        before anything is written.
        """
        if rounding not in _ROUNDING:
            raise ValueError(f"FusedAdamW.attach_ema: rounding must be one of {_ROUNDING}, got {rounding!r}")
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"FusedAdamW.attach_ema: decay must be a real number in [0, 1], got {decay!r}")
        if optimizer is self:
            optimizer = None
        if optimizer is not None and not hasattr(optimizer, "get_working_to_master_map"):
            raise TypeError(
                "FusedAdamW.attach_ema: optimizer= must provide get_working_to_master_map() (a ZeRO wrapper), "
                f"got {type(optimizer).__name__}"
            )
        other = _attached.get(ema_model)
        if other is not None and other.optimizer() is not None and other.optimizer() is not self:
            raise ValueError("FusedAdamW.attach_ema: ema_model is already attached to another optimizer")
        att = _Attachment(self, ema_model, model, optimizer, float(decay), rounding, generator)
        self._attachments()[id(ema_model)] = att
        _attached[ema_model] = att

    def detach_ema(self, ema_model: torch.nn.Module) -> None:
        """Stops stepping ``ema_model`` (update_ema steps it again)."""
        self._attachments().pop(id(ema_model), None)
        att = _attached.get(ema_model)
        if att is not None and att.optimizer() is self:
            del _attached[ema_model]

    def _attachments(self) -> Dict[int, _Attachment]:
        d = self.__dict__.get("_ema_attachments")
        if d is None:
            d = self.__dict__["_ema_attachments"] = {}
        for key in [k for k, att in d.items() if att.ema_model() is None]:
            del d[key]  # its EMA model is gone (held weakly): nothing left to step, and its id may be reused
        return d

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """One AdamW step of every parameter with a gradient, and one EMA step
        of every attached EMA model, in one native call."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads, exp_avgs, exp_avg_sqs, vmax, steps = [], [], [], [], [], []
        sizes, lr, beta1, beta2, eps, wd, ams, maxi = [], [], [], [], [], [], [], []
        fresh: Dict[torch.Tensor, dict] = {}
        for group in self.param_groups:
            amsgrad = bool(group["amsgrad"])
            n = 0
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("FusedAdamW does not support sparse gradients")
                state = self.state.get(p)
                if not state:  # lazy state, kept only once the step succeeded
                    state = fresh[p] = dict(
                        step=torch.tensor(0.0, dtype=torch.float32),
                        exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                        exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format),
                    )
                if amsgrad and "max_exp_avg_sq" not in state:
                    state = fresh.setdefault(p, dict(state))
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(g)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
                if amsgrad:
                    vmax.append(state["max_exp_avg_sq"])
                n += 1
            b1, b2 = group["betas"]
            sizes.append(n)
            lr.append(group["lr"])
            beta1.append(b1)
            beta2.append(b2)
            eps.append(group["eps"])
            wd.append(group["weight_decay"])
            ams.append(amsgrad)
            maxi.append(bool(group["maximize"]))
        atts = list(self._attachments().values())
        for att in atts:  # every pairing checked (and re-derived if stale) before any write
            att.refresh()
        # The first EMA model rides on the AdamW pass; any other gets its own
        # pass over the fresh masters (each with its own seed, as update_ema).
        for k, att in enumerate(atts or [None]):
            ema, src = (att.ema, att.src) if att is not None else ([], [])
            decay = att.decay if att is not None else 0.0
            stochastic = att is not None and att.rounding == "stochastic"
            seed = draw_seed(att.generator) if stochastic and ema else None
            if k == 0:
                adamw_ema_(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    vmax,
                    steps,
                    sizes,
                    lr,
                    beta1,
                    beta2,
                    eps,
                    wd,
                    ams,
                    maxi,
                    ema,
                    src,
                    decay,
                    stochastic=stochastic,
                    seed=seed,
                )
                for p, s in fresh.items():
                    self.state[p].update(s)
            else:
                adamw_ema_(
                    [],
                    [],
                    [],
                    [],
                    [],
                    [],
                    [],
                    [],
                    [],
                    [],
                    [],
                    [],
                    [],
                    [],
                    ema,
                    src,
                    decay,
                    stochastic=stochastic,
                    seed=seed,
                )
            if att is not None:
                att.pending += 1
        return loss


def _inner(optimizer) -> Tuple[FusedAdamW, Any]:
    if isinstance(optimizer, FusedAdamW):
        return optimizer, None
    for attr in ("optim", "optimizer", "_optimizer"):
        inner = getattr(optimizer, attr, None)
        if isinstance(inner, FusedAdamW):
            return inner, optimizer
    raise TypeError(f"attach_ema: {type(optimizer).__name__} is not a FusedAdamW and wraps none (.optim)")


def attach_ema(
    optimizer,
    ema_model: torch.nn.Module,
    model: torch.nn.Module,
    decay: float = 0.9999,
    rounding: str = "compat",
    *,
    generator: Optional[torch.Generator] = None,
) -> FusedAdamW:
    """:meth:`FusedAdamW.attach_ema` for a FusedAdamW or a wrapper around one
    (a ZeRO optimizer holding it as ``.optim``); returns the FusedAdamW."""
    inner, wrapper = _inner(optimizer)
    inner.attach_ema(ema_model, model, decay, rounding, optimizer=wrapper, generator=generator)
    return inner


def attached_optimizer(ema_model: torch.nn.Module) -> Optional[FusedAdamW]:
    """The FusedAdamW whose steps also step ``ema_model``, or None."""
    att = _attached.get(ema_model)
    if att is None:
        return None
    opt = att.optimizer()
    return opt if opt is not None and id(ema_model) in opt._attachments() else None


def fused_ema_step_taken(ema_model: torch.nn.Module, decay=0.9999, rounding: str = "compat") -> bool:
    """For ``update_ema``: True when an attached FusedAdamW has stepped
    ``ema_model`` since the last call (update_ema must then do nothing; each
    optimizer step is one EMA step), False when update_ema must step it itself
    (nothing attached, or no fused step since the last call; also decay 0,
    a plain copy, which update_ema then makes). Raises ValueError when a fused
    step is pending with another decay or rounding than update_ema asks for."""
    att = _attached.get(ema_model)
    if att is None or att.pending == 0 or attached_optimizer(ema_model) is None:
        return False
    d = float(decay)
    if d != 0.0 and (d != att.decay or rounding != att.rounding):
        raise ValueError(
            f"update_ema: ema_model is stepped by FusedAdamW.attach_ema with decay={att.decay!r}, "
            f"rounding={att.rounding!r}, but update_ema was called with decay={d!r}, rounding={rounding!r}; "
            "attach it again with these, or detach it (FusedAdamW.detach_ema)"
        )
    att.pending = 0
    return d != 0.0
