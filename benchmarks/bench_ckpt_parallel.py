"""Gather-free checkpoints vs the gather paths, 4 ranks on gloo (forked
processes), the 1082 tensors of the 11B layout scaled down (hidden size
OSF_BENCH_CKPT_D, default 160: about 32M params, a 64 MB bf16 EMA).

Save, time until the file is complete (fsynced, renamed into place, its
directory fsynced), the same layout, the same 4 processes:

* parallel: ``save_sharded_as_consolidated`` (every rank writes its bytes)
* ours, gather: ``model_gathering`` into host buffers kept across saves (as
  CheckpointIO keeps them), then rank 0's writer (the path CheckpointIO.save
  takes without ``parallel``)
* upstream-faithful: the per-parameter all_gather, then safetensors'
  ``save_file`` of the whole state on rank 0 (its own processes: slow)

Parallel and gather run in alternating order in OSF_BENCH_CKPT_ROUNDS
(default 9) rounds, each call started by a barrier; per round the slowest
rank's time; the median of the rounds and of the per-round ratios. The
extra host memory per rank (peak RSS minus RSS before, sampled every
0.5 ms) is taken in a first, untimed call of each path, which for the
gather path includes making its host buffers.

Load: ``load_sharded_from_consolidated`` (each rank reads its own ranges)
vs upstream (every rank loads the whole file, ``load_state_dict``, then
``model_sharding``); bytes read per rank.

Run: ``python -m benchmarks.bench_ckpt_parallel`` or through ``make bench``.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

try:
    from benchmarks.layouts import flux_mmdit_11b_shapes
except ImportError:  # before the layouts moved
    from opensora_fast._layouts import flux_mmdit_11b_shapes

WORLD = int(os.environ.get("OSF_BENCH_CKPT_WORLD", "4"))
D = int(os.environ.get("OSF_BENCH_CKPT_D", "160"))
ROUNDS = int(os.environ.get("OSF_BENCH_CKPT_ROUNDS", "9"))
UPSTREAM_ROUNDS = min(ROUNDS, 3)  # seconds each
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class _PeakRss:
    """Peak resident memory above the level at entry, sampled on a thread."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()
        self.peak = max(self.peak, _rss())
        self.extra = self.peak - self.base


class _Params(torch.nn.Module):
    def __init__(self, shapes, dtype, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for i, s in enumerate(shapes):
            self.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)))


def _trim() -> None:
    """Returns the C heap's free pages to the system, so memory a call reuses
    from earlier frees (the full model before sharding) counts in its RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rounds(fn, make_path, rounds):
    """(median seconds, max extra RSS bytes) over ``rounds`` calls of fn(path)."""
    times, extra = [], 0
    for r in range(rounds):
        path = make_path(r)
        _trim()
        dist.barrier()
        with _PeakRss() as m:
            t0 = time.perf_counter()
            fn(path)
            times.append(time.perf_counter() - t0)
        extra = max(extra, m.extra)
    return statistics.median(times), extra


def _first_call_memory(fn, path) -> int:
    """Extra RSS bytes of one untimed call of fn(path)."""
    _trim()
    dist.barrier()
    with _PeakRss() as m:
        fn(path)
    return m.extra


def _interleaved(fns, make_path, rounds):
    """{name: [seconds per round]} of the calls ``fns`` (name -> fn(path)),
    their order reversed every other round, each call started by a barrier."""
    names = list(fns)
    times = {k: [] for k in names}
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            path = make_path(k, r)
            _trim()
            dist.barrier()
            t0 = time.perf_counter()
            fns[k](path)
            times[k].append(time.perf_counter() - t0)
    return times


def _worker(rank, world, port, tmp, out_path, what):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from safetensors.torch import load_file, save_file

    from opensora_fast.reference.upstream import ckpt as ref
    from opensora_fast.utils import _ckpt_parallel, _ckpt_write, ckpt

    shapes = flux_mmdit_11b_shapes(d=D)
    ema = _Params(shapes, torch.bfloat16)
    shape_dict = ckpt.record_model_param_shape(ema)
    ckpt.model_sharding(ema)
    shard_bytes = sum(p.numel() * p.element_size() for p in ema.parameters())
    n_params = sum(math.prod(s) for s in shapes)
    res = {"params": n_params, "shard bytes": shard_bytes}

    def path_in(kind):
        d = os.path.join(tmp, kind)
        if rank == 0:
            os.makedirs(d, exist_ok=True)
        return lambda r: os.path.join(d, f"ema{r}.safetensors")

    def parallel(path):
        ckpt.save_sharded_as_consolidated(ema, shape_dict, path, progress=False)

    pinned = {}

    def ours_gather(path):
        if rank == 0 and not pinned:  # made once, kept across saves (CheckpointIO's buffers)
            pinned.update(ckpt.CheckpointIO._pinned_dict((k, v, torch.bfloat16) for k, v in shape_dict.items()))
        ckpt.model_gathering(ema, shape_dict, pinned if rank == 0 else None, progress=False)
        if rank == 0:
            tmp_path = path + ".tmp"
            _ckpt_write.write_safetensors(tmp_path, pinned)  # fsyncs the file
            os.rename(tmp_path, path)
            ckpt._ckpt_files.fsync_path(os.path.dirname(path))
        dist.barrier()

    def upstream(path):
        pinned = {k: torch.empty(v, dtype=torch.bfloat16) for k, v in shape_dict.items()} if rank == 0 else None
        ref.model_gathering(ema, shape_dict, pinned)
        if rank == 0:
            save_file(pinned, path)
            ckpt._ckpt_files.fsync_path(path)
            ckpt._ckpt_files.fsync_path(os.path.dirname(path))
        dist.barrier()

    if what == "save":  # parallel and gather side by side in the same processes
        paths = {"parallel": path_in("parallel"), "gather": path_in("gather")}
        res["mem parallel"] = _first_call_memory(parallel, paths["parallel"]("first"))
        res["mem gather"] = _first_call_memory(ours_gather, paths["gather"]("first"))
        times = _interleaved({"parallel": parallel, "gather": ours_gather}, lambda k, r: paths[k](r), ROUNDS)
        res["rounds parallel"], res["rounds gather"] = times["parallel"], times["gather"]
        _done(res, world, rank, out_path)
        return
    if what == "upstream":  # its own processes: its memory is its own
        res["save upstream"], res["mem upstream"] = _rounds(upstream, path_in("upstream"), UPSTREAM_ROUNDS)
        _done(res, world, rank, out_path)
        return
    if rank == 0:
        want = open(path_in("gather")(0), "rb").read()
        res["files equal"] = open(path_in("parallel")(0), "rb").read() == want
        theirs, ours = load_file(path_in("upstream")(0)), load_file(path_in("parallel")(0))
        res["files equal"] &= theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)

    # load: ours sharded vs upstream's full load + shard
    src = path_in("parallel")(0)
    read = [0]

    def counting(fd, bufs, pos):
        n = os.preadv(fd, bufs, pos)
        read[0] += n
        return n

    back = _Params(shapes, torch.bfloat16, seed=1)
    ckpt.model_sharding(back)
    _ckpt_parallel.preadv = counting
    res["load ours"], res["load mem ours"] = _rounds(
        lambda p: ckpt.load_sharded_from_consolidated(back, p), lambda r: src, ROUNDS
    )
    _ckpt_parallel.preadv = os.preadv
    with open(src, "rb") as f:
        res["header bytes"] = 8 + int.from_bytes(f.read(8), "little")
    res["read ours"] = read[0] // ROUNDS + res["header bytes"]
    res["equal after load"] = all(torch.equal(a, b) for a, b in zip(back.parameters(), ema.parameters()))

    def upstream_load(p):
        full = _Params(shapes, torch.bfloat16, seed=2)
        full.load_state_dict(load_file(p), strict=True, assign=True)
        ref.model_sharding(full)

    res["load upstream"], res["load mem upstream"] = _rounds(upstream_load, lambda r: src, UPSTREAM_ROUNDS)
    res["read upstream"] = os.path.getsize(src)
    _done(res, world, rank, out_path)


def _done(res, world, rank, out_path):
    gathered = [None] * world
    dist.all_gather_object(gathered, res)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


def run_cpu() -> list[str]:
    tmp = tempfile.mkdtemp(prefix="osf_bench_ckpt_par_")
    out = os.path.join(tmp, "res.json")
    try:
        ranks = None
        for what in ("save", "upstream", "load"):
            args = (WORLD, _port(), tmp, out, what)
            mp.start_processes(_worker, args=args, nprocs=WORLD, join=True, start_method="fork")
            got = json.load(open(out))
            ranks = got if ranks is None else [dict(a, **b) for a, b in zip(ranks, got)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from benchmarks.common import machine

    r0 = ranks[0]
    mb = 1e6
    shard = max(r["shard bytes"] for r in ranks)
    per_round = {k: [max(r[f"rounds {k}"][i] for r in ranks) for i in range(ROUNDS)] for k in ("parallel", "gather")}
    med = {k: statistics.median(v) for k, v in per_round.items()}
    med["upstream"] = max(r["save upstream"] for r in ranks)
    ratios = sorted(g / p for p, g in zip(per_round["parallel"], per_round["gather"]))
    lines = [
        f"gather-free checkpoints on {machine()}",
        f"[gloo, {WORLD} ranks, 1082 tensors of the 11B layout at d={D}: {r0['params'] / 1e6:.1f}M params, "
        f"bf16 EMA {r0['params'] * 2 / mb:.0f} MB, shard {shard / mb:.1f} MB per rank; parallel and gather "
        f"interleaved, median of {ROUNDS} rounds (upstream: {UPSTREAM_ROUNDS}, own processes)]",
        f"  {'save, until the file is complete':<40} {'s':>8} {'/ parallel':>10} {'extra MB r0':>11} {'max r>0':>8}",
    ]
    for name in ("parallel", "gather", "upstream"):
        t = med[name]
        lines.append(
            f"  {name:<40} {t:8.3f} {t / med['parallel']:9.2f}x "
            f"{r0[f'mem {name}'] / mb:11.1f} {max(r[f'mem {name}'] for r in ranks[1:]) / mb if WORLD > 1 else 0:8.1f}"
        )
    lines.append(
        f"  gather / parallel per round: min {ratios[0]:.2f}x, median {statistics.median(ratios):.2f}x, "
        f"max {ratios[-1]:.2f}x"
    )
    lines.append(f"  parallel file == gather file byte for byte, == upstream's tensor for tensor: {r0['files equal']}")
    lo, lu = max(r["load ours"] for r in ranks), max(r["load upstream"] for r in ranks)
    read = max(r["read ours"] for r in ranks)
    lines += [
        f"  {'load into the sharded model':<40} {'s':>8} {'speed-up':>10} {'read MB/rank':>12}",
        f"  {'ours, own ranges':<40} {lo:8.3f} {lu / lo:9.2f}x {read / mb:12.2f}",
        f"  {'upstream, whole file + model_sharding':<40} {lu:8.3f} {1:9.2f}x {r0['read upstream'] / mb:12.2f}",
        f"  bytes read per rank <= own shard + header: {all(r['read ours'] <= r['shard bytes'] + r['header bytes'] for r in ranks)}; "
        f"loaded shards equal: {all(r['equal after load'] for r in ranks)}",
    ]
    if not (r0["files equal"] and all(r["equal after load"] for r in ranks)):
        lines.append("  RESULTS DIFFER")
    return lines


def test_ckpt_parallel(request):
    lines = run_cpu()
    request.config._osf_extra_lines = getattr(request.config, "_osf_extra_lines", []) + [""] + lines
    assert "DIFFER" not in "\n".join(lines)


if __name__ == "__main__":
    out = run_cpu()
    print("\n".join(out))
    sys.exit(1 if "DIFFER" in "\n".join(out) else 0)
