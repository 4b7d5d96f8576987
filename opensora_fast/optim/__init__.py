"""Optimizers: :class:`FusedAdamW`, torch's AdamW over fp32 masters in one
native pass that can also step an attached EMA model (:meth:`FusedAdamW.attach_ema`)."""

from __future__ import annotations

from .fused_adamw import FusedAdamW, attach_ema, attached_optimizer, fused_ema_step_taken

__all__ = ["FusedAdamW", "attach_ema", "attached_optimizer", "fused_ema_step_taken"]
