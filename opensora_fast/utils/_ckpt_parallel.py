"""Gather-free checkpoints: every rank writes its own bytes of one
consolidated safetensors file with positioned writes, and reads back only
its own bytes.

ZeRO's flat layout (flatten, zero-pad to a multiple of W, rank r keeps chunk
r) makes a whole parameter the concatenation of its shards minus the tail
padding, so rank r's elements ``[r*s, min((r+1)*s, n))`` of parameter p lie
at byte ``data_start + offset(p) + r*s*esize`` of the file. The header
(names sorted, offsets packed) is a function of the names, shapes and dtypes
only: every rank computes it (cached across saves) and the ranks compare
its digest before any data is written. The file is the gather path's byte
for byte.

A save, three collectives in all: rank 0 creates ``.<name>.partial`` next to
``path``, preallocates it (a full disk fails here, before any data) and
writes a random token inside the still-zero header; (1) the ranks learn of
any failure, compare the header digest and receive the token; every rank
opens the partial file, reads the token back (the shared-filesystem probe:
a rank that sees another file, or none, writes nothing), ``pwrite``s its
pieces, computing their CRC while the bytes are in cache, and fsyncs; (2)
the ranks learn of any failure or unseen token and gather every rank's CRC
share (:mod:`._ckpt_parallel_crc`); rank 0 writes the header last (so a
file cut short has a zero header length, which no reader accepts), fsyncs
and renames it into place; (3) the ranks learn whether that worked. A
failure on any rank raises on every rank and rank 0 removes the partial
file.
A load: every rank reads the header, checks it against its model and reads
only its pieces (and the small unsharded buffers) with ``preadv`` straight
into the shards; with ``checksum``, a first pass verifies the whole file
across the ranks before anything is written into the model."""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import struct
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import _ckpt_dist, _ckpt_files
from ._ckpt_agree import TAIL_LEN, VALUE_CAP, agree, agreement_device, exchange, mark_agreed
from ._ckpt_parallel_crc import Pieces, file_crc
from ._ckpt_plan import numel
from ._ckpt_write import ST_DTYPES, _safetensors_header, phase

DEFAULT_STAGING_BYTES = 64 << 20  # per staging buffer (two per rank, only for device shards)
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}

# Test hooks: the positioned write and read (a test plants a full disk, or counts bytes read).
pwrite = os.pwrite
preadv = os.preadv


def preallocate(fd: int, size: int) -> None:
    """Reserves ``size`` bytes (a full disk fails here); ftruncate where the
    filesystem cannot preallocate."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


class Part:
    """One tensor of the file: its full shape and dtype, this rank's local
    tensor (a 1-D shard, or the whole tensor when not sharded), the shard
    layout (``world``, ``rank``) and whether this rank's bytes of it are the
    ones written (``own``: one copy of each byte is written)."""

    __slots__ = ("name", "shape", "dtype", "local", "world", "rank", "own", "strict_shard")

    def __init__(
        self,
        name: str,
        shape,
        dtype: torch.dtype,
        local: torch.Tensor,
        world: int,
        rank: int,
        own: bool,
        strict_shard: bool = True,
    ):
        self.name, self.shape, self.dtype, self.local = name, tuple(int(d) for d in shape), dtype, local
        self.world, self.rank, self.own = world, rank, own  # world 0: not sharded
        self.strict_shard = strict_shard  # model_sharding's ceil(n / world); masters: any s with s * world >= n

    def span(self) -> Tuple[int, int]:
        """(first element of the whole tensor held here, how many): the shard's
        unpadded part; a whole tensor when not sharded."""
        n = numel(self.shape)
        if self.world == 0:  # not sharded
            return 0, n
        s = self.local.numel()
        lo = min(self.rank * s, n)
        return lo, max(0, min(s, n - lo))


class _Meta:
    """What the header writer reads of a tensor, without making one."""

    __slots__ = ("shape", "dtype", "_n")

    def __init__(self, shape: tuple, dtype: torch.dtype):
        self.shape, self.dtype, self._n = shape, dtype, numel(shape)

    def numel(self) -> int:
        return self._n

    def element_size(self) -> int:
        return self.dtype.itemsize


class Layout:
    """The file's header and where each tensor's bytes lie, from (name, shape,
    dtype) alone: the same bytes as the gather path's writer (its own header
    function). ``digest``: 62 bits of BLAKE2b of the header, which the ranks
    compare before writing."""

    def __init__(self, fn: str, entries: Sequence[Tuple[str, tuple, torch.dtype]]):
        metas = {}
        for name, shape, dtype in entries:
            if dtype not in ST_DTYPES:
                raise TypeError(f"{fn}: safetensors cannot store {name!r} of dtype {dtype}")
            metas[name] = _Meta(shape, dtype)
        names = sorted(metas)
        blob = _safetensors_header(metas, names)
        self.prefix = struct.pack("<Q", len(blob)) + blob
        self.data_start = len(self.prefix)
        self.offset: Dict[str, int] = {}
        pos = 0
        for k in names:
            self.offset[k] = pos
            pos += metas[k].numel() * metas[k].element_size()
        self.size = self.data_start + pos
        self.digest = int.from_bytes(hashlib.blake2b(self.prefix, digest_size=8).digest(), "little") >> 2


_layouts: "OrderedDict[tuple, Layout]" = OrderedDict()  # the last few, by (name, shape, dtype) entries
_LAYOUTS_KEPT = 4  # the EMA's and the masters' files, with room to spare


def layout_of(fn: str, parts: Sequence["Part"]) -> Layout:
    """:class:`Layout` of ``parts``, reused across saves of the same entries (a
    pure function of them; building the header of a thousand tensors costs
    milliseconds on every rank)."""
    key = tuple((p.name, p.shape, p.dtype) for p in parts)
    got = _layouts.get(key)
    if got is None:
        got = _layouts[key] = Layout(fn, key)
        while len(_layouts) > _LAYOUTS_KEPT:
            _layouts.popitem(last=False)
    else:
        _layouts.move_to_end(key)
    return got


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _pieces(parts: Sequence[Part], layout: Layout, own_only: bool) -> List[Tuple[int, Part, int, int]]:
    """(file position, part, first local element, elements) of every range
    this rank writes (``own_only``) or reads, in file order."""
    out = []
    for p in parts:
        if own_only and not p.own:
            continue
        lo, k = p.span()
        if k:
            esize = p.dtype.itemsize
            out.append((layout.data_start + layout.offset[p.name] + lo * esize, p, 0, k))
    out.sort(key=lambda x: x[0])
    return out


def _write_all(fd: int, pos: int, data) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = pwrite(fd, view, pos)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write")
        view, pos = view[n:], pos + n


def _read_all(fd: int, pos: int, data, path: str) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = preadv(fd, [view], pos)
        if n <= 0:
            raise ValueError(f"{path}: the file ends at byte {pos}, before its tensors do (truncated?)")
        view, pos = view[n:], pos + n


class _Staging:
    """Host buffers for tensors that are not contiguous CPU memory (device
    shards): at most two of ``cap`` bytes, pinned when CUDA is there, so a
    device copy into one overlaps the file I/O of the other."""

    def __init__(self, cap: int):
        self.cap, self.bufs, self.i = cap, [], 0

    def next(self) -> torch.Tensor:
        if len(self.bufs) < 2:
            self.bufs.append(torch.empty(self.cap, dtype=torch.uint8, pin_memory=torch.cuda.is_available()))
        b = self.bufs[self.i]
        self.i ^= 1
        return b


def _direct(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.is_contiguous()


def _host_bytes(t: torch.Tensor):
    """A contiguous CPU tensor's bytes as a uint8 ndarray (no copy; one view
    for the 1-D shards)."""
    return (t if t.dim() == 1 else t.reshape(-1)).view(torch.uint8).numpy()


def write_pieces(fd: int, pieces, crc: Pieces, staging_bytes: int, show: bool, desc: str) -> None:
    """Every piece's bytes to its place: CPU shards straight from their
    memory; device shards through two staging buffers (the copy of the next
    chunk runs while the current one is written)."""
    stage = _Staging(staging_bytes)
    pending = None  # (pos, host view, event or None)

    def flush(item) -> None:
        pos, host, ev = item
        if ev is not None:
            ev.synchronize()
        data = host.numpy()
        _write_all(fd, pos, data)
        crc.add(pos, data)

    for pos, p, first, k in _ckpt_dist.progress(pieces, len(pieces), desc, show):
        if _direct(p.local):  # the common case, kept lean: a thousand pieces per rank
            es = p.dtype.itemsize
            data = _host_bytes(p.local)[first * es : (first + k) * es]
            n = pwrite(fd, data, pos)
            if n != data.nbytes:  # a short write: the rest, or ENOSPC
                if n <= 0:
                    raise OSError(errno.ENOSPC, "short write")
                _write_all(fd, pos + n, data[n:])
            crc.add(pos, data)  # while the bytes are in cache
            phase("par-piece")
            continue
        src = _bytes(p.local[first : first + k] if p.world else p.local)
        for c in range(0, src.numel(), staging_bytes):
            chunk = src[c : c + staging_bytes]
            host = stage.next()[: chunk.numel()]
            host.copy_(chunk, non_blocking=chunk.is_cuda)
            ev = torch.cuda.Event() if chunk.is_cuda else None
            if ev is not None:
                ev.record()
            if pending is not None:
                flush(pending)
            pending = (pos + c, host, ev)
        phase("par-piece")
    if pending is not None:
        flush(pending)


def read_pieces(fd: int, pieces, path: str, staging_bytes: int, show: bool, desc: str) -> None:
    """Every piece from its place in the file into the local tensors; CPU shards straight into their
    memory, others through a staging buffer."""
    stage = _Staging(staging_bytes)
    events: Dict[int, torch.cuda.Event] = {}
    with torch.no_grad():
        for pos, p, first, k in _ckpt_dist.progress(pieces, len(pieces), desc, show):
            dst = p.local[first : first + k] if p.world else p.local
            if _direct(p.local):
                _read_all(fd, pos, _bytes(dst).numpy(), path)
            else:
                flat = _bytes(dst) if dst.is_contiguous() else None
                whole = flat if flat is not None else torch.empty(dst.numel() * dst.element_size(), dtype=torch.uint8)
                for c in range(0, whole.numel(), staging_bytes):
                    out = whole[c : c + staging_bytes]
                    buf = stage.next()
                    ev = events.pop(buf.data_ptr(), None)
                    if ev is not None:  # its previous copy to the device is done
                        ev.synchronize()
                    host = buf[: out.numel()]
                    _read_all(fd, pos + c, host.numpy(), path)
                    out.copy_(host, non_blocking=out.is_cuda)
                    if out.is_cuda:
                        events[buf.data_ptr()] = torch.cuda.Event()
                        events[buf.data_ptr()].record()
                if flat is None:
                    dst.copy_(whole.view(dst.dtype).view(dst.shape))
    for ev in events.values():
        ev.synchronize()


def crc_pass(fd: int, pieces, layout_prefix: Optional[bytes], size: int, path: str, staging_bytes: int) -> int:
    """This rank's share of the file's CRC: its pieces read into one staging
    buffer, nothing kept (the verification before a load)."""
    crc = Pieces(size)
    if layout_prefix is not None:
        crc.add(0, layout_prefix)
    buf = torch.empty(
        min(staging_bytes, max((k * p.dtype.itemsize for _, p, _, k in pieces), default=1)), dtype=torch.uint8
    )
    host = buf.numpy()
    for pos, p, _first, k in pieces:
        left = k * p.dtype.itemsize
        while left:
            n = min(left, host.nbytes)
            _read_all(fd, pos, host[:n], path)
            crc.add(pos, host[:n])
            pos, left = pos + n, left - n
    return crc.value()


def group_rank(group) -> int:
    return dist.get_rank(group) if _ckpt_dist.dist_on() else 0


def _shares(value: int, group) -> List[int]:
    """Every rank's int (CRC share), on every rank: one all_reduce of a
    one-hot vector (NCCL has no XOR reduction)."""
    world = _ckpt_dist.world_size(group)
    if world == 1:
        return [value]
    t = torch.zeros(world, dtype=torch.int64, device=agreement_device(group))
    t[group_rank(group)] = value
    dist.all_reduce(t, group=group)
    return t.tolist()


def shared_dir(fn: str, directory: str, group=None) -> bool:
    """Whether every rank of ``group`` sees the same ``directory``: rank 0
    writes a probe file with a random token, every rank reads it back. A
    failure to write the probe raises on every rank."""
    if _ckpt_dist.world_size(group) == 1:
        return True
    me = group_rank(group)
    token = secrets.randbits(62)
    failure = None
    probe = os.path.join(directory, f".osf-probe-{token:016x}")
    if me == 0:
        try:
            with open(probe, "w") as f:
                f.write(str(token))
        except OSError as e:
            failure = OSError(e.errno, f"{fn}: cannot write in {directory}: {e.strerror}")
    agree(fn, failure, group)
    t = torch.tensor([token], dtype=torch.int64, device=agreement_device(group))
    dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    probe = os.path.join(directory, f".osf-probe-{int(t.item()):016x}")
    try:
        with open(probe) as f:
            ok = f.read() == str(int(t.item()))
    except OSError:
        ok = False
    flag = torch.tensor([int(ok)], dtype=torch.int64, device=t.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if me == 0:
        try:
            os.remove(probe)
        except OSError:
            pass
    return bool(flag.item())


_TOKEN_AT = 8  # the probe token's place in a partial file: inside the header, whose length (bytes 0-8) stays 0
assert TAIL_LEN >= 3, "write_file's first exchange needs three slots after agree's failure slot"


def _create(tmp: str, size: int) -> int:
    """Rank 0: the partial file, preallocated (zeros: the header length reads
    0 until it is written last), with a random token at ``_TOKEN_AT`` that
    the other ranks read back to prove they see this very file; closed, so a
    network filesystem has sent the token before they open it. Returns the
    token."""
    token = secrets.randbits(62)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        preallocate(fd, size)
        phase("par-prealloc")
        _write_all(fd, _TOKEN_AT, struct.pack("<q", token))
    finally:
        os.close(fd)
    return token


def write_file(
    fn: str,
    parts: Optional[List[Part]],
    failure: Optional[BaseException],
    path: str,
    group,
    *,
    progress: Optional[bool],
    staging_bytes: Optional[int],
) -> str:
    """Every rank of ``group``: its pieces of ``parts`` into the file at
    ``path`` (steps in the module docstring), in three collectives: (1) every
    rank's failure, the header digest and rank 0's probe token; (2) after
    the writes, every rank's failure, which ranks saw the token and every
    rank's CRC share; (3) rank 0's header and rename. ``failure``: this
    rank's problem found while making ``parts`` (raised on every rank).
    Returns the file's checksum (``crc32:...``) on every rank."""
    staging_bytes = DEFAULT_STAGING_BYTES if staging_bytes is None else staging_bytes
    me, world = group_rank(group), _ckpt_dist.world_size(group)
    d, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(d, f".{base}.partial")
    layout, token, fd = None, VALUE_CAP, -1
    try:
        if failure is None:
            try:
                if isinstance(staging_bytes, bool) or not isinstance(staging_bytes, int) or staging_bytes < 1:
                    raise ValueError(f"{fn}: staging_bytes must be a positive int, got {staging_bytes!r}")
                layout = layout_of(fn, parts)
                if not os.path.isdir(d):
                    raise FileNotFoundError(f"{fn}: directory {d} does not exist (on rank {_ckpt_dist.rank()})")
                if me == 0:  # before the first collective: a full disk or a bad directory is found here
                    token = _create(tmp, layout.size)
            except Exception as e:
                failure = e
        digest = layout.digest if layout is not None else 0
        first = [digest, -digest, token]
        got = exchange(fn, failure, group, first + [0] * (TAIL_LEN - len(first)))  # agree's length
        if got[0] != -got[1]:
            raise mark_agreed(
                ValueError(
                    f"{fn}: the ranks computed different file headers (their names, shapes or dtypes differ); "
                    "every rank must pass the same model and shape dict"
                )
            )
        token, failure, seen = got[2], None, True
        crc = Pieces(layout.size)
        try:
            try:
                fd = os.open(tmp, os.O_RDWR)
                seen = os.pread(fd, 8, _TOKEN_AT) == struct.pack("<q", token)
            except FileNotFoundError:
                seen = False
            if seen:  # never a byte into a file that is not rank 0's
                show = _ckpt_dist.show_progress(progress)
                write_pieces(fd, _pieces(parts, layout, True), crc, staging_bytes, show, base)
                # Each rank flushes its own writes: on a filesystem shared by several hosts (NFS, Lustre) only
                # the client that wrote a page can flush it, so rank 0's fsync would not cover them. On one
                # host too: each flush puts the disk to work while other ranks still write, which beats one
                # flush at the end (benchmarks/diagnostics/fsync_placement.py).
                os.fsync(fd)
                phase("par-written")
        except Exception as e:
            failure = e
        if me == 0:
            crc.add(0, layout.prefix)
        share = [VALUE_CAP] * world
        share[me] = crc.value()
        got = exchange(fn, failure, group, [me if not seen else world, *share])
        if got[0] < world:
            raise mark_agreed(
                ValueError(
                    f"{fn}: the ranks do not all see the same directory {d} (no shared filesystem): rank "
                    f"{got[0]} does not see the file rank 0 created"
                )
            )
        checksum = _ckpt_files.checksum_text(file_crc(layout.size, got[1:]))
        try:
            if me == 0:
                _write_all(fd, 0, layout.prefix)
                phase("par-header")
                os.fsync(fd)
                os.close(fd)
                fd = -1
                os.rename(tmp, path)
                phase("par-renamed")
                _ckpt_files.fsync_path(d)
        except Exception as e:
            failure = e
        agree(fn, failure, group)
        return checksum
    except BaseException:
        if me == 0 and os.path.exists(tmp):
            os.remove(tmp)  # a partial file frees its space; the previous file is untouched
        raise
    finally:
        if fd >= 0:
            os.close(fd)
