"""Pure-PyTorch references: the fallback when no native kernel runs, and the
oracle every kernel is tested against. Written from upstream's semantics
(hpcaitech/Open-Sora ``opensora/utils``), not copied from it."""
from .ema import check_ema_inputs, ema_update_
from .masked_mse import acc_dtype as masked_mse_acc_dtype
from .masked_mse import check_mse_inputs, masked_mse
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

__all__ = ["check_ema_inputs", "ema_update_", "check_mse_inputs", "masked_mse", "get_batch_loss", "update_ema",
           "check_condition_inputs", "condition", "condition_cat_", "add_noise_to_ref", "collect_references_batch",
           "prepare_inference_condition", "prepare_visual_condition_causal", "prepare_visual_condition_uncausal"]
