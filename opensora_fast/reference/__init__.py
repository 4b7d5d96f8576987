"""Pure-PyTorch references: the fallback when no native kernel runs, and the
oracle every kernel is tested against. Written from upstream's semantics
(hpcaitech/Open-Sora ``opensora/utils``), not copied from it. Each op's check
function raises what its native kernels raise (same type, same message)."""
from .ema import canonical_nan_, ema_update_
from .ema import check_inputs as ema_check_inputs
from .masked_mse import acc_dtype as masked_mse_acc_dtype
from .masked_mse import check_grad as masked_mse_check_grad
from .masked_mse import check_inputs as masked_mse_check_inputs
from .masked_mse import masked_mse, masked_mse_backward
from .train import get_batch_loss, update_ema
from .unpad import check_inputs as unpad_check_inputs
from .unpad import unpad_

# names used before the per-op layout
check_ema_inputs = ema_check_inputs
check_mse_inputs = masked_mse_check_inputs

__all__ = [
    "canonical_nan_",
    "ema_check_inputs",
    "ema_update_",
    "masked_mse_acc_dtype",
    "masked_mse_check_grad",
    "masked_mse_check_inputs",
    "masked_mse",
    "masked_mse_backward",
    "get_batch_loss",
    "update_ema",
    "unpad_",
    "unpad_check_inputs",
]
