"""The Booster's part of a checkpoint: its model, LoRA, optimizer and lr
scheduler files, written by every rank inside the temporary directory.

With ``async_io`` and a Booster whose ``checkpoint_io`` writes in the
background (ColossalAI's: ``async_writers`` and ``_sync_io``), the model and
optimizer go to it with ``use_async=True``, as upstream hands them, and the
save returns once they are staged. The rename still waits for every byte:
each rank other than 0 waits for its own writers on a background thread,
fsyncs the files and leaves a marker file; rank 0's writer job waits for its
own writers and every other rank's marker before it checksums and renames. A
rank whose writes fail leaves a failure marker instead, so rank 0 fails at
once rather than at the timeout. Markers need a directory every rank sees;
where the ranks do not share one, the Booster writes synchronously."""

from __future__ import annotations

import os
import time
from typing import Optional

from . import _ckpt_files

# rank 0 waits this long for another rank's marker before the save fails
RANK_TIMEOUT_S = float(os.environ.get("OPENSORA_FAST_CKPT_RANK_TIMEOUT", "1800"))
_DONE, _FAILED = "done", "failed"


def background_io(booster) -> Optional[object]:
    """The Booster's CheckpointIO when it writes in the background (it has
    ``_sync_io`` and an ``async_writers`` list), else None."""
    bio = getattr(booster, "checkpoint_io", None)
    if callable(getattr(bio, "_sync_io", None)) and isinstance(getattr(bio, "async_writers", None), list):
        return bio
    return None


def save_parts(booster, tmp: str, model, optimizer, lr_scheduler, lora: bool, use_async: bool = False) -> list:
    """Every rank: the Booster's parts inside ``tmp``. Returns the writers still
    writing (``use_async``: those the Booster's CheckpointIO holds), else []."""
    kw = {"use_async": True} if use_async else {}
    if model is not None:
        sub = os.path.join(tmp, "lora" if lora else "model")
        os.makedirs(sub, exist_ok=True)
        if lora:
            booster.save_lora_as_pretrained(model, sub)
        else:
            booster.save_model(model, sub, shard=True, use_safetensors=True, size_per_shard=4096, **kw)
    if optimizer is not None:
        booster.save_optimizer(optimizer, os.path.join(tmp, "optimizer"), shard=True, size_per_shard=4096, **kw)
    if lr_scheduler is not None:
        booster.save_lr_scheduler(lr_scheduler, os.path.join(tmp, "lr_scheduler"))
    return list(background_io(booster).async_writers) if use_async else []


def wait_writers(writers: list) -> None:
    for w in writers:
        w.synchronize()


def quiet_wait(writers: list) -> None:
    """Waits for ``writers`` ignoring their failures (a save that already failed)."""
    for w in writers:
        try:
            w.synchronize()
        except Exception:
            pass


def _marker(tmp: str, rank: int, kind: str) -> str:
    return os.path.join(tmp, f".booster-rank{rank}.{kind}")


def mark(tmp: str, rank: int, error: Optional[BaseException] = None) -> None:
    """A rank's verdict on its Booster writes, fsynced (written, then renamed
    into place, so rank 0 never reads half a message)."""
    path = _marker(tmp, rank, _DONE if error is None else _FAILED)
    part = path + ".tmp"
    with open(part, "w", encoding="utf-8") as f:
        f.write("" if error is None else f"{type(error).__name__}: {error}")
        f.flush()
        os.fsync(f.fileno())
    os.rename(part, path)


def finish_rank(tmp: str, rank: int, writers: list) -> None:
    """A rank other than 0: waits for its writers, fsyncs every file under
    ``tmp`` (an fsync of any descriptor flushes a file's pages on NFS and
    local disks alike), then marks itself done. On failure it marks itself
    failed and raises."""
    try:
        wait_writers(writers)
        for here, _dirs, files in os.walk(tmp):
            for name in files:
                if not name.startswith(".booster-rank"):
                    _ckpt_files.fsync_path(os.path.join(here, name))
    except BaseException as e:
        mark(tmp, rank, e)
        raise
    mark(tmp, rank)


def wait_ranks(tmp: str, writers: list, world: int, timeout: Optional[float] = None) -> None:
    """Rank 0, before the checksums and the rename: its own writers, then every
    other rank's marker (removed once seen). Raises RuntimeError naming the
    rank that failed, TimeoutError naming those that never answered."""
    wait_writers(writers)
    waiting = set(range(1, world))
    limit = RANK_TIMEOUT_S if timeout is None else timeout
    start, pause = time.monotonic(), 0.002
    while waiting:
        for r in sorted(waiting):
            failed = _marker(tmp, r, _FAILED)
            if os.path.exists(failed):
                with open(failed, encoding="utf-8") as f:
                    raise RuntimeError(f"rank {r}: the Booster's background writes failed: {f.read()}")
            done = _marker(tmp, r, _DONE)
            if os.path.exists(done):
                os.remove(done)
                waiting.discard(r)
        if waiting:
            if time.monotonic() - start > limit:
                raise TimeoutError(
                    f"ranks {sorted(waiting)} did not finish their Booster writes within {limit:.0f} s "
                    "(OPENSORA_FAST_CKPT_RANK_TIMEOUT)"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
