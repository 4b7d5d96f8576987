"""The one timing path for all benchmarks: pytest-benchmark's ``pedantic`` over a
callable that synchronises the device at its end (so wall-clock covers the GPU
work), plus the side-by-side table printed at the end of the run (conftest.py).
The per-call scripts in benchmarks/diagnostics/ use ``call_us``."""

from __future__ import annotations

import os
import platform
import time

import torch

ROUNDS = int(os.environ.get("OSF_BENCH_ROUNDS", "7"))
# A round repeats the call until it lasts about this long (one call for slower
# ones), so a call of tens of microseconds is not timed one at a time: one burst
# of noise then moves a round's mean, not the median of them all.
MIN_ROUND_S = float(os.environ.get("OSF_BENCH_MIN_ROUND_S", "0.001"))


def bench_device() -> torch.device:
    name = os.environ.get("OSF_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(benchmark, fn, *, group: str, impl: str, role: str, nbytes: int, rounds: int = ROUNDS, **info):
    """Times ``fn``, synchronised after every call: the median over ``rounds``
    rounds (after 2 warm-up rounds) of a round's time per call, a round being
    as many calls as fill ``MIN_ROUND_S`` (at least one). Records what the
    table needs. role: roofline | baseline | alternative | ours."""
    dev_sync = torch.cuda.synchronize if torch.cuda.is_initialized() else None

    def call():
        fn()
        if dev_sync is not None:
            dev_sync()

    call()  # the first call may set things up: not the one that sizes the rounds
    t0 = time.perf_counter()
    call()
    one = time.perf_counter() - t0
    iterations = max(1, min(1000, int(MIN_ROUND_S / max(one, 1e-9))))
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, role=role, bytes=int(nbytes), calls_per_round=iterations, **info)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=2, iterations=iterations)


def call_us(
    fn, calls: int = 200, *, batches: int = 1, sync=None, each: bool = False, warmup: int = 10, before=None
) -> float:
    """Microseconds per call of ``fn`` after ``warmup`` calls. ``each``: the median
    of ``calls`` calls, ``sync`` after each (wall-clock, device work included),
    ``before`` (untimed) ahead of each, e.g. a barrier of a multi-process run.
    Otherwise: the best of ``batches`` loops of ``calls`` calls with ``sync`` only
    outside the timed loop (what the host spends issuing them)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    if each:
        times = []
        for _ in range(calls):
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return sorted(times)[calls // 2] * 1e6
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        sync()
    return best


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if bench_device().type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name()}"
    return desc


def copy_roofline(benchmark, group: str, nbytes: int, device: torch.device):
    """A plain copy_ moving the same bytes (half read, half written)."""
    n = max(nbytes // 2, 1)
    a = torch.ones(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    run(benchmark, lambda: b.copy_(a), group=group, impl="copy_ (same bytes)", role="roofline", nbytes=nbytes)


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` beyond what was live before it. On CUDA from
    the caching allocator's statistics; on the CPU by tracking the storages of
    every op's outputs while they live (kernel-internal scratch not included)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Track(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.peak, self.seen = 0, 0, set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {
                a.untyped_storage().data_ptr()
                for a in tree_leaves((args, kwargs))
                if isinstance(a, torch.Tensor) and a.device.type == "cpu"
            }
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    st = t.untyped_storage()
                    key = st.data_ptr()
                    if key and key not in self.seen and key not in inputs:  # views are not new
                        self.seen.add(key)
                        self.live += st.nbytes()
                        self.peak = max(self.peak, self.live)
                        weakref.finalize(t, self._free, key, st.nbytes())  # approx.: a view may outlive it
            return out

        def _free(self, key, n):
            self.seen.discard(key)
            self.live -= n

    with Track() as tr:
        fn()
    return tr.peak
