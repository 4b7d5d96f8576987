"""Whether O_DIRECT would speed up the gather-free save's writes: W processes
each write S bytes at their own offset of one preallocated file, then fsync,
through the page cache (what ``save_sharded_as_consolidated`` does) or with
O_DIRECT (page-aligned buffers and offsets: the best case for it, before the
shared boundary pages and unaligned shards a real save would add).

OSF_DIAG_WORLD processes (default 4), OSF_DIAG_MB each (default 16: a 4-rank
share of the demo's 66 MB EMA), the two modes alternating over
OSF_DIAG_ROUNDS (default 12) fresh files each; per round the slowest
process's time to the end of its writes and to the end of its fsync;
medians. Run: ``python -m benchmarks.diagnostics.direct_io``."""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import statistics
import tempfile
import time

from benchmarks.common import machine

WORLD = int(os.environ.get("OSF_DIAG_WORLD", "4"))
SIZE = int(os.environ.get("OSF_DIAG_MB", "16")) << 20
ROUNDS = int(os.environ.get("OSF_DIAG_ROUNDS", "12"))
MODES = ("buffered", "direct")


def _writer(rank: int, path: str, mode: str, barrier, out) -> None:
    buf = mmap.mmap(-1, SIZE)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(1 << 20) * (SIZE >> 20))
    fd = os.open(path, os.O_WRONLY | (os.O_DIRECT if mode == "direct" else 0))
    try:
        barrier.wait()
        t0 = time.perf_counter()
        view, pos = memoryview(buf), rank * SIZE
        while view.nbytes:
            n = os.pwritev(fd, [view], pos)
            view, pos = view[n:], pos + n
        t1 = time.perf_counter()
        os.fsync(fd)
        out.put((t1 - t0, time.perf_counter() - t0))
    finally:
        os.close(fd)


def _round(directory: str, mode: str, r: int):
    path = os.path.join(directory, f"{mode}{r}.bin")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.posix_fallocate(fd, 0, WORLD * SIZE)
    finally:
        os.close(fd)
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(WORLD), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(k, path, mode, barrier, out)) for k in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    os.remove(path)
    if any(p.exitcode != 0 for p in procs):  # e.g. a filesystem without O_DIRECT: say so, never wait on the queue
        raise RuntimeError(f"direct_io: a {mode} writer failed (exit codes {[p.exitcode for p in procs]})")
    got = [out.get() for _ in procs]
    return max(g[0] for g in got), max(g[1] for g in got)


def main() -> None:
    times = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(dir=os.environ.get("OSF_DIAG_DIR")) as d:
        for r in range(ROUNDS):
            for m in MODES if r % 2 == 0 else MODES[::-1]:
                times[m].append(_round(d, m, r))
    print(f"{WORLD} processes x {SIZE >> 20} MB into one preallocated file, {ROUNDS} rounds, {machine()}")
    for m in MODES:
        w = statistics.median(t[0] for t in times[m]) * 1e3
        total = statistics.median(t[1] for t in times[m]) * 1e3
        print(f"  {m:9s} writes {w:7.1f} ms   writes + fsync {total:7.1f} ms (median, slowest process)")


if __name__ == "__main__":
    main()
