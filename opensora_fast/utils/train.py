"""Drop-in for ``opensora.utils.train``: ``from opensora_fast.utils.train import update_ema``.

A facade: ``update_ema`` is written in :mod:`._ema`, ``get_batch_loss`` and
``loss_token_ranges`` in :mod:`._loss`, the training-time conditioning (native op
``condition_cat_``) in :mod:`._condition`; the rest of upstream's train.py
(lr/eps setters, device set-up, plugins, conditioning dropout) is below."""

from __future__ import annotations

import warnings as _warnings
from datetime import timedelta as _timedelta
from typing import Optional

import torch
import torch.distributed as _dist

from ._condition import prepare_visual_condition_causal, prepare_visual_condition_uncausal
from ._ema import update_ema
from ._loss import get_batch_loss, loss_token_ranges
from .misc import set_data_parallel_group, set_sequence_parallel_group, set_tensor_parallel_group
from .optimizer import LinearWarmupLR

__all__ = [
    "update_ema",
    "get_batch_loss",
    "loss_token_ranges",
    "set_lr",
    "set_warmup_steps",
    "set_eps",
    "setup_device",
    "create_colossalai_plugin",
    "PLUGINS",
    "dropout_condition",
    "warmup_ae",
    "prepare_visual_condition_causal",
    "prepare_visual_condition_uncausal",
]

# their public home, as before the split (what patch reports, what pickle and docs name)
for _fn in (update_ema, get_batch_loss, loss_token_ranges):
    _fn.__module__ = __name__
del _fn


# ======================================================
# The rest of upstream's train.py: lr/eps setters, device set-up, plugins, conditioning dropout
# ======================================================
# Plain Python ports, importable without colossalai (its plugins are imported lazily).

PLUGINS = ("zero1", "zero2", "hybrid")


def _is_linear_warmup(lr_scheduler) -> bool:
    # Open-Sora's own LinearWarmupLR counts too when a script mixes both packages.
    return isinstance(lr_scheduler, LinearWarmupLR) or (
        type(lr_scheduler).__name__ == "LinearWarmupLR" and hasattr(lr_scheduler, "initial_lr")
    )


def set_lr(optimizer: torch.optim.Optimizer, lr_scheduler, lr: float, initial_lr: Optional[float] = None) -> None:
    """Set every param group's lr; a :class:`LinearWarmupLR` also gets ``base_lrs = [lr]*n``
    (and ``initial_lr`` when given)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if _is_linear_warmup(lr_scheduler):
        lr_scheduler.base_lrs = [lr] * len(lr_scheduler.base_lrs)
        if initial_lr is not None:
            lr_scheduler.initial_lr = initial_lr


def set_warmup_steps(lr_scheduler, warmup_steps: int) -> None:
    """Set the warmup length of a :class:`LinearWarmupLR` (other schedulers are left alone)."""
    if _is_linear_warmup(lr_scheduler):
        lr_scheduler.warmup_steps = warmup_steps


def set_eps(optimizer: torch.optim.Optimizer, eps: Optional[float] = None) -> None:
    """Set every param group's ``eps`` (nothing when ``eps`` is None)."""
    if eps is not None:
        for group in optimizer.param_groups:
            group["eps"] = eps


def setup_device(backend: Optional[str] = None, timeout: _timedelta = _timedelta(hours=24)):
    """Initialise the default process group and pick this rank's device.

    Returns ``(device, coordinator)``: ColossalAI's ``DistCoordinator`` when
    colossalai is installed, else a small object with the same basics (``rank``,
    ``world_size``, ``local_rank``, ``is_master()``, ``block_all()``).

    Upstream requires CUDA and NCCL. Ours: ``backend=None`` picks NCCL when CUDA
    is available, else gloo on the CPU; ``backend="gloo"`` forces gloo (with the
    CUDA device still selected when present). The 24-hour timeout is upstream's.
    Reuses an already initialised process group.
    """
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"setup_device: unknown backend {backend!r}; accepted: 'nccl', 'gloo' (or None)")
    if backend == "nccl" and not cuda:
        raise RuntimeError("setup_device: backend 'nccl' needs CUDA; pass backend='gloo' for CPU training")
    if not _dist.is_initialized():
        _dist.init_process_group(backend=backend, timeout=timeout)
    if cuda:
        torch.cuda.set_device(_dist.get_rank() % torch.cuda.device_count())
        device = torch.device(f"cuda:{torch.cuda.current_device()}")
    else:
        device = torch.device("cpu")
    try:
        from colossalai.cluster import DistCoordinator
    except ImportError:
        coordinator = _Coordinator()
    else:
        coordinator = DistCoordinator()
    return device, coordinator


class _Coordinator:
    """The part of ColossalAI's DistCoordinator that training scripts use."""

    def __init__(self):
        import os

        self.rank = _dist.get_rank()
        self.world_size = _dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))

    def is_master(self) -> bool:
        return self.rank == 0

    def block_all(self) -> None:
        _dist.barrier()

    def print_on_master(self, msg: str) -> None:
        if self.is_master():
            print(msg)


def create_colossalai_plugin(plugin: str, dtype: str, grad_clip: float, **kwargs):
    """A ColossalAI booster plugin: "zero1"/"zero2" (``LowLevelZeroPlugin``) or "hybrid"
    (``HybridParallelPlugin``), with upstream's defaults (initial_scale 2**16,
    overlap_allgather, 20 MB buckets, ...); ``kwargs`` override them. Registers the
    data/tensor/sequence parallel groups. Needs ``pip install opensora_fast[colossalai]``.
    """
    if plugin not in PLUGINS:
        raise ValueError(f"Unknown plugin {plugin!r}; accepted: {', '.join(PLUGINS)}")
    try:
        from colossalai.booster.plugin import HybridParallelPlugin, LowLevelZeroPlugin
    except ImportError as e:
        raise ImportError(
            f"create_colossalai_plugin({plugin!r}) needs ColossalAI: pip install opensora_fast[colossalai]"
        ) from e
    plugin_kwargs = dict(
        precision=dtype,
        initial_scale=2**16,
        max_norm=grad_clip,
        overlap_allgather=True,
        cast_inputs=False,
        reduce_bucket_size_in_m=20,
    )
    plugin_kwargs.update(kwargs)
    if plugin in ("zero1", "zero2"):
        sp_size = plugin_kwargs.get("sp_size", 1)
        if sp_size != 1:
            raise ValueError(f"Zero plugin does not support sequence parallelism (sp_size={sp_size})")
        out = LowLevelZeroPlugin(stage=1 if plugin == "zero1" else 2, **plugin_kwargs)
        set_data_parallel_group(_dist.group.WORLD)
        return out
    plugin_kwargs["find_unused_parameters"] = True
    bucket = plugin_kwargs.pop("reduce_bucket_size_in_m")
    plugin_kwargs.setdefault("zero_bucket_size_in_m", bucket)
    plugin_kwargs.pop("cast_inputs")
    plugin_kwargs["enable_metadata_cache"] = False
    custom_policy = plugin_kwargs.pop("custom_policy", None)
    if custom_policy is not None:
        custom_policy = custom_policy()
    out = HybridParallelPlugin(custom_policy=custom_policy, **plugin_kwargs)
    set_tensor_parallel_group(out.tp_group)
    set_sequence_parallel_group(out.sp_group)
    set_data_parallel_group(out.dp_group)
    return out


def dropout_condition(prob: float, txt: torch.Tensor, null_txt: torch.Tensor) -> torch.Tensor:
    """Replace each sample of ``txt`` (dim 0) by ``null_txt`` with probability ``prob``.

    One ``torch.rand(B)`` draw on ``txt``'s device, as upstream (same RNG stream);
    warns when ``prob == 0``.
    """
    if prob == 0:
        _warnings.warn("Dropout probability is 0, skipping dropout", stacklevel=2)
    drop = torch.rand(txt.shape[0], device=txt.device) < prob
    drop = drop.view((drop.shape[0],) + (1,) * (txt.ndim - 1))
    return torch.where(drop, null_txt, txt)


@torch.no_grad()
def warmup_ae(model_ae: torch.nn.Module, shapes: list, device: torch.device, dtype: torch.dtype) -> None:
    """Run ``model_ae.encode`` once on random input of each shape (a progress bar on rank 0 when tqdm is installed).

    Unlike upstream, works without an initialised process group and without tqdm."""
    show = not (_dist.is_available() and _dist.is_initialized()) or _dist.get_rank() == 0
    try:
        from tqdm import tqdm
    except ImportError:
        it = shapes
    else:
        it = tqdm(shapes, desc="Warmup AE", disable=not show)
    for shape in it:
        x = torch.randn(*shape, device=device, dtype=dtype)
        model_ae.encode(x)
