"""Drop-in for ``opensora.utils.logger``: process-aware logging helpers.

Same names and behaviour as upstream. One difference: when ``WORLD_SIZE`` is
set but no process group is initialised yet, upstream's ``is_main_process`` /
``get_world_size`` crash inside ``torch.distributed``; ours read ``RANK`` /
``WORLD_SIZE`` from the environment instead (what torchrun sets).
"""

from __future__ import annotations

import logging
import os

import torch.distributed as dist

__all__ = ["is_distributed", "is_main_process", "get_world_size", "create_logger", "log_message"]

_LOGGER_NAME = __name__
_LEVELS = ("info", "warning", "error", "print")


def is_distributed() -> bool:
    """True when running under a launcher that sets ``WORLD_SIZE`` (torchrun)."""
    return os.environ.get("WORLD_SIZE", None) is not None


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True when not distributed, or on global rank 0."""
    return not is_distributed() or _rank() == 0


def get_world_size() -> int:
    """The number of processes (1 when not distributed)."""
    if not is_distributed():
        return 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"])


def create_logger(logging_dir: str | None = None) -> logging.Logger:
    """Create a logger that writes to stdout (and ``{logging_dir}/log.txt``); only the main process logs.

    As upstream, the main process configures the root logger with
    ``logging.basicConfig`` (level INFO, a blue timestamp); other processes get a
    logger with a ``NullHandler``.
    """
    logger = logging.getLogger(_LOGGER_NAME)
    if is_main_process():
        extra = {}
        if logging_dir is not None:
            extra["handlers"] = [logging.StreamHandler(), logging.FileHandler(f"{logging_dir}/log.txt")]
        logging.basicConfig(
            level=logging.INFO,
            format="[\033[34m%(asctime)s\033[0m] %(message)s",
            datefmt="%Y-%m-%d %H:%M:%S",
            **extra,
        )
        if logging_dir is not None:
            logger.info("Experiment directory created at %s", logging_dir)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def log_message(*args, level: str = "info") -> None:
    """Log ``*args`` (``msg, *fmt_args``) at ``level``: "info", "warning", "error" or "print" (plain print)."""
    logger = logging.getLogger(_LOGGER_NAME)
    if level == "info":
        logger.info(*args)
    elif level == "warning":
        logger.warning(*args)
    elif level == "error":
        logger.error(*args)
    elif level == "print":
        print(*args)
    else:
        raise ValueError(f"Invalid logging level: {level!r}; accepted: {', '.join(_LEVELS)}")
