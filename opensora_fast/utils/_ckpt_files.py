"""Checkpoint file integrity: a CRC-32 of every file, computed while it is
written where we write it (read back otherwise), recorded in
running_states.json and checked on load; every file and directory fsynced
before the checkpoint is renamed complete. Also the on-disk layout: JSON
written by fsync and rename, what makes a checkpoint directory complete,
and the removal of old checkpoints.

CRC-32 (``zlib.crc32``): in the standard library, several GB/s, releases the
GIL on large buffers (the background writer does not stall training), and
catches every single-bit flip and every burst error up to 32 bits. It is a
check against corruption, not against tampering."""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from typing import Dict, Iterable, Optional

import torch

from . import _ckpt_dist

ALGO = "crc32"
_CHUNK = 16 << 20
CKPT_RE = re.compile(r"epoch(\d+)-global_step(\d+)$")
COMPLETE = "running_states.json"  # written last: its presence makes a checkpoint complete


def checksum_text(crc: int) -> str:
    return f"{ALGO}:{crc & 0xFFFFFFFF:08x}"


class ChecksumWriter:
    """A write-only file wrapper that keeps a running CRC-32 of what passes."""

    def __init__(self, f):
        self.f = f
        self.crc = 0

    def write(self, data) -> int:
        self.crc = zlib.crc32(data, self.crc)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def checksum(self) -> str:
        return checksum_text(self.crc)


def file_checksum(path: str) -> str:
    """The checksum of a file, read in large chunks into one reused buffer."""
    crc = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
    return checksum_text(crc)


def fsync_path(path: str) -> None:
    """fsync a file or a directory (a directory: so the entries in it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save_synced(obj, path: str) -> str:
    """``torch.save(obj, path)``, then flush and fsync; returns the file's
    checksum, computed from the bytes as they were written."""
    with open(path, "wb") as f:
        w = ChecksumWriter(f)
        torch.save(obj, w)
        f.flush()
        os.fsync(f.fileno())
    return w.checksum()


def sync_tree(root: str, sums: Dict[str, str]) -> None:
    """Every file under ``root`` not yet in ``sums`` (relative path -> checksum;
    files written by the Booster or by other ranks) is fsynced and its
    checksum added; every directory below ``root`` is fsynced (``root`` is
    fsynced by the caller, last)."""
    for here, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(here, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel not in sums:
                fsync_path(full)
                sums[rel] = file_checksum(full)
        if here != root:
            fsync_path(here)


def verify(fn: str, root: str, sums: Optional[dict], parts: Iterable[str]) -> None:
    """Checks the recorded checksum of every file of ``parts`` (a file's
    relative path, or a folder: every file in it) in checkpoint ``root``.
    ``sums`` None: a checkpoint from before checksums (or upstream's):
    nothing to check. Raises naming the file."""
    if sums is None:
        return
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise ValueError(
            f"{fn}: {os.path.join(root, 'running_states.json')}: 'checksums' is not a mapping of "
            "file names to checksums (the file is damaged)"
        )
    parts = list(parts)
    for rel, want in sums.items():
        if not any(rel == p or rel.startswith(p + "/") for p in parts):
            continue
        path = os.path.join(root, *rel.split("/"))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{fn}: {path} is missing (running_states.json records it)")
        if not want.startswith(ALGO + ":"):
            raise ValueError(f"{fn}: {path}: unknown checksum {want!r} in running_states.json")
        got = file_checksum(path)
        if got != want:
            raise ValueError(
                f"{fn}: {path} is corrupted: its checksum is {got}, running_states.json recorded {want} "
                "(pass verify=False to load it anyway)"
            )


def load_json(file_path: str) -> dict:
    """Load a JSON file."""
    with open(file_path, "r", encoding="utf-8") as f:
        return json.load(f)


def save_json(data, file_path: str):
    """Save ``data`` as indented JSON; written to a temporary name, fsynced
    and renamed, so the file is either the old one or the whole new one (a
    write that fails leaves the old one and no temporary file)."""
    tmp = f"{file_path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=4)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file_path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def is_complete(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, COMPLETE))


def partial_name(final_dir: str) -> str:
    """The hidden temporary name a checkpoint is written under."""
    parent, base = os.path.split(final_dir)
    return os.path.join(parent, f".{base}.partial")


def check_target(fn: str, final: str) -> None:
    """A checkpoint is never overwritten, nor saved over a stray directory."""
    if not os.path.exists(final):
        return
    if is_complete(final):
        try:
            held = load_json(os.path.join(final, COMPLETE))
        except Exception:
            held = {}
        raise FileExistsError(
            f"{fn}: {final} already holds a complete checkpoint (step {held.get('step')}, "
            f"global_step {held.get('global_step')}); refusing to overwrite it"
        )
    raise FileExistsError(f"{fn}: {final} exists but is not a complete checkpoint (no {COMPLETE}); remove it first")


def rm_checkpoints(save_dir: str, keep_n_latest: int = 0):
    """Keep the ``keep_n_latest`` newest complete checkpoints in ``save_dir``
    (by epoch, then step, as numbers); empty the older ones except their
    ``eval`` folder. Incomplete directories are neither counted nor touched.
    Rank 0 only. ``save_dir`` is listed, not globbed (upstream's glob read
    ``exp[12]`` as a pattern and emptied ``exp1``'s checkpoints)."""
    if keep_n_latest <= 0 or _ckpt_dist.rank() != 0:
        return
    found = []
    for name in os.listdir(save_dir):
        m = CKPT_RE.fullmatch(name)
        f = os.path.join(save_dir, name)
        if m and is_complete(f):
            found.append((tuple(map(int, m.groups())), f))
    found.sort(reverse=True)
    for _, f in found[keep_n_latest:]:
        # running_states.json first: from here on the directory is no checkpoint,
        # whenever the removal is cut short.
        os.remove(os.path.join(f, COMPLETE))
        fsync_path(f)
        for name in os.listdir(f):
            if name.startswith("."):  # upstream's glob("*") leaves hidden entries
                continue
            item = os.path.join(f, name)
            if os.path.isdir(item):
                if name != "eval":
                    shutil.rmtree(item)
            else:
                os.remove(item)
