"""Pure-PyTorch references: the fallback when no native kernel runs, and the
oracle every kernel is tested against. Written from upstream's semantics
(hpcaitech/Open-Sora ``opensora/utils``), not copied from it."""
from .ema import check_ema_inputs, ema_update_
from .train import update_ema

__all__ = ["check_ema_inputs", "ema_update_", "update_ema"]
