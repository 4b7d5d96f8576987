"""Where the gather-free save's fsyncs go: every rank flushing its own writes
(what ``save_sharded_as_consolidated`` does) against one flush by rank 0 after
the header (enough on one host: the ranks share its page cache).

4 ranks on gloo, the 11B layout at OSF_BENCH_CKPT_D (default 160, 66 MB bf16),
the two modes alternating over OSF_DIAG_ROUNDS (default 24) saves each; per
save the slowest rank's time until the file is complete; medians and
quartiles, the first two saves of each mode left out. Run:
``python -m benchmarks.diagnostics.fsync_placement``.

The "one" mode patches ``os.fsync`` in the worker processes: rank 0 skips its
flush before the header (its flush after the header covers those pages too),
the other ranks skip theirs."""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.bench_ckpt_parallel import WORLD, D, _Params, _port
from benchmarks.common import machine
from benchmarks.layouts import flux_mmdit_11b_shapes

ROUNDS = int(os.environ.get("OSF_DIAG_ROUNDS", "24"))


def _worker(rank, world, port, tmp):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from opensora_fast.utils import ckpt

    ema = _Params(flux_mmdit_11b_shapes(d=D), torch.bfloat16)
    shape_dict = ckpt.record_model_param_shape(ema)
    ckpt.model_sharding(ema)
    real, calls, mode = os.fsync, [0], ["every"]

    def fsync(fd):
        calls[0] += 1
        if mode[0] == "one" and (rank != 0 or calls[0] == 1):
            return None  # rank 0's first call: the partial file before its header
        return real(fd)

    os.fsync = fsync
    times = {"every": [], "one": []}
    for r in range(ROUNDS):
        for m in ("every", "one") if r % 2 == 0 else ("one", "every"):
            mode[0], calls[0] = m, 0
            path = os.path.join(tmp, f"{m}{r}.safetensors")
            dist.barrier()
            t0 = time.perf_counter()
            ckpt.save_sharded_as_consolidated(ema, shape_dict, path, progress=False)
            t = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[m].append(t.item())
            if rank == 0:
                os.remove(path)
    if rank == 0:
        print(f"gather-free save, fsync placement, {machine()}; gloo {world} ranks, d={D}, {ROUNDS} saves per mode")
        for m, label in (("every", "every rank fsyncs its writes (as shipped)"), ("one", "rank 0 fsyncs once")):
            v = sorted(times[m][2:])
            q1, q3 = v[len(v) // 4], v[3 * len(v) // 4]
            print(f"  {label:<45} median {statistics.median(v) * 1e3:6.1f} ms  q1 {q1 * 1e3:6.1f}  q3 {q3 * 1e3:6.1f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="osf_fsync_") as tmp:
        mp.start_processes(_worker, args=(WORLD, _port(), tmp), nprocs=WORLD, start_method="fork")
