"""Pure-PyTorch references: the fallback when no native kernel runs, and the
oracle every kernel is tested against. Written from upstream's semantics
(hpcaitech/Open-Sora ``opensora/utils``), not copied from it."""
from .ema import check_ema_inputs, ema_update_
from .masked_mse import acc_dtype as masked_mse_acc_dtype
from .masked_mse import check_mse_inputs, masked_mse
from .train import get_batch_loss, update_ema

__all__ = ["check_ema_inputs", "ema_update_", "check_mse_inputs", "masked_mse", "get_batch_loss", "update_ema"]
