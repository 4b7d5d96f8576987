"""Pure-PyTorch references, one module per op: the fallback when no native
kernel runs, and the oracle every kernel is tested against. Written from
upstream's semantics (hpcaitech/Open-Sora ``opensora/utils``), not copied from
it. Each op's check functions raise what its native kernels raise (same type,
same message). Ports of upstream's own functions are in :mod:`.upstream`."""

from . import adamw_ema, condition, ema, masked_mse, unpad, upstream

__all__ = ["adamw_ema", "condition", "ema", "masked_mse", "unpad", "upstream"]
