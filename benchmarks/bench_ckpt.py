"""The sharded checkpoint path, upstream-faithful vs ours, side by side.

CPU (always): 4 ranks on gloo (forked processes), the 1082 tensors of the 11B
layout scaled down (hidden size OSF_BENCH_CKPT_D, default 160: about 32M
params). Times on rank 0, median of OSF_BENCH_CKPT_ROUNDS (default 3), each
round started by a barrier:

* model_gathering of the bf16 EMA (upstream: an all_gather of a list, a cat, a
  slice and a copy per parameter; ours: one gather per bucket + one unpad_ call)
* master_weights_gathering of the fp32 master shards (the same, per ZeRO group)
* a full EMA checkpoint save. Upstream's own writer (tensornvme's
  AsyncFileWriter) is not on PyPI, so its faithful form is the per-parameter
  gather then a synchronous safetensors write of the pinned dict; ours is
  CheckpointIO.save: "loop free" is when save returns, "file complete" when
  _sync_io returns (the file fsynced and renamed into place).

Host time (always): model_gathering of the 11B layout at hidden size
OSF_BENCH_CKPT_HOST_D (default 32: 1082 tensors, few bytes, so the host's
per-parameter work dominates), world 1 and gloo world 2, into CheckpointIO's
buffers, with the plan derived afresh at every save vs reused from the last.

GPU (when OSF_BENCH_DEVICE=cuda): 1 rank on NCCL, gather + unpad_ straight into
pinned host memory vs a plain device-to-host copy of the same bytes.

Run: ``python -m benchmarks.bench_ckpt`` or through ``make bench``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import call_us

WORLD = int(os.environ.get("OSF_BENCH_CKPT_WORLD", "4"))
D = int(os.environ.get("OSF_BENCH_CKPT_D", "160"))
ROUNDS = int(os.environ.get("OSF_BENCH_CKPT_ROUNDS", "3"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Params(torch.nn.Module):
    def __init__(self, shapes, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self._names = []
        for i, s in enumerate(shapes):
            self.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)))


class _Zero:
    """get_working_to_master_map and param_to_pg, as ColossalAI's ZeRO has."""

    def __init__(self, model, world, rank):
        self.w2m, self.param_to_pg = {}, {}
        for p in model.parameters():
            flat = p.detach().float().reshape(-1)
            flat = torch.nn.functional.pad(flat, [0, (world - flat.numel() % world) % world])
            s = flat.numel() // world
            self.w2m[id(p)] = flat[rank * s : (rank + 1) * s].clone()
            self.param_to_pg[p] = dist.group.WORLD

    def get_working_to_master_map(self):
        return self.w2m


def _median_time(fn, rounds):
    """Seconds: the median of ``rounds`` calls, every rank starting together."""
    return call_us(fn, rounds, each=True, warmup=0, before=dist.barrier) / 1e6


def _worker(rank, world, port, tmp, out_path):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from benchmarks.layouts import flux_mmdit_11b_shapes
    from opensora_fast.reference.upstream import ckpt as ref
    from opensora_fast.utils import ckpt

    shapes = flux_mmdit_11b_shapes(d=D)
    ema = _Params(shapes, torch.bfloat16)
    shape_dict = ckpt.record_model_param_shape(ema)
    model = _Params(shapes, torch.bfloat16)
    zero = _Zero(model, world, rank)
    ckpt.model_sharding(ema)
    n_params = sum(math.prod(s) for s in shapes)

    def pinned_ema():
        return {k: torch.empty(shape_dict[k], dtype=torch.bfloat16) for k in shape_dict} if rank == 0 else None

    def pinned_master():
        return (
            {n: torch.empty(p.shape, dtype=torch.float32) for n, p in model.named_parameters()} if rank == 0 else None
        )

    res = {}
    a, b = pinned_ema(), pinned_ema()
    res["ema upstream"] = _median_time(lambda: ref.model_gathering(ema, shape_dict, a), ROUNDS)
    res["ema ours"] = _median_time(lambda: ckpt.model_gathering(ema, shape_dict, b, progress=False), ROUNDS)
    if rank == 0:
        res["ema equal"] = all(torch.equal(a[k], b[k]) for k in a)
    a, b = pinned_master(), pinned_master()
    res["master upstream"] = _median_time(lambda: ref.master_weights_gathering(model, zero, a), ROUNDS)
    res["master ours"] = _median_time(lambda: ckpt.master_weights_gathering(model, zero, b, progress=False), ROUNDS)
    if rank == 0:
        res["master equal"] = all(torch.equal(a[k], b[k]) for k in a)

    # full EMA checkpoint
    from safetensors.torch import save_file

    up_pinned = pinned_ema()
    step = [0]

    def upstream_save():
        step[0] += 1
        d = os.path.join(tmp, "up", f"epoch0-global_step{step[0]}")
        ref.model_gathering(ema, shape_dict, up_pinned)
        if rank == 0:
            os.makedirs(d, exist_ok=True)
            ckpt.save_json({"step": step[0]}, os.path.join(d, "running_states.json"))
            save_file(up_pinned, os.path.join(d, "ema.safetensors"))
        dist.barrier()

    res["save upstream"] = _median_time(upstream_save, ROUNDS)
    io = ckpt.CheckpointIO(progress=False)
    free, done = [], []  # two times per save (call_us takes one): timed here
    for r in range(ROUNDS + 1):  # round 0 allocates the pinned buffers
        dist.barrier()
        t0 = time.perf_counter()
        io.save(
            None,
            os.path.join(tmp, "ours"),
            ema=ema,
            epoch=0,
            step=r,
            global_step=r,
            actual_update_step=r,
            ema_shape_dict=shape_dict,
            async_io=True,
        )
        t1 = time.perf_counter()
        io._sync_io()
        t2 = time.perf_counter()
        if r:
            free.append(t1 - t0)
            done.append(t2 - t0)
    res["save ours free"] = statistics.median(free)
    res["save ours done"] = statistics.median(done)
    res["params"] = n_params
    res["ema bytes"] = n_params * 2
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def run_cpu() -> list[str]:
    tmp = tempfile.mkdtemp(prefix="osf_bench_ckpt_")
    out = os.path.join(tmp, "res.json")
    try:
        mp.start_processes(_worker, args=(WORLD, _port(), tmp, out), nprocs=WORLD, join=True, start_method="fork")
        res = json.load(open(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from benchmarks.common import machine

    mb = res["ema bytes"] / 1e6
    lines = [
        f"checkpoint path on {machine()}",
        f"[gloo, {WORLD} ranks, 1082 tensors of the 11B layout at d={D}: {res['params'] / 1e6:.1f}M params; "
        f"EMA bf16 {mb:.0f} MB, master fp32 {2 * mb:.0f} MB; median of {ROUNDS}]",
        f"  {'what':<44} {'upstream s':>10} {'ours s':>9} {'speed-up':>9}",
    ]

    def row(name, up, ours):
        lines.append(f"  {name:<44} {up:10.3f} {ours:9.3f} {up / ours:8.2f}x")

    row("model_gathering (EMA)" + ("" if res["ema equal"] else " RESULTS DIFFER"), res["ema upstream"], res["ema ours"])
    row(
        "master_weights_gathering" + ("" if res["master equal"] else " RESULTS DIFFER"),
        res["master upstream"],
        res["master ours"],
    )
    row("EMA checkpoint save: until the loop may go on", res["save upstream"], res["save ours free"])
    row("EMA checkpoint save: until the file is complete", res["save upstream"], res["save ours done"])
    return lines


HOST_D = int(os.environ.get("OSF_BENCH_CKPT_HOST_D", "32"))
HOST_ROUNDS = int(os.environ.get("OSF_BENCH_CKPT_HOST_ROUNDS", "30"))


class _NoPlans(dict):
    """A plan cache that keeps nothing: every gather derives its plan."""

    def __setitem__(self, key, value):
        pass


def _host_times(rank: int) -> dict:
    """Milliseconds per model_gathering on this rank, plan fresh vs cached."""
    from benchmarks.layouts import flux_mmdit_11b_shapes
    from opensora_fast.utils import _ckpt_shard, ckpt

    ema = torch.nn.Module()
    for i, s in enumerate(flux_mmdit_11b_shapes(d=HOST_D)):
        ema.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(s).bfloat16()))
    shape_dict = ckpt.record_model_param_shape(ema)
    ckpt.model_sharding(ema)
    pinned = (
        ckpt.CheckpointIO._pinned_dict((k, v, torch.bfloat16) for k, v in shape_dict.items()) if rank == 0 else None
    )
    out = {}
    kept = _ckpt_shard._model_cache
    for what, cache in (("fresh", _NoPlans()), ("cached", kept)):
        _ckpt_shard._model_cache = cache
        try:
            gather = lambda: ckpt.model_gathering(ema, shape_dict, pinned, progress=False)  # noqa: E731
            gather()
            before = dist.barrier if dist.get_world_size() > 1 else None
            out[what] = call_us(gather, HOST_ROUNDS, each=True, warmup=1, before=before) / 1e3
        finally:
            _ckpt_shard._model_cache = kept
    return out


def _host_worker(rank, world, port, out_path):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = _host_times(rank)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


def run_host() -> list[str]:
    """Host milliseconds per model_gathering (rank 0), world 1 and gloo world 2."""
    tmp = tempfile.mkdtemp(prefix="osf_bench_ckpt_host_")
    lines = [
        f"[model_gathering host time: 1082 tensors of the 11B layout at d={HOST_D}, into CheckpointIO's "
        f"buffers; median of {HOST_ROUNDS}]",
        f"  {'world':<44} {'fresh ms':>10} {'cached ms':>9} {'speed-up':>9}",
    ]
    try:
        for world in (1, 2):
            out = os.path.join(tmp, f"host{world}.json")
            mp.start_processes(_host_worker, args=(world, _port(), out), nprocs=world, join=True, start_method="fork")
            res = json.load(open(out))
            name = "1 (no collective)" if world == 1 else f"{world} (gloo)"
            lines.append(f"  {name:<44} {res['fresh']:10.3f} {res['cached']:9.3f} {res['fresh'] / res['cached']:8.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return lines


def run_gpu() -> list[str]:
    """1 rank, NCCL: gather + unpack into pinned host memory vs a plain D2H copy of
    the same bytes; into separate pinned tensors and into CheckpointIO's one
    pinned buffer, each with the kernel's direct stores and with staging."""
    from benchmarks.layouts import flux_mmdit_11b_shapes
    from opensora_fast.utils import ckpt

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        shapes = flux_mmdit_11b_shapes(d=int(os.environ.get("OSF_BENCH_CKPT_GPU_D", "1024")))
        ema = torch.nn.Module()
        for i, s in enumerate(shapes):
            ema.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(s, device="cuda").bfloat16()))
        shape_dict = ckpt.record_model_param_shape(ema)
        ckpt.model_sharding(ema)
        pinned = {k: torch.empty(v, dtype=torch.bfloat16, pin_memory=True) for k, v in shape_dict.items()}
        nbytes = sum(p.numel() * 2 for p in ema.parameters())
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

        def timed(fn, rounds=10):
            return call_us(fn, rounds, sync=torch.cuda.synchronize, each=True, warmup=1) / 1e6

        t_copy = timed(lambda: dst.copy_(src, non_blocking=True))
        flat = ckpt.CheckpointIO._pinned_dict((k, v, torch.bfloat16) for k, v in shape_dict.items())
        lines = [
            f"[NCCL, 1 rank, {torch.cuda.get_device_name()}, {nbytes / 1e9:.2f} GB bf16 EMA, 1082 tensors]",
            f"  {'plain device-to-host copy_ into pinned memory':<58} {nbytes / t_copy / 1e9:7.1f} GB/s",
        ]
        for what, out, staging in (
            ("separate pinned tensors, unpad_ stores (default)", pinned, None),
            ("separate pinned tensors, staging=True", pinned, True),
            ("CheckpointIO's pinned segments, staged (default)", flat, None),
            ("CheckpointIO's pinned segments, staging=False", flat, False),
        ):
            for v in out.values():
                v.zero_()
            t = timed(lambda o=out, st=staging: ckpt.model_gathering(ema, shape_dict, o, progress=False, staging=st))
            ok = all(
                torch.equal(out[k].view(-1), p.detach().cpu()[: out[k].numel()])
                for k, p in zip(shape_dict, ema.parameters())
            )
            lines.append(
                f"  model_gathering -> {what:<39} {nbytes / t / 1e9:7.1f} GB/s "
                f"({100 * t_copy / t:.0f}% of the copy){'' if ok else ' RESULTS DIFFER'}"
            )
        return lines
    finally:
        dist.destroy_process_group()


def test_checkpoint_path(request):
    lines = run_cpu() + run_host()
    from benchmarks.common import bench_device

    if bench_device().type == "cuda":
        lines += run_gpu()
    # printed by benchmarks/conftest.py at the end of the run (output is captured here)
    request.config._osf_extra_lines = getattr(request.config, "_osf_extra_lines", []) + [""] + lines
    assert "DIFFER" not in "\n".join(lines)


if __name__ == "__main__":
    out = run_cpu() + run_host()
    if torch.cuda.is_available() and os.environ.get("OSF_BENCH_DEVICE", "cuda") == "cuda":
        out += run_gpu()
    print("\n".join(out))
    sys.exit(1 if "DIFFER" in "\n".join(out) else 0)
