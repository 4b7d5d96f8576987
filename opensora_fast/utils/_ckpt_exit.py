"""A failed background checkpoint write no caller has seen is never lost:
it is logged, and the interpreter exits with status 1 instead of 0.

A write's failure is reported when ``CheckpointIO._sync_io`` (or the next
``save``) raises it. Until then its job stays here. At interpreter exit
(after the non-daemon writer threads are joined) a job that failed and was
never reported, or a failure that ``CheckpointIO.__del__`` could only log,
is logged at error level and the process ends with ``os._exit(1)``: an
exception raised in an ``atexit`` handler would be printed and then ignored
(exit status 0). The handler is registered at import, so it runs after the
handlers registered later (user code, most libraries); those registered
earlier are skipped, except logging's, which it flushes itself."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import Dict, List

from .logger import log_message

_lock = threading.Lock()
_pending: Dict[int, object] = {}  # id(job) -> job: started, failure not yet reported
_swallowed: List[str] = []  # failures only logged (by __del__): the exit status still says so


def track(job) -> None:
    with _lock:
        _pending[id(job)] = job


def untrack(job) -> None:
    with _lock:
        _pending.pop(id(job), None)


def swallowed(message: str) -> None:
    """A failure that could not be raised to anyone: logged now, exit status 1 later."""
    log_message(message, level="error")
    with _lock:
        _swallowed.append(message)


def unreported() -> List[str]:
    """The messages of every failure no caller has seen (joins finished jobs)."""
    with _lock:
        jobs, out = list(_pending.values()), list(_swallowed)
    for job in jobs:
        job.join()
        if job.error is not None:
            out.append(job.failure_message())
    return out


def _at_exit() -> None:
    try:
        lost = unreported()
    except Exception:  # never make an exit worse than it is
        return
    if not lost:
        return
    for m in lost:
        log_message("%s", m, level="error")
    log_message(
        "CheckpointIO: %d checkpoint write(s) failed without being reported; exiting with status 1",
        len(lost),
        level="error",
    )
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(1)


atexit.register(_at_exit)
