"""Reference of ``opensora_fast::masked_mse`` (and, through autograd, of
``masked_mse_backward``): pure PyTorch, no host sync."""
from __future__ import annotations

import torch

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_mse_inputs(pred: torch.Tensor, target: torch.Tensor, ranges: torch.Tensor) -> None:
    """The native op's checks, for the reference path and the fake (same messages)."""
    if pred.dim() != 3:
        raise ValueError(f"masked_mse: pred must be [B, L, D], got shape {list(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"masked_mse: target has shape {list(target.shape)} but pred has shape {list(pred.shape)}")
    if pred.dtype not in _DTYPES:
        raise TypeError(f"masked_mse: pred has dtype {pred.dtype}; expected float32, bfloat16, float16 or float64")
    if target.dtype != pred.dtype:
        raise TypeError(f"masked_mse: target has dtype {target.dtype} but pred has dtype {pred.dtype}")
    if target.device != pred.device:
        raise ValueError(f"masked_mse: target is on {target.device} but pred is on {pred.device}")
    if ranges.device != pred.device:
        raise ValueError(f"masked_mse: ranges is on {ranges.device} but pred is on {pred.device}")
    if ranges.dtype != torch.int64:
        raise TypeError(f"masked_mse: ranges must be int64, got {ranges.dtype}")
    if ranges.dim() != 2 or ranges.shape[0] != pred.shape[0] or ranges.shape[1] != 2:
        raise ValueError(f"masked_mse: ranges must be [B, 2] = [{pred.shape[0]}, 2], got {list(ranges.shape)}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_mse(pred: torch.Tensor, target: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """mean over b of the mean of (pred - target)^2 over tokens [ranges[b,0], ranges[b,1])
    and all of D. Ranges are clamped to [0, L] with end >= start; an empty range
    gives NaN (upstream's mean over an empty slice) and no gradient."""
    check_mse_inputs(pred, target, ranges)
    B, L, D = pred.shape
    acc = acc_dtype(pred.dtype)
    if B == 0:
        return torch.full((), float("nan"), dtype=acc, device=pred.device)
    start = ranges[:, 0].clamp(0, L)
    end = torch.maximum(ranges[:, 1].clamp(0, L), start)
    tok = torch.arange(L, device=pred.device)
    inside = (tok >= start[:, None]) & (tok < end[:, None])
    sq = (pred.to(acc) - target.to(acc)).pow(2).sum(-1)
    count = ((end - start) * D).to(acc)
    per = (sq * inside).sum(1)
    # where() on a safe denominator, so an empty sample gets NaN but no NaN gradient
    per = torch.where(count > 0, per / count.clamp_min(1), torch.full_like(per, float("nan")))
    return per.mean()
