"""Conditioning op wrappers: ``torch.ops.opensora_fast.condition`` /
``condition_cat_`` or their references (see :mod:`opensora_fast.reference.condition`
for the plan format)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..reference import condition as _ref
from ._registry import explain_schema_refusal, pick, register_fake

__all__ = ["condition", "condition_cat_"]

# The dtypes the op accepts (its contract; the reference keeps its own copy)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SRC_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def condition(z: torch.Tensor, sources: Sequence[torch.Tensor], plan: Sequence[int]):
    """``(masks [B,1,T,H,W], masked [B,C,T,H,W])`` in z's dtype on z's device,
    written in one pass from ``plan`` (rows ``(sample, frame, count, source,
    source_frame)``): named frames get mask 1 and the source's frames (converted
    through fp32), all others 0. z's values are not read. No host sync."""
    return condition_lists(z, list(sources), [int(v) for v in plan])


def _call(op: str, fn, out, sources: list, plan: list):
    return explain_schema_refusal(
        fn, (out, sources, plan), lambda: _ref.check_condition_arguments(op, out, sources, plan)
    )


def condition_lists(z: torch.Tensor, sources: list, plan: list):
    """:func:`condition` for callers whose ``sources`` and ``plan`` already are a
    list of tensors and a list of ints (no per-call conversion: host time).
    Not differentiable: sources that require grad are refused in grad mode."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"condition: z must be a tensor, got {type(z).__name__}")
    return _call("condition", pick("condition", z.device, _ref.condition), z, sources, plan)


def condition_cat_(cond: torch.Tensor, sources: Sequence[torch.Tensor], plan: Sequence[int]) -> torch.Tensor:
    """Writes all of ``cond = cat(masks, masks * latent)`` ``[B, 1 + C, T, H, W]`` in
    place from ``plan`` (no ``latent`` tensor is made); returns ``cond``."""
    if not isinstance(cond, torch.Tensor):
        raise TypeError(f"condition_cat_: cond must be a tensor, got {type(cond).__name__}")
    fn = pick("condition_cat_", cond.device, _ref.condition_cat_)
    _call("condition_cat_", fn, cond, list(sources), [int(v) for v in plan])
    return cond


@register_fake("condition")
def _condition_fake(z, sources, plan):
    _ref.check_condition_inputs("condition", z, sources, plan)
    B, C, T, H, W = z.shape
    return z.new_empty((B, 1, T, H, W)), z.new_empty((B, C, T, H, W))


@register_fake("condition_cat_")
def _condition_cat_fake(cond, sources, plan):
    _ref.check_condition_inputs("condition_cat_", cond, sources, plan)
    return None
