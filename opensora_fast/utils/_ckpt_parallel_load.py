"""Loading a consolidated safetensors file by every rank at once: the header
checked against the sharded model, then each rank reads only its own pieces
(:func:`._ckpt_parallel.read_pieces`) straight into its shards."""

from __future__ import annotations

import json
import os
import struct
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import _ckpt_dist, _ckpt_files
from ._ckpt_agree import agree, mark_agreed
from ._ckpt_parallel import (
    _ST_NAMES,
    DEFAULT_STAGING_BYTES,
    Part,
    _pieces,
    _shares,
    crc_pass,
    group_rank,
    read_pieces,
)
from ._ckpt_parallel_crc import file_crc
from ._ckpt_plan import numel


def read_header(fn: str, path: str) -> Tuple[int, dict, bytes, int]:
    """(data start, header, the prefix bytes, file size) of a safetensors
    file; a damaged one is a ValueError naming it."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{fn}: {path} is not a safetensors file ({size} bytes: truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > min(size - 8, 100 << 20):
            raise ValueError(
                f"{fn}: {path} has an invalid header length {n} (truncated, or a save that did not finish?)"
            )
        blob = f.read(n)
    try:
        header = json.loads(blob)
    except ValueError as e:
        raise ValueError(f"{fn}: {path} has a damaged header: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{fn}: {path} has a damaged header (not a JSON object)")
    return 8 + n, header, head + blob, size


def check_header(fn: str, path: str, parts: Sequence[Part], header: dict, data_start: int, size: int) -> Dict[str, int]:
    """Checks the file's header against ``parts`` (names, dtypes, shapes:
    a shard must be the file's tensor sharded over its world); returns each
    tensor's data offset."""
    header = {k: v for k, v in header.items() if k != "__metadata__"}
    names = {p.name for p in parts}
    missing, unexpected = sorted(names - set(header)), sorted(set(header) - names)
    if missing or unexpected:
        raise ValueError(
            f"{fn}: {path} does not hold the model's tensors: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    offsets = {}
    for p in parts:
        e = header[p.name]
        try:
            dtype, shape, (lo, hi) = _ST_NAMES.get(e["dtype"]), tuple(int(d) for d in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{fn}: {path}: header entry {p.name!r} is damaged") from err
        if dtype != p.dtype:
            raise ValueError(f"{fn}: {path} holds {p.name!r} as {e['dtype']}, the model has {p.dtype}")
        n = numel(shape)
        if p.world:
            want = -(-n // p.world)
            if p.local.numel() * p.world < n or (p.strict_shard and p.local.numel() != want):
                raise ValueError(
                    f"{fn}: {path} holds {p.name!r} of shape {list(shape)}; sharded over {p.world} ranks that is "
                    f"[{want}] per rank, but the local shard has shape {list(p.local.shape)} (is the model "
                    "sharded by model_sharding?)"
                )
        elif shape != tuple(p.local.shape):
            raise ValueError(f"{fn}: {path} holds {p.name!r} of shape {list(shape)}, the model {list(p.local.shape)}")
        if hi - lo != n * dtype.itemsize or lo < 0:
            raise ValueError(f"{fn}: {path}: header entry {p.name!r} has inconsistent data_offsets {[lo, hi]}")
        if data_start + hi > size:
            raise ValueError(
                f"{fn}: {path} is truncated: {p.name!r} ends at byte {data_start + hi}, the file at {size}"
            )
        p.shape = shape
        offsets[p.name] = lo
    return offsets


class _FileLayout:
    """A :class:`Layout`-like view of a file read from its header (which may
    be any valid safetensors order)."""

    def __init__(self, data_start: int, offsets: Dict[str, int], size: int):
        self.data_start, self.offset, self.size = data_start, offsets, size


def _tiles(parts: Sequence[Part], offsets: Dict[str, int], data_start: int, size: int) -> bool:
    spans = sorted((offsets[p.name], numel(p.shape) * p.dtype.itemsize) for p in parts)
    pos = 0
    for lo, n in spans:
        if lo != pos:
            return False
        pos += n
    return data_start + pos == size


def read_file(
    fn: str,
    parts: Optional[List[Part]],
    failure: Optional[BaseException],
    path: str,
    group,
    *,
    checksum: Optional[str],
    progress: Optional[bool],
    staging_bytes: Optional[int],
) -> Dict[str, torch.Size]:
    """Every rank of ``group``: checks the file's header against ``parts``,
    verifies ``checksum`` across the ranks (when given) and reads its pieces
    into the local tensors. Returns the file's shapes (the shape dict)."""
    staging_bytes = DEFAULT_STAGING_BYTES if staging_bytes is None else staging_bytes
    values: Dict[str, int] = {}
    layout = None
    if failure is None:
        try:
            data_start, header, prefix, size = read_header(fn, path)
            offsets = check_header(fn, path, parts, header, data_start, size)
            layout = _FileLayout(data_start, offsets, size)
            values = {"header": zlib.crc32(prefix), "size": size}
        except Exception as e:
            failure = e
    agree(fn, failure, group, values)
    me = group_rank(group)
    failure = None
    fd = os.open(path, os.O_RDONLY)
    try:
        if checksum is not None:
            try:
                if _tiles(parts, layout.offset, layout.data_start, layout.size):
                    share = crc_pass(
                        fd, _pieces(parts, layout, True), prefix if me == 0 else None, size, path, staging_bytes
                    )
                else:  # gaps between the tensors: rank 0 reads the whole file
                    share = 0 if me else int(_ckpt_files.file_checksum(path).split(":")[1], 16)
                    share ^= file_crc(size, []) if me == 0 else 0
            except Exception as e:
                failure, share = e, 0
            agree(fn, failure, group)
            got = _ckpt_files.checksum_text(file_crc(size, _shares(share, group)))
            if got != checksum:
                raise mark_agreed(
                    ValueError(
                        f"{fn}: {path} is corrupted: its checksum is {got}, running_states.json recorded {checksum} "
                        "(pass verify=False to load it anyway)"
                    )
                )
        try:
            read_pieces(fd, _pieces(parts, layout, False), path, staging_bytes, _ckpt_dist.show_progress(progress), fn)
            with torch.no_grad():
                for p in parts:
                    if p.world:
                        p.local[p.span()[1] :].zero_()  # the padding, as model_sharding makes it
        except Exception as e:
            failure = e
    finally:
        os.close(fd)
    agree(fn, failure, group)
    return {p.name: torch.Size(p.shape) for p in parts}
