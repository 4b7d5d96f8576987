"""``get_batch_loss`` (the drop-in of upstream's ``opensora.utils.train.get_batch_loss``)
on the fused masked-MSE op, and ``loss_token_ranges``. Re-exported by
:mod:`opensora_fast.utils.train`."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..ops import masked_mse
from ..ops.masked_mse import loss_ranges as _loss_ranges

__all__ = ["get_batch_loss", "loss_token_ranges"]

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
        raise ValueError(f"get_batch_loss: patch_size={patch_size} does not divide the masks' H={H} and W={W}")
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
        raise ValueError(
            f"get_batch_loss: model_pred has shape {list(model_pred.shape)} but v_t has shape {list(v_t.shape)}"
        )
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
        raise ValueError(
            f"get_batch_loss: with masks, model_pred must be packed [B, L, D], got {list(model_pred.shape)}"
        )
    if masks.device != model_pred.device:
        raise ValueError(f"get_batch_loss: masks is on {masks.device} but model_pred is on {model_pred.device}")
    if masks.shape[0] != model_pred.shape[0]:
        raise ValueError(f"get_batch_loss: masks has batch {masks.shape[0]} but model_pred has {model_pred.shape[0]}")
    ranges = loss_token_ranges(masks, model_pred.shape[1], patch_size=patch_size, exclude=exclude)
    # fp32 as upstream (which casts to float first), also for fp64 inputs
    return masked_mse(model_pred.contiguous(), v_t.contiguous(), ranges).float()
