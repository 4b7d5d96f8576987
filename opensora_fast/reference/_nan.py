"""The one NaN bit pattern per dtype the kernels write (csrc/common.h round_to):
the positive quiet NaN. One table for every reference."""

from __future__ import annotations

import torch

CANONICAL_NAN_BITS = {
    torch.float32: 0x7FC00000,
    torch.float64: 0x7FF8000000000000,
    torch.bfloat16: 0x7FC0,
    torch.float16: 0x7E00,
}
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # bytes per element -> same-size int


def canonical_nan(dtype: torch.dtype, device) -> torch.Tensor:
    """The canonical NaN of ``dtype`` as a 0-dim tensor on ``device``."""
    int_dtype = _INT_VIEW[dtype.itemsize]
    return torch.tensor(CANONICAL_NAN_BITS[dtype], dtype=int_dtype, device=device).view(dtype)


def canonical_nan_(t: torch.Tensor) -> torch.Tensor:
    """Rewrites every NaN of a floating tensor, in place, as the canonical NaN."""
    if t.numel() and t.dtype in CANONICAL_NAN_BITS:
        t.view(_INT_VIEW[t.element_size()]).masked_fill_(t.isnan(), CANONICAL_NAN_BITS[t.dtype])
    return t
