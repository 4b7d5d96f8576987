"""Step-by-step ports of upstream's own functions (hpcaitech/Open-Sora
``opensora/utils``), upstream's quirks kept: the oracles the drop-ins in
:mod:`opensora_fast.utils` are tested and benchmarked against. Not fallbacks."""

from . import condition, train

__all__ = ["condition", "train"]
