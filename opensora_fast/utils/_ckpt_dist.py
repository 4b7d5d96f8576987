"""Process-group helpers for the checkpoint code: rank and world size that
also answer without a process group, a barrier that a group of one skips,
and the rank-0 progress bar. Agreement between ranks is :mod:`._ckpt_agree`."""

from __future__ import annotations

import os
import sys
from typing import Iterable, Optional

import torch.distributed as dist

from ._ckpt_agree import agree, agree_exception, dist_on

__all__ = ["agree", "agree_exception", "barrier", "dist_on", "progress", "rank", "show_progress", "world_size"]


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist_on() else 0


def world_size(group=None) -> int:
    """The size of ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if dist_on() else 1


def barrier(group=None) -> None:
    """``dist.barrier`` over ``group``; nothing to wait for in a group of one."""
    if world_size(group) > 1:
        dist.barrier(group=group)


def show_progress(progress: Optional[bool]) -> bool:
    """Whether to draw a progress bar: rank 0 only; by default when stderr is
    a TTY and OPENSORA_FAST_PROGRESS is not "0"."""
    if progress is not None:
        return bool(progress) and rank() == 0
    if os.environ.get("OPENSORA_FAST_PROGRESS", "").strip() == "0":
        return False
    return rank() == 0 and sys.stderr.isatty()


def progress(iterable: Iterable, total: int, desc: str, show: bool) -> Iterable:
    """``iterable`` behind a tqdm bar when ``show`` and tqdm imports."""
    if not show:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)
