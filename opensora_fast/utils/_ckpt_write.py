"""Writing a checkpoint: the streaming safetensors writer (or tensornvme's,
when it imports), the plain torch and Booster parts, and :class:`Job`, rank
0's file work (write, fsync, checksum, running_states.json last, rename),
run inline or on a background thread."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import _ckpt_booster, _ckpt_exit, _ckpt_files
from ._ckpt_dist import progress as _progress

# Test hook: called with a phase name at every step of a checkpoint write
# (tests/test_ckpt_crash.py kills the process there).
phase_hook: Optional[Callable[[str], None]] = None


def phase(name: str) -> None:
    if phase_hook is not None:
        phase_hook(name)


ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def _safetensors_header(tensors: Dict[str, torch.Tensor], names: List[str], metadata: Optional[dict] = None) -> bytes:
    header, pos = {}, 0
    for k in names:
        t = tensors[k]
        if t.dtype not in ST_DTYPES:
            raise TypeError(f"safetensors cannot store {k!r} of dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[k] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * ((-len(blob)) % 8)


def write_safetensors(path: str, tensors: Dict[str, torch.Tensor], show: bool = False) -> str:
    """Writes ``tensors`` (CPU, contiguous) as a safetensors file, streaming
    each tensor's bytes from its buffer (no serialised copy), then fsyncs.
    Returns the file's checksum, computed from the bytes as they are written."""
    names = sorted(tensors)
    blob = _safetensors_header(tensors, names)
    with open(path, "wb") as raw:
        f = _ckpt_files.ChecksumWriter(raw)
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k in _progress(names, len(names), os.path.basename(path), show):
            t = tensors[k]
            if t.numel():
                f.write(memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()))
            phase("tensor")
        f.flush()
        phase("flushed")
        os.fsync(raw.fileno())
    phase("fsynced")
    return f.checksum()


def tensornvme_save():
    """``colossalai.utils.safetensors.save`` (which writes through tensornvme's
    AsyncFileWriter and returns it) when colossalai and tensornvme both import,
    else None."""
    try:
        import tensornvme.async_file_io  # noqa: F401  (save needs it; the PyPI tensornvme lacks it)
        from colossalai.utils.safetensors import save
    except Exception:  # ImportError, or an install that fails at import
        return None
    return save


def write_file(path: str, tensors: Dict[str, torch.Tensor], show: bool, save=None) -> str:
    """One checkpoint file: through ``save`` (:func:`tensornvme_save`'s) when
    given (its checksum then read back), else our writer. Returns the checksum."""
    if save is None:
        return write_safetensors(path, tensors, show)
    writer = save(path, tensors)
    if writer is not None:  # upstream's contract: an AsyncFileWriter to synchronize()
        writer.synchronize()
    phase("flushed")
    _ckpt_files.fsync_path(path)
    phase("fsynced")
    return _ckpt_files.file_checksum(path)


class Job:
    """One checkpoint's rank-0 file work: write the files, fsync and checksum
    every file in the temporary directory (``sums``: those already written,
    relative path -> checksum), running_states.json (with the checksums) last,
    fsync, rename the temporary directory to its final name. A failure is
    kept for :meth:`wait`; one nobody waits for is reported at exit
    (:mod:`._ckpt_exit`)."""

    def __init__(
        self,
        tmp_dir: str,
        final_dir: str,
        files: List[Tuple[str, Dict[str, torch.Tensor]]],
        running_states: dict,
        show: bool,
        sums: Optional[Dict[str, str]] = None,
        before: Optional[Callable[[], None]] = None,
    ):
        self.tmp_dir, self.final_dir, self.before = tmp_dir, final_dir, before
        self.files, self.running_states, self.show = files, running_states, show
        self.sums: Dict[str, str] = dict(sums or {})
        self.error: Optional[BaseException] = None
        self.thread: Optional[threading.Thread] = None

    def _commit(self) -> None:
        if self.before is not None:  # the Booster's background writes, on every rank
            self.before()
            phase("booster")
        save = tensornvme_save()  # looked up once per checkpoint
        for path, tensors in self.files:
            self.sums[path] = write_file(os.path.join(self.tmp_dir, path), tensors, self.show, save)
        _ckpt_files.sync_tree(self.tmp_dir, self.sums)  # the Booster's and other ranks' files
        states = dict(self.running_states, checksums=dict(sorted(self.sums.items())))
        _ckpt_files.save_json(states, os.path.join(self.tmp_dir, _ckpt_files.COMPLETE))
        phase("states")
        _ckpt_files.fsync_path(self.tmp_dir)
        phase("dir-fsynced")
        os.rename(self.tmp_dir, self.final_dir)
        phase("renamed")
        _ckpt_files.fsync_path(os.path.dirname(self.final_dir) or ".")
        phase("done")

    def run(self) -> None:
        try:
            self._commit()
        except BaseException as e:  # reported by wait(), or at exit
            self.error = e
            self._failed()
        else:
            _ckpt_exit.untrack(self)

    def _failed(self) -> None:
        if os.path.isdir(self.tmp_dir):  # not renamed: free the space (a full disk, most likely)
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def start(self) -> None:
        _ckpt_exit.track(self)
        self.thread = threading.Thread(target=self.run, name="opensora_fast-ckpt-writer", daemon=False)
        self.thread.start()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def failure_message(self) -> str:
        return f"CheckpointIO: writing {self.final_dir} failed: {type(self.error).__name__}: {self.error}"

    def wait(self) -> None:
        self.join()
        if self.error is not None:
            e, msg = self.error, self.failure_message()
            self.error = None
            _ckpt_exit.untrack(self)
            raise RuntimeError(f"{msg} (the checkpoint was not written; the previous ones are intact)") from e


class RankJob(Job):
    """A rank other than 0: waits for its Booster writes and marks itself done
    in the temporary directory (:func:`._ckpt_booster.finish_rank`); the
    directory is rank 0's to remove."""

    def __init__(self, tmp_dir: str, final_dir: str, rank: int, writers: list):
        super().__init__(tmp_dir, final_dir, [], {}, False)
        self.rank, self.writers = rank, writers

    def _commit(self) -> None:
        _ckpt_booster.finish_rank(self.tmp_dir, self.rank, self.writers)

    def _failed(self) -> None:
        pass


def save_plain_parts(tmp: str, model, optimizer, lr_scheduler) -> Dict[str, str]:
    """Rank 0 without a Booster: the model as safetensors, the optimizer and
    lr scheduler states with torch.save; each fsynced. Returns their checksums."""
    sums: Dict[str, str] = {}
    if model is not None:
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        sums["model.safetensors"] = write_safetensors(os.path.join(tmp, "model.safetensors"), sd)
    if optimizer is not None:
        sums["optimizer.pt"] = _ckpt_files.torch_save_synced(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    if lr_scheduler is not None:
        sums["lr_scheduler.pt"] = _ckpt_files.torch_save_synced(
            lr_scheduler.state_dict(), os.path.join(tmp, "lr_scheduler.pt")
        )
    return sums
