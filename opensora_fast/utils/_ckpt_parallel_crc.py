"""The CRC-32 of a file that many ranks write (or read) in pieces, without
any rank seeing the whole file: each piece's CRC register, advanced over the
bytes that follow it to the end of the file, is XORed into one value; the
XOR of every rank's value gives ``zlib.crc32`` of the whole file (CRC-32 is
affine over GF(2)). Advancing a register over ``L`` zero bytes is a linear
map; the maps for ``L = 2^k`` are kept as byte tables, so one advance costs
at most one table lookup per set bit of ``L``, whatever ``L`` is."""

from __future__ import annotations

import zlib
from typing import List, Tuple

import numpy as np

_POLY = 0xEDB88320  # zlib's reflected polynomial
_MASK = 0xFFFFFFFF

Tables = Tuple[List[int], List[int], List[int], List[int]]
_levels: List[Tables] = []  # _levels[k]: advance over 2^k zero bytes
_np_levels: List[np.ndarray] = []  # the same as [4, 256] uint64 arrays


def _one_zero_byte(c: int) -> int:
    for _ in range(8):
        c = (c >> 1) ^ _POLY if c & 1 else c >> 1
    return c


def _apply(t: Tables, v: int) -> int:
    return t[0][v & 255] ^ t[1][(v >> 8) & 255] ^ t[2][(v >> 16) & 255] ^ t[3][v >> 24]


def _tables(columns: List[int]) -> Tables:
    """A linear map on 32-bit registers (``columns[j]``: the image of bit j)
    as four tables, one per input byte."""
    out = []
    for j in range(4):
        t = [0] * 256
        for b in range(1, 256):
            low = b & -b
            t[b] = t[b ^ low] ^ columns[8 * j + low.bit_length() - 1]
        out.append(t)
    return tuple(out)  # type: ignore[return-value]


def _level(k: int) -> Tables:
    while len(_levels) <= k:
        if not _levels:
            cols = [_one_zero_byte(1 << j) for j in range(32)]
        else:
            prev = _levels[-1]
            cols = [_apply(prev, _apply(prev, 1 << j)) for j in range(32)]
        _levels.append(_tables(cols))
    return _levels[k]


def advance(register: int, nbytes: int) -> int:
    """The CRC register after ``nbytes`` zero bytes (no pre/post inversion)."""
    k = 0
    while nbytes:
        if nbytes & 1:
            register = _apply(_level(k), register)
        nbytes >>= 1
        k += 1
    return register


def advance_many(registers: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """:func:`advance` of many registers at once (uint64 arrays): one
    vectorised table step per bit position instead of a Python loop per piece."""
    v, s = registers.astype(np.uint64), nbytes.astype(np.uint64)
    k = 0
    while s.any():
        m = (s & np.uint64(1)).astype(bool)
        if m.any():
            while len(_np_levels) <= k:
                _np_levels.append(np.array(_level(len(_np_levels)), dtype=np.uint64))
            t, x = _np_levels[k], v[m]
            v[m] = t[0][x & 255] ^ t[1][(x >> 8) & 255] ^ t[2][(x >> 16) & 255] ^ t[3][x >> 24]
        s >>= np.uint64(1)
        k += 1
    return v


class Pieces:
    """Accumulates the pieces of a file of ``size`` bytes that this rank
    holds; :meth:`value` is its share, :func:`file_crc` joins the shares."""

    def __init__(self, size: int):
        self.size = size
        self.registers: List[int] = []
        self.shifts: List[int] = []

    def add(self, pos: int, data) -> None:
        """``data`` (a buffer) lies at byte ``pos`` of the file."""
        n = memoryview(data).nbytes
        if not n:
            return
        self.registers.append(zlib.crc32(data, _MASK) ^ _MASK)  # the register started at 0
        self.shifts.append(self.size - pos - n)  # bytes after the piece

    def value(self) -> int:
        if not self.registers:
            return 0
        v = advance_many(np.array(self.registers, dtype=np.uint64), np.array(self.shifts, dtype=np.uint64))
        return int(np.bitwise_xor.reduce(v))


def file_crc(size: int, shares) -> int:
    """``zlib.crc32`` of the whole file from every rank's share (pieces that
    together cover each byte of the file exactly once)."""
    v = advance(_MASK, size) ^ _MASK
    for s in shares:
        v ^= int(s)
    return v & _MASK
