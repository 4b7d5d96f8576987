"""Public ops: thin wrappers over ``torch.ops.opensora_fast.*`` that fall back to
the references in :mod:`opensora_fast.reference` (see :mod:`opensora_fast._ext`).
One module per op: its wrapper, its fake (for torch.compile and meta tensors)
and its autograd registration. The plumbing they share is written once:
:mod:`._registry` (fake registration, native-or-reference choice, the
dispatcher's refusals explained) and :mod:`._autograd` (Function plumbing and
every private torch API the ops use). A new op adds one export line here."""

from __future__ import annotations

from .adamw_ema import adamw_ema_
from .condition import condition, condition_cat_
from .ema import draw_seed, ema_update_
from .masked_mse import loss_ranges, masked_mse
from .unpad import unpad_

__all__ = [
    "ema_update_",
    "draw_seed",
    "adamw_ema_",
    "masked_mse",
    "loss_ranges",
    "condition",
    "condition_cat_",
    "unpad_",
]
