"""Drop-in for ``opensora.utils.train``: ``from opensora_fast.utils.train import update_ema``."""
from __future__ import annotations

import operator
import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..ops import ema_update_, masked_mse
from ..ops.masked_mse import loss_ranges as _loss_ranges
from ..optim import fused_ema_step_taken

__all__ = ["update_ema", "get_batch_loss", "loss_token_ranges"]

_grad_and_dtype = operator.attrgetter("requires_grad", "dtype")

_ROUNDING = ("compat", "stochastic")


def _snapshot(module: torch.nn.Module) -> list:
    """Every parameter slot of every submodule, in order (None slots and shared
    parameters included): a cheap fingerprint that changes whenever a parameter
    is replaced, added or deleted, however it was done (``m.w = P``,
    ``m._parameters["w"] = P``, ``del m.b``, a replaced submodule)."""
    out = []
    for m in module.modules():
        out.extend(m._parameters.values())
    return out


def _same_objects(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


class _Plan:
    """The (ema, src) pairing of one (ema_model, model, optimizer, sharded) and
    what it was derived from, checked every step before it is reused. It holds
    the parameter objects themselves, so their ids cannot be reused while it
    lives, and ``p.data = x`` is seen without re-deriving."""

    __slots__ = ("sharded", "model_slots", "ema_slots", "params", "attrs", "ema", "src", "mastered")

    def still_valid(self, ema_model, model, masters, sharded) -> bool:
        if sharded != self.sharded:
            return False
        if not _same_objects(_snapshot(model), self.model_slots):
            return False
        if not _same_objects(_snapshot(ema_model), self.ema_slots):
            return False
        if list(map(_grad_and_dtype, self.params)) != self.attrs:
            return False
        if self.mastered:  # each master shard still the one the map holds now
            if masters is None:
                return False
            get = masters.get
            if not all(get(id(p)) is m for p, m in self.mastered):
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
    plan.model_slots, plan.ema_slots = _snapshot(model), _snapshot(ema_model)
    plan.params = list(model.parameters())
    plan.attrs = list(map(_grad_and_dtype, plan.params))
    plan.ema, plan.src, plan.mastered = [], [], []
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
            plan.mastered.append((param, src))
        else:
            src = param
        plan.ema.append(ema_named[name])
        plan.src.append(src)
    return plan


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
    same ``sharded``; any change re-derives it. As upstream, parameters of any
    strides (channels_last, transposed, views) and a 0-dim tensor ``decay`` work.

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
    plan = _plans.get(ema_model)
    if plan is None or not plan.still_valid(ema_model, model, masters, bool(sharded)):
        plan = _derive(ema_model, model, optimizer, bool(sharded), masters)
        _plans[ema_model] = plan
    value, same_alpha = _decay_value(decay)
    if not same_alpha and rounding == "compat":  # a bf16/fp16 tensor decay: upstream's own two ops
        for e, s in zip(plan.ema, plan.src):
            e.mul_(decay).add_(s, alpha=1 - decay)
        return
    decay = value
    stochastic = rounding == "stochastic"
    try:
        ema_update_(plan.ema, plan.src, decay, stochastic=stochastic, generator=generator)
    except ValueError:
        # Checked before any write, so nothing was written. Non-contiguous
        # parameters run as upstream runs them; anything else re-raises.
        if all(t.is_contiguous() for t in plan.ema) and all(t.is_contiguous() for t in plan.src):
            raise
        ema, src, back = _contiguous_pairs(plan.ema, plan.src)
        ema_update_(ema, src, decay, stochastic=stochastic, generator=generator)
        for dst, tmp in back:
            dst.copy_(tmp)


_EXCLUDE = ("upstream", "conditioned")


def _frame_mask(masks: torch.Tensor) -> torch.Tensor:
    """[B, T, H, W] or [B, 1, T, H, W] -> [B, T] (upstream reads masks[:, :, 0, 0])."""
    if masks.dim() == 5:
        if masks.shape[1] != 1:
            raise ValueError(f"get_batch_loss: 5-D masks must be [B, 1, T, H, W], got {list(masks.shape)}")
        return masks[:, 0, :, 0, 0]
    if masks.dim() == 4:
        return masks[:, :, 0, 0]
    raise ValueError(f"get_batch_loss: masks must be [B, T, H, W] or [B, 1, T, H, W], got {list(masks.shape)}")


def loss_token_ranges(
    masks: torch.Tensor, seq_len: Optional[int] = None, *, patch_size: int = 2, exclude: str = "upstream"
) -> torch.Tensor:
    """Token range ``[start, end)`` per sample that ``get_batch_loss`` averages over.

    Built on the masks' device by one native launch (:func:`opensora_fast.ops.loss_ranges`; no host sync). Frames are
    t-major in the packed ``b (t h w) (c ph pw)`` layout, so frame f holds tokens
    ``[f*hw, (f+1)*hw)`` with ``hw = (H/patch) * (W/patch)``.

    exclude:
        ``"upstream"``: drop frame 0 when it is conditioned (== 1) and no interior
        frame is, the last frame likewise (upstream's rule: a multi-frame v2v
        condition keeps every frame in the loss).
        ``"conditioned"``: drop the whole leading and trailing runs of
        conditioned frames (i2v head/tail/loop, v2v head/tail alike). Interior
        conditioned frames that touch neither end stay in.
    A sample left with no frame gets an empty range (its loss is NaN, as upstream).
    """
    if exclude not in _EXCLUDE:
        raise ValueError(f"get_batch_loss: exclude must be one of {_EXCLUDE}, got {exclude!r}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"get_batch_loss: patch_size must be a positive int, got {patch_size!r}")
    frame = _frame_mask(masks)  # a view: nothing launched
    T, H, W = masks.shape[-3:]
    if T == 0:
        raise ValueError(f"get_batch_loss: masks have no frames (T=0), shape {list(masks.shape)}")
    if H % patch_size or W % patch_size:
        raise ValueError(
            f"get_batch_loss: patch_size={patch_size} does not divide the masks' H={H} and W={W}"
        )
    hw = (H // patch_size) * (W // patch_size)
    if seq_len is not None and T * hw != seq_len:
        raise ValueError(
            f"get_batch_loss: masks give T*(H/p)*(W/p) = {T}*{H // patch_size}*{W // patch_size} = {T * hw} "
            f"tokens but model_pred has L={seq_len} (patch_size={patch_size})"
        )
    return _loss_ranges(frame, hw, exclude == "upstream")


_whole_ranges: Dict[Tuple[torch.device, int, int], torch.Tensor] = {}


def _whole_range(device: torch.device, n: int) -> torch.Tensor:
    """The [[0, n]] ranges tensor on ``device``, made once per (device, n, CUDA
    stream): the unmasked loss then launches nothing but the loss kernels.
    Read-only. Per stream, because its fill and its memory are ordered on the
    stream that made it."""
    if not _cacheable():
        return _new_whole_range(device, n)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, n, stream)
    r = _whole_ranges.get(key)
    if r is None:
        r = _new_whole_range(device, n)
        # Not kept when captured (a captured fill has not run yet), nor an
        # inference tensor (inference mode: autograd could not save it later).
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not (capturing or r.is_inference()):
            if len(_whole_ranges) >= 64:  # a run sees a few sizes; never grow without bound
                _whole_ranges.clear()
            _whole_ranges[key] = r
    return r


def _new_whole_range(device: torch.device, n: int) -> torch.Tensor:
    r = torch.zeros((1, 2), dtype=torch.int64, device=device)
    r[:, 1].fill_(n)  # a fill on the device: no host-to-device copy
    return r


def _cacheable() -> bool:
    """Whether _whole_range may read or keep its cache here: not while traced
    (compile, a fake or other dispatch mode: its tensors are not real, and real
    ones are foreign inputs to it) nor under a torch.func transform."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._are_functorch_transforms_active()
    )


def get_batch_loss(
    model_pred: torch.Tensor,
    v_t: torch.Tensor,
    masks: Optional[torch.Tensor] = None,
    *,
    patch_size: int = 2,
    exclude: str = "upstream",
) -> torch.Tensor:
    """Upstream's flow-matching loss in one fused pass (forward and backward).

    Same results as ``opensora.utils.train.get_batch_loss`` up to fp32 rounding:
    without masks the mean of ``(pred - v_t)^2`` over everything, accumulated in
    fp32 as ``F.mse_loss(pred.float(), v_t.float())`` is but in another (fixed)
    summation order, so the two differ by ~1e-7 to ~2e-6 relative, not bit for
    bit; with masks ``[B, T, H, W]`` (or ``[B, 1, T, H, W]``, which
    upstream rejects) the mean over samples of each sample's mean over its kept
    frames (see :func:`loss_token_ranges`), for packed ``[B, L, D]`` inputs.
    Accumulates in fp32 without fp32 copies of the inputs, no host sync.

    Beyond upstream (keyword-only): ``patch_size`` (upstream hard-codes 2; the
    DC-AE configs use 1) and ``exclude="conditioned"``.

    A sample with no frame left (e.g. T=1 with its frame conditioned) makes the
    loss NaN, exactly as upstream's mean over an empty slice; its gradient stays
    finite (zero for that sample).
    """
    if model_pred.shape != v_t.shape:
        raise ValueError(f"get_batch_loss: model_pred has shape {list(model_pred.shape)} but v_t has shape {list(v_t.shape)}")
    if model_pred.dtype != v_t.dtype:
        raise TypeError(f"get_batch_loss: model_pred has dtype {model_pred.dtype} but v_t has dtype {v_t.dtype}")
    if model_pred.device != v_t.device:
        raise ValueError(f"get_batch_loss: model_pred is on {model_pred.device} but v_t is on {v_t.device}")
    if masks is None:
        if model_pred.numel() == 0:  # upstream's mean over nothing: NaN (fp32), with a graph
            return F.mse_loss(model_pred.float(), v_t.float(), reduction="mean")
        # Every element counts once: the global mean, as one sample of N elements
        # (fp32 sum over all N, one division, as F.mse_loss; any N launches).
        pred3, target3 = model_pred.reshape(1, -1, 1), v_t.reshape(1, -1, 1)
        return masked_mse(pred3.contiguous(), target3.contiguous(), _whole_range(pred3.device, pred3.shape[1])).float()
    if model_pred.dim() != 3:
        raise ValueError(f"get_batch_loss: with masks, model_pred must be packed [B, L, D], got {list(model_pred.shape)}")
    if masks.device != model_pred.device:
        raise ValueError(f"get_batch_loss: masks is on {masks.device} but model_pred is on {model_pred.device}")
    if masks.shape[0] != model_pred.shape[0]:
        raise ValueError(f"get_batch_loss: masks has batch {masks.shape[0]} but model_pred has {model_pred.shape[0]}")
    ranges = loss_token_ranges(masks, model_pred.shape[1], patch_size=patch_size, exclude=exclude)
    # fp32 as upstream (which casts to float first), also for fp64 inputs
    return masked_mse(model_pred.contiguous(), v_t.contiguous(), ranges).float()


# ======================================================
# The rest of upstream's train.py: lr/eps setters, device set-up, plugins, conditioning dropout
# ======================================================
# Plain Python ports, importable without colossalai (its plugins are imported lazily).

import warnings as _warnings  # noqa: E402
from datetime import timedelta as _timedelta  # noqa: E402

import torch.distributed as _dist  # noqa: E402

from .misc import set_data_parallel_group, set_sequence_parallel_group, set_tensor_parallel_group  # noqa: E402
from .optimizer import LinearWarmupLR  # noqa: E402

__all__ += [
    "set_lr",
    "set_warmup_steps",
    "set_eps",
    "setup_device",
    "create_colossalai_plugin",
    "PLUGINS",
    "dropout_condition",
    "warmup_ae",
]

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
        _warnings.warn("Dropout probability is 0, skipping dropout")
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


# Training-time conditioning (native op `condition_cat_`), written in _condition.py.
from ._condition import prepare_visual_condition_causal, prepare_visual_condition_uncausal  # noqa: E402

__all__ += ["prepare_visual_condition_causal", "prepare_visual_condition_uncausal"]
