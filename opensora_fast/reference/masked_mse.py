"""Reference of ``opensora_fast::masked_mse`` (and, through autograd, of
``masked_mse_backward``): pure PyTorch, no host sync, differentiable to any
order."""

from __future__ import annotations

import operator

import torch

from ._checks import shape_str

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _dense(t: torch.Tensor) -> bool:
    """Strided and not nested (a strided-layout nested tensor has no sizes)."""
    return t.layout == torch.strided and not t.is_nested


def check_inputs(pred: torch.Tensor, target: torch.Tensor, ranges: torch.Tensor) -> None:
    """The native op's checks, in its order and with its messages (csrc/masked_mse/masked_mse.cpp)."""
    for name, t in (("pred", pred), ("target", target), ("ranges", ranges)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"masked_mse: {name} must be a tensor, got {type(t).__name__}")
    if not (_dense(pred) and _dense(target) and _dense(ranges)):
        raise ValueError("masked_mse: pred, target and ranges must be dense (strided) tensors")
    if pred.dim() != 3:
        raise ValueError(f"masked_mse: pred must be [B, L, D], got shape {shape_str(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(
            f"masked_mse: target has shape {shape_str(target.shape)} but pred has shape {shape_str(pred.shape)}"
        )
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
        raise ValueError(f"masked_mse: ranges must be [B, 2] = [{pred.shape[0]}, 2], got {shape_str(ranges.shape)}")
    if not (pred.is_contiguous() and target.is_contiguous() and ranges.is_contiguous()):
        raise ValueError("masked_mse: pred, target and ranges must be contiguous")


def check_grad(grad: torch.Tensor, pred: torch.Tensor) -> None:
    """The native backward's check of the incoming gradient."""
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"masked_mse_backward: grad must be a tensor, got {type(grad).__name__}")
    if not _dense(grad):
        raise ValueError("masked_mse_backward: grad must be a dense (strided) tensor")
    if grad.dim() != 0:
        raise ValueError(f"masked_mse_backward: grad must be a scalar (0-dim), got shape {shape_str(grad.shape)}")
    if grad.dtype not in _DTYPES:
        raise TypeError(
            f"masked_mse_backward: grad has dtype {grad.dtype}; expected float32, bfloat16, float16 or float64"
        )
    if grad.device != pred.device:
        raise ValueError(f"masked_mse_backward: grad is on {grad.device} but pred is on {pred.device}")


_INT64_MAX = 2**63 - 1

# Frame-mask dtypes loss_ranges reads, on both backends (csrc: OSF_MASK_TYPES):
# every real and bool dtype torch can compare with 1 (not the sub-byte or bits ones).
MASK_DTYPES = frozenset(
    [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32]
    + [torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e5m2]
    + [torch.float8_e5m2fnuz, torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e8m0fnu]
)


def _as_int(hw) -> int:
    """hw as an int (anything with __index__, a SymInt when traced); a bool or a float is refused."""
    if isinstance(hw, torch.SymInt):
        return hw
    if not isinstance(hw, bool):
        try:
            return operator.index(hw)
        except TypeError:
            pass
    raise TypeError(f"loss_ranges: hw must be an int, got {type(hw).__name__}")


def check_loss_ranges(frame_mask: torch.Tensor, hw: int) -> int:
    """The native loss_ranges op's checks, in its order and with its messages;
    returns ``hw`` as an int."""
    if not isinstance(frame_mask, torch.Tensor):
        raise TypeError(f"loss_ranges: frame_mask must be a tensor, got {type(frame_mask).__name__}")
    if not _dense(frame_mask):
        raise ValueError("loss_ranges: frame_mask must be a dense (strided) tensor")
    if frame_mask.dim() != 2:
        raise ValueError(f"loss_ranges: frame_mask must be [B, T], got shape {shape_str(frame_mask.shape)}")
    if frame_mask.dtype not in MASK_DTYPES:
        raise TypeError(f"loss_ranges: frame_mask has dtype {frame_mask.dtype}; expected a real or bool dtype")
    T = frame_mask.shape[1]
    if T < 1:
        raise ValueError("loss_ranges: frame_mask has no frames (T=0)")
    hw = _as_int(hw)
    if hw < 0:
        raise ValueError(f"loss_ranges: hw must be >= 0, got {hw}")
    if T * hw > _INT64_MAX:  # the last range ends at T * hw
        raise ValueError(f"loss_ranges: T * hw = {T} * {hw} does not fit in int64")
    return hw


def loss_ranges(frame_mask: torch.Tensor, hw: int, upstream: bool) -> torch.Tensor:
    """Token ranges ``[B, 2]`` (int64) that get_batch_loss averages over, from a
    ``[B, T]`` frame mask (a frame is conditioned where it == 1). ``upstream``:
    frame 0 (and frame T-1) is dropped when conditioned and no interior frame
    is; else the leading and trailing runs of conditioned frames are dropped.
    Tensor ops on the mask's device, no host sync."""
    hw = check_loss_ranges(frame_mask, hw)
    m = frame_mask == 1
    T = m.shape[1]
    if upstream:
        lone = ~m[:, 1:-1].any(dim=1)
        start = (m[:, 0] & lone).long()
        end = T - (m[:, -1] & lone).long()
    else:
        start = m.long().cumprod(dim=1).sum(dim=1)
        end = T - m.flip(1).long().cumprod(dim=1).sum(dim=1)
    return torch.stack([start, torch.maximum(end, start)], dim=1) * hw


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _token_weights(ranges: torch.Tensor, B: int, L: int, D: int, acc: torch.dtype):
    """inside [B, L, 1] (bool) and count_b = elements in sample b's range [B] (in acc)."""
    start = ranges[:, 0].clamp(0, L)
    end = torch.maximum(ranges[:, 1].clamp(0, L), start)
    tok = torch.arange(L, device=ranges.device)
    inside = (tok >= start[:, None]) & (tok < end[:, None])
    count = ((end - start) * D).to(acc)
    return inside[:, :, None], count


def masked_mse(pred: torch.Tensor, target: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """mean over b of the mean of (pred - target)^2 over tokens [ranges[b,0], ranges[b,1])
    and all of D. Ranges are clamped to [0, L] with end >= start; an empty range
    gives NaN (upstream's mean over an empty slice) and no gradient. Tokens
    outside the ranges are never read into the result: NaN/Inf there changes
    neither the loss nor the gradient (a select, not a multiply by 0)."""
    check_inputs(pred, target, ranges)
    B, L, D = pred.shape
    acc = acc_dtype(pred.dtype)
    if B == 0:  # NaN, as the mean of no samples; still on pred's graph (an empty gradient)
        return pred.to(acc).sum() + float("nan")
    inside, count = _token_weights(ranges, B, L, D, acc)
    diff = torch.where(inside, pred.to(acc) - target.to(acc), torch.zeros((), dtype=acc, device=pred.device))
    per = diff.pow(2).sum((1, 2))
    # where() on a safe denominator, so an empty sample gets NaN but no NaN gradient
    per = torch.where(count > 0, per / count.clamp_min(1), torch.full_like(per, float("nan")))
    return per.mean()


def masked_mse_backward(
    grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, ranges: torch.Tensor
) -> torch.Tensor:
    """d masked_mse / d pred times grad, in pred's dtype: 2 (pred - target) grad / (count_b B)
    inside the range, 0 outside, with the native kernels' roundings (differences
    and products in fp32, or fp64 for fp64; one rounding to pred's dtype).
    Written in differentiable ops, so it is also the double backward."""
    check_inputs(pred, target, ranges)
    check_grad(grad, pred)
    B, L, D = pred.shape
    acc = acc_dtype(pred.dtype)
    inside, count = _token_weights(ranges, B, L, D, acc)
    # g / (count_b * B), 0 for an empty range: csrc grad_scale, rounding for rounding
    denom = count * B
    scale = torch.where(count > 0, grad.to(acc) / denom.clamp_min(1), torch.zeros_like(denom))[:, None, None]
    g = (pred.to(acc) - target.to(acc)) * (2 * scale)
    return torch.where(inside, g, torch.zeros((), dtype=acc, device=pred.device)).to(pred.dtype)
