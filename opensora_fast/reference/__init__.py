"""Pure-PyTorch references: the fallback when no native kernel runs, and the
oracle every kernel is tested against. Written from upstream's semantics
(hpcaitech/Open-Sora ``opensora/utils``), not copied from it. Each op's check
function raises what its native kernels raise (same type, same message)."""
from .ema import canonical_nan_, ema_update_
from .ema import check_inputs as ema_check_inputs
from .masked_mse import acc_dtype as masked_mse_acc_dtype
from .masked_mse import check_grad as masked_mse_check_grad
from .masked_mse import check_inputs as masked_mse_check_inputs
from .masked_mse import check_loss_ranges, loss_ranges, masked_mse, masked_mse_backward
from .train import get_batch_loss, update_ema
from .condition import (
    add_noise_to_ref,
    check_condition_inputs,
    collect_references_batch,
    condition,
    condition_cat_,
    prepare_inference_condition,
    prepare_visual_condition_causal,
    prepare_visual_condition_uncausal,
)
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
    "loss_ranges",
    "check_loss_ranges",
    "get_batch_loss",
    "update_ema",
    "check_condition_inputs",
    "condition",
    "condition_cat_",
    "add_noise_to_ref",
    "collect_references_batch",
    "prepare_inference_condition",
    "prepare_visual_condition_causal",
    "prepare_visual_condition_uncausal",
    "unpad_",
    "unpad_check_inputs",
]
