"""Conditioning: the pure-PyTorch reference of the native ops
``opensora_fast::condition`` / ``condition_cat_`` (same checks, same messages).
The step-by-step ports of upstream's conditioning functions, the oracle for the
drop-ins in :mod:`opensora_fast.utils._condition`, are in
:mod:`opensora_fast.reference.upstream.condition`.

The plan
--------
A flat ``int[]`` of rows of 5: ``(sample, frame, count, source, source_frame)``.
Row ``r`` says: latent frames ``[frame, frame + count)`` of sample ``sample`` are
conditioned (mask 1) and take their values from frames
``[source_frame, source_frame + count)`` of ``sources[source]`` (``[C, Ts, H, W]``,
any strides; float32, bfloat16, float16 or float64), converted to the output
dtype as torch's ``copy_`` converts (c10's casts), every NaN written as one
canonical quiet NaN (torch's own conversions give different NaN bits in their
vector and scalar paths). Every frame no row names gets mask 0 and value
0. Rows of one sample must not overlap.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._checks import check_int64, find_overlap, is_dense, tensor_span
from ._nan import canonical_nan

# the reference's own copy of the op's contract (opensora_fast.ops.condition)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SRC_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ROW = 5


def check_condition_arguments(op: str, out: torch.Tensor, sources: Sequence[torch.Tensor], plan: Sequence[int]) -> None:
    """What the native schema takes: tensors, and plan values within int64 (the
    wrappers raise these where the schema parser would)."""
    arg = "cond" if op == "condition_cat_" else "z"
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: {arg} must be a tensor, got {type(out).__name__}")
    for i, s in enumerate(sources):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{op}: sources[{i}] must be a tensor, got {type(s).__name__}")
    check_int64(op, "plan", plan)


def check_source_grad(op: str, sources: Sequence[torch.Tensor]) -> None:
    """The ops are not differentiable: in grad mode a source that requires grad
    is refused (the native Autograd kernel's check, before the others)."""
    if torch.is_grad_enabled():
        for i, s in enumerate(sources):
            if s.requires_grad:
                raise ValueError(
                    f"{op}: sources[{i}] requires grad and grad mode is on; {op} is not differentiable: "
                    "detach the sources or call it under torch.no_grad()"
                )


def check_condition_inputs(op: str, out: torch.Tensor, sources: Sequence[torch.Tensor], plan: Sequence[int]) -> None:
    """The native op's checks in the same order with the same messages.
    ``op`` is "condition" (``out`` is z, ``[B, C, T, H, W]``) or "condition_cat_"
    (``out`` is cond, ``[B, 1 + C, T, H, W]``, written in place)."""
    cat = op == "condition_cat_"
    arg = "cond" if cat else "z"
    want = "[B, 1 + C, T, H, W]" if cat else "[B, C, T, H, W]"
    check_condition_arguments(op, out, sources, plan)
    if not is_dense(out):  # first: a nested tensor has no shape to read
        raise ValueError(f"{op}: {arg} must be a dense (strided) tensor")
    if out.dim() != 5 or (cat and out.shape[1] < 1):
        raise ValueError(f"{op}: {arg} must be {want}, got shape {list(out.shape)}")
    if out.dtype not in OUT_DTYPES:
        raise TypeError(f"{op}: {arg} must be float32, bfloat16, float16 or float64")
    if cat and not out.is_contiguous():
        raise ValueError(f"{op}: cond must be contiguous")
    if cat and out.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{op}: cond is an inference tensor; it can only be written in place inside torch.inference_mode()"
        )
    B, C, T, H, W = out.shape
    if cat:
        C -= 1
    for i, s in enumerate(sources):
        if not is_dense(s):
            raise ValueError(f"{op}: sources[{i}] must be a dense (strided) tensor")
        if s.dim() != 4:
            raise ValueError(f"{op}: sources[{i}] must be [C, T, H, W], got shape {list(s.shape)}")
        if s.dtype not in SRC_DTYPES:
            raise TypeError(f"{op}: sources[{i}] must be float32, bfloat16, float16 or float64")
        if s.device != out.device:
            raise ValueError(f"{op}: sources[{i}] is on {s.device} but {arg} is on {out.device}")
        if s.shape[0] != C or s.shape[2] != H or s.shape[3] != W:
            raise ValueError(
                f"{op}: sources[{i}] has shape {list(s.shape)}; expected [C, *, H, W] = [{C}, *, {H}, {W}]"
            )
    if cat and out.device.type != "meta":
        # address ranges, as ema_update_ and unpad_ (csrc/condition/condition.cpp)
        storages: dict = {}
        spans = [tensor_span(out, True, "cond", -1, storages, strided=True)]
        spans += [tensor_span(s, False, "sources", i, storages, strided=True) for i, s in enumerate(sources)]
        hit = find_overlap(spans)
        if hit is not None:
            src = hit[1] if hit[0].written else hit[0]
            raise ValueError(f"{op}: sources[{src.index}] shares memory with cond")
    if len(plan) % ROW != 0:
        raise ValueError(
            f"{op}: plan must hold rows of 5 ints (sample, frame, count, source, source_frame), got {len(plan)} ints"
        )
    rows = [tuple(int(v) for v in plan[k : k + ROW]) for k in range(0, len(plan), ROW)]
    for r, (b, t0, n, s, f0) in enumerate(rows):
        if not 0 <= b < B:
            raise ValueError(f"{op}: plan row {r}: sample {b} is outside [0, {B})")
        if not (n >= 1 and 0 <= t0 <= T and n <= T - t0):
            raise ValueError(f"{op}: plan row {r}: frame {t0}, count {n} do not fit in T={T}")
        if not 0 <= s < len(sources):
            raise ValueError(f"{op}: plan row {r}: source {s} is outside [0, {len(sources)})")
        Ts = sources[s].shape[1]
        if not (0 <= f0 <= Ts and n <= Ts - f0):
            raise ValueError(
                f"{op}: plan row {r}: source_frame {f0}, count {n} do not fit in sources[{s}] with {Ts} frames"
            )
    order = sorted(range(len(rows)), key=lambda r: (rows[r][0], rows[r][1], r))
    for p, q in zip(order, order[1:]):
        if rows[p][0] == rows[q][0] and rows[p][1] + rows[p][2] > rows[q][1]:
            raise ValueError(f"{op}: plan rows {min(p, q)} and {max(p, q)} overlap (sample {rows[p][0]})")


def _fill(masks: torch.Tensor, masked: torch.Tensor, sources, plan) -> None:
    for k in range(0, len(plan), ROW):
        b, t0, n, s, f0 = (int(v) for v in plan[k : k + ROW])
        masks[b, :, t0 : t0 + n] = 1
        masked[b, :, t0 : t0 + n] = sources[s][:, f0 : f0 + n]  # torch's conversion (copy_)
        part = masked[b, :, t0 : t0 + n]
        part.copy_(torch.where(part.isnan(), canonical_nan(part.dtype, part.device), part))  # one NaN


def condition(z: torch.Tensor, sources: Sequence[torch.Tensor], plan: Sequence[int]):
    """Reference of ``opensora_fast::condition``: ``(masks [B,1,T,H,W], masked [B,C,T,H,W])``
    in z's dtype on z's device (z's values are not read)."""
    check_condition_arguments("condition", z, sources, plan)
    check_source_grad("condition", sources)
    check_condition_inputs("condition", z, sources, plan)
    B, C, T, H, W = z.shape
    masks = torch.zeros((B, 1, T, H, W), dtype=z.dtype, device=z.device)
    masked = torch.zeros((B, C, T, H, W), dtype=z.dtype, device=z.device)
    _fill(masks, masked, sources, plan)
    return masks, masked


def condition_cat_(cond: torch.Tensor, sources: Sequence[torch.Tensor], plan: Sequence[int]) -> None:
    """Reference of ``opensora_fast::condition_cat_``: writes all of
    ``cond = cat(masks, masks * latent)`` ``[B, 1 + C, T, H, W]`` in place."""
    check_condition_arguments("condition_cat_", cond, sources, plan)
    if torch.is_grad_enabled() and cond.requires_grad:
        raise RuntimeError(
            "condition_cat_: cond requires grad and grad mode is on; condition_cat_ is not differentiable: "
            "call it under torch.no_grad()"
        )
    check_source_grad("condition_cat_", sources)
    check_condition_inputs("condition_cat_", cond, sources, plan)
    cond.zero_()
    _fill(cond[:, :1], cond[:, 1:], sources, plan)
