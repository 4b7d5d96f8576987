"""Drop-in for ``opensora.utils.optimizer``: optimizer and learning-rate schedulers.

Importable without colossalai. :class:`CosineAnnealingWarmupLR` is our own
implementation of ColossalAI's ``colossalai.nn.lr_scheduler.CosineAnnealingWarmupLR``
with the same values step for step (a linear warmup ``(i+1)/warmup * lr``, then
torch's ``CosineAnnealingLR`` over ``total_steps - warmup_steps`` steps, driven
exactly as ColossalAI drives it) and the same ``state_dict`` layout.

Differences from upstream, on purpose:

- ``create_optimizer`` accepts ``cls="AdamW"`` (torch's AdamW, fused on CUDA
  parameters; a choice for machines without ColossalAI) and ``cls="FusedAdamW"``
  (ours: AdamW over fp32 masters that can also step the EMA), besides the default
  ``"HybridAdam"`` which needs ``pip install opensora_fast[colossalai]``.
  Like upstream it pops ``cls`` from the caller's dict.
- ``create_lr_scheduler`` honours ``initial_lr`` (upstream ignores the argument
  and always uses its default, 1e-6) and treats ``warmup_steps=None`` with the
  cosine schedule as 0 warmup steps (upstream crashes).
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR as _TorchCosineAnnealingLR

try:  # torch >= 2.0
    from torch.optim.lr_scheduler import LRScheduler as _LRScheduler
except ImportError:  # pragma: no cover
    from torch.optim.lr_scheduler import _LRScheduler

__all__ = ["create_optimizer", "create_lr_scheduler", "LinearWarmupLR", "CosineAnnealingWarmupLR", "OPTIMIZERS"]

OPTIMIZERS = ("HybridAdam", "AdamW", "FusedAdamW")


def _hybrid_adam():
    try:
        from colossalai.nn.optimizer import HybridAdam
    except ImportError as e:
        raise ImportError(
            "create_optimizer(cls='HybridAdam') needs ColossalAI: pip install opensora_fast[colossalai] "
            "(or pass cls='AdamW' for torch's fused AdamW)"
        ) from e
    return HybridAdam


def _torch_adamw(params, **kwargs) -> torch.optim.Optimizer:
    """torch's Adam(W) with HybridAdam's defaults: weight_decay 0 (torch's AdamW: 0.01),
    ``adamw_mode=True`` -> AdamW (decoupled decay), False -> Adam (L2 decay)."""
    params = list(params)
    adamw_mode = kwargs.pop("adamw_mode", True)
    if not kwargs.pop("bias_correction", True):
        raise ValueError("create_optimizer(cls='AdamW'): bias_correction=False is not supported by torch's Adam(W)")
    kwargs.pop("nvme_offload_fraction", None)
    kwargs.pop("nvme_offload_dir", None)
    kwargs.setdefault("weight_decay", 0.0)
    if "fused" not in kwargs and "foreach" not in kwargs and params and all(p.is_cuda for p in params):
        kwargs["fused"] = True  # one fused kernel per step on CUDA; CPU parameters use foreach
    cls = torch.optim.AdamW if adamw_mode else torch.optim.Adam
    return cls(params, **kwargs)


def _fused_adamw(params, **kwargs) -> torch.optim.Optimizer:
    """:class:`opensora_fast.optim.FusedAdamW` with HybridAdam's defaults (weight_decay 0)."""
    from ..optim import FusedAdamW

    if not kwargs.pop("adamw_mode", True):
        raise ValueError("create_optimizer(cls='FusedAdamW'): adamw_mode=False (Adam with L2 decay) is not supported")
    if not kwargs.pop("bias_correction", True):
        raise ValueError("create_optimizer(cls='FusedAdamW'): bias_correction=False is not supported")
    kwargs.pop("nvme_offload_fraction", None)
    kwargs.pop("nvme_offload_dir", None)
    kwargs.setdefault("weight_decay", 0.0)
    return FusedAdamW(params, **kwargs)


def create_optimizer(model: torch.nn.Module, optimizer_config: dict) -> torch.optim.Optimizer:
    """Build the optimizer over ``model``'s trainable parameters.

    ``optimizer_config["cls"]`` (popped, default ``"HybridAdam"``) picks the class:
    ``"HybridAdam"`` (ColossalAI, as upstream) or ``"AdamW"`` (``torch.optim.AdamW``,
    ``fused=True`` when every parameter is on CUDA, with HybridAdam's defaults:
    weight_decay 0, and ``adamw_mode=False`` gives ``torch.optim.Adam``) or
    ``"FusedAdamW"`` (:class:`opensora_fast.optim.FusedAdamW`: fp32 parameters,
    e.g. under ZeRO, with an optional attached EMA; weight_decay 0). The rest
    of the dict is passed as keyword arguments (lr, weight_decay, eps, betas, ...).
    """
    name = optimizer_config.pop("cls", "HybridAdam")
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer: {name!r}; accepted: {', '.join(OPTIMIZERS)}")
    params = filter(lambda p: p.requires_grad, model.parameters())
    if name == "HybridAdam":
        return _hybrid_adam()(params, **optimizer_config)
    if name == "FusedAdamW":
        return _fused_adamw(params, **dict(optimizer_config))
    return _torch_adamw(params, **dict(optimizer_config))


def create_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    num_steps_per_epoch: int,
    epochs: int = 1000,
    warmup_steps: int | None = None,
    use_cosine_scheduler: bool = False,
    initial_lr: float = 1e-6,
) -> _LRScheduler | None:
    """None without warmup and cosine; :class:`CosineAnnealingWarmupLR` over
    ``num_steps_per_epoch * epochs`` steps when ``use_cosine_scheduler``; else
    :class:`LinearWarmupLR` from ``initial_lr`` over ``warmup_steps`` steps."""
    if warmup_steps is None and not use_cosine_scheduler:
        return None
    if use_cosine_scheduler:
        return CosineAnnealingWarmupLR(
            optimizer, total_steps=num_steps_per_epoch * epochs, warmup_steps=warmup_steps or 0
        )
    return LinearWarmupLR(optimizer, initial_lr=initial_lr, warmup_steps=warmup_steps)


class LinearWarmupLR(_LRScheduler):
    """Linear warmup from ``initial_lr`` to each group's base lr, then constant.

    At scheduler step ``e`` (0 after construction) the lr is
    ``initial_lr + (e + 1) / (warmup_steps + 1) * (base_lr - initial_lr)`` while
    ``e < warmup_steps``, then ``base_lr``.
    """

    def __init__(self, optimizer, initial_lr: float = 0, warmup_steps: int = 0, last_epoch: int = -1):
        self.initial_lr = initial_lr
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_lr(self) -> list[float]:
        e = self.last_epoch
        if e < self.warmup_steps:
            frac = (e + 1) / (self.warmup_steps + 1)
            return [self.initial_lr + frac * (lr - self.initial_lr) for lr in self.base_lrs]
        return list(self.base_lrs)


class CosineAnnealingWarmupLR(_LRScheduler):
    """Linear warmup for ``warmup_steps`` steps, then cosine annealing to ``eta_min``
    over the remaining ``total_steps - warmup_steps`` — ColossalAI's schedule, value for value.

    While ``last_epoch < warmup_steps`` the lr is ``(last_epoch + 1) / warmup_steps * base_lr``.
    From ``last_epoch == warmup_steps`` on, a torch ``CosineAnnealingLR`` built on
    the same optimizer (it was constructed first, as in ColossalAI) takes over:
    its ``base_lrs`` are set to ours, and each later :meth:`step` steps it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        eta_min: float = 0.0,
        last_epoch: int = -1,
    ):
        if int(warmup_steps) < 0:
            raise ValueError(f"CosineAnnealingWarmupLR: warmup_steps must be >= 0, got {warmup_steps!r}")
        if total_steps - warmup_steps <= 0:
            raise ValueError(
                f"CosineAnnealingWarmupLR: total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})"
            )
        self.after_scheduler = _TorchCosineAnnealingLR(
            optimizer, total_steps - warmup_steps, eta_min=eta_min, last_epoch=last_epoch
        )
        self.finished = False
        self.warmup_epochs = int(warmup_steps)
        super().__init__(optimizer, last_epoch)

    def _after_lr(self) -> list[float]:
        after = self.after_scheduler
        prev = after._get_lr_called_within_step
        after._get_lr_called_within_step = True  # we are inside our own step(): no misuse warning
        try:
            return after.get_lr()
        finally:
            after._get_lr_called_within_step = prev

    def get_lr(self) -> list[float]:
        if self.last_epoch >= self.warmup_epochs:
            if not self.finished:
                self.after_scheduler.base_lrs = self.base_lrs
                self.finished = True
            return self._after_lr()
        return [(self.last_epoch + 1) / self.warmup_epochs * lr for lr in self.base_lrs]

    def step(self, epoch: int | None = None) -> None:
        if not self.finished:
            return super().step(epoch)
        if epoch is None:
            self.after_scheduler.step(None)
        else:
            self.after_scheduler.step(epoch - self.warmup_epochs)
        self._last_lr = self.after_scheduler.get_last_lr()

    def state_dict(self) -> dict:
        """ColossalAI's layout: our attributes, with the cosine scheduler's state under ``after_scheduler_dict``."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "after_scheduler")}
        state["after_scheduler_type"] = type(self.after_scheduler).__name__
        state["after_scheduler_dict"] = self.after_scheduler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        state.pop("after_scheduler_type", None)
        after = state.pop("after_scheduler_dict", None)
        if after is not None:
            self.after_scheduler.load_state_dict(after)
        state.pop("after_scheduler", None)
        self.__dict__.update(state)
