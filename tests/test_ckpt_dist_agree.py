"""Errors reach every rank (gloo, world sizes 2 and 3): a failure on one rank
inside CheckpointIO.save (rank 0 preparing its pinned buffers, a failed
background write found at the next save, a load) raises on every rank within
seconds, not at the process-group timeout; ranks passing different
bucket_bytes or collective to the gathers are refused on every rank (no gloo
abort); the other ranks' error names the function and the failing rank's
message; every dtype group is checked before anything is written. After each
failure the ranks are still in step: the next save works."""

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_bitwise_equal

from opensora_fast.utils import _ckpt_write, ckpt

SHAPES = [
    ("w", (5, 3), torch.bfloat16),
    ("v", (7,), torch.bfloat16),
    ("b", (4,), torch.float32),
    ("c", (), torch.float32),
]
FAST = 10.0  # seconds: far below the 60 s process-group timeout set below


class Net(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for n, s, dt in SHAPES:
            self.register_parameter(n, torch.nn.Parameter(torch.randn(s, generator=g).to(dt)))
        self.register_buffer("k", torch.tensor(seed))


def _pinned(shapes, net):
    sd = {k: torch.full(shapes[k], -7.0, dtype=p.dtype) for k, p in net.named_parameters()}
    sd["k"] = torch.tensor(-7)
    return sd


def _fails_everywhere(rank, fn, rank_exc, rank_text, others_text, failing=0):
    """``fn`` raises on every rank within FAST seconds: the failing rank its
    own error, the others one naming the function and that error."""
    t0 = time.monotonic()
    with pytest.raises(Exception) as info:
        fn()
    took = time.monotonic() - t0
    assert took < FAST, (took, repr(info.value))
    text = str(info.value)
    if rank == failing:
        assert isinstance(info.value, rank_exc) and rank_text in text, repr(info.value)
    else:
        assert type(info.value) is RuntimeError, repr(info.value)
        assert text.startswith(others_text) and f"rank {failing} failed" in text and rank_text in text, text


def _worker(rank, world, port, tmp):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        _cases(rank, world, tmp)
    finally:
        dist.destroy_process_group()


def _save(io, tmp, ema, shapes, step, **kw):
    return io.save(
        None, tmp, ema=ema, epoch=0, step=step, global_step=step, actual_update_step=step, ema_shape_dict=shapes, **kw
    )


def _cases(rank, world, tmp):
    ema = Net(1)
    orig = {k: v.detach().clone() for k, v in ema.state_dict().items()}
    shapes = ckpt.record_model_param_shape(ema)
    ckpt.model_sharding(ema)

    # --- the gathers: options every rank must share
    pinned = _pinned(shapes, ema) if rank == 0 else None
    for kw, name in (
        ({"bucket_bytes": 1024 + 8 * rank}, "bucket_bytes"),
        ({"collective": "gather" if rank else "all_gather"}, "collective"),
    ):
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=f"model_gathering: the ranks passed different {name}"):
            ckpt.model_gathering(ema, shapes, pinned, **kw)
        assert time.monotonic() - t0 < FAST
    if rank == 0:
        assert all(bool((v == -7).all()) for v in pinned.values()), "written before the error"
    # a problem on rank 0 only: the others' error names the function and rank 0's message
    if rank == 0:
        bad = dict(pinned)
        del bad["v"]
    _fails_everywhere(
        rank,
        lambda: ckpt.model_gathering(ema, shapes, bad if rank == 0 else None),
        ValueError,
        "pinned_state_dict has no entry 'v'",
        "model_gathering: ",
    )
    # bf16 first (fits), fp32 later (does not): refused before the bf16 group is written
    with pytest.raises(ValueError, match="model_gathering: bucket_bytes=.* holds less than one torch.float32"):
        ckpt.model_gathering(ema, shapes, pinned, bucket_bytes=world * 2)
    if rank == 0:
        assert all(bool((v == -7).all()) for v in pinned.values()), "an earlier dtype group was written"
    ckpt.model_gathering(ema, shapes, pinned, bucket_bytes=1024)  # still in step
    if rank == 0:
        for k, v in orig.items():
            assert_bitwise_equal(pinned[k], v, k)

    # --- CheckpointIO.save: rank 0 cannot pin its buffers
    io = ckpt.CheckpointIO(bucket_bytes=1024)
    real = ckpt.CheckpointIO._pinned_dict

    def cannot_pin(entries):
        raise MemoryError("cannot pin 22 GB")

    if rank == 0:
        ckpt.CheckpointIO._pinned_dict = staticmethod(cannot_pin)
    try:
        _fails_everywhere(
            rank, lambda: _save(io, tmp, ema, shapes, 1), MemoryError, "cannot pin 22 GB", "CheckpointIO.save: "
        )
    finally:
        ckpt.CheckpointIO._pinned_dict = staticmethod(real)
    dist.barrier()
    assert not os.listdir(tmp), os.listdir(tmp)  # the temporary directory was removed
    dist.barrier()  # rank 0 makes the next save's directory as soon as it is past the first
    # one rank's bad counter
    _fails_everywhere(
        rank,
        lambda: io.save(
            None,
            tmp,
            ema=ema,
            epoch=0 if rank != world - 1 else "0/..",
            step=1,
            actual_update_step=1,
            ema_shape_dict=shapes,
        ),
        TypeError,
        "epoch must be a non-negative int",
        "CheckpointIO.save: ",
        failing=world - 1,
    )
    path = _save(io, tmp, ema, shapes, 1)
    io._sync_io()
    dist.barrier()

    # --- a background write that fails on rank 0 surfaces on every rank at the next save
    real_write = ckpt._write_safetensors
    if rank == 0:

        def disk_full(p, tensors, show=False):
            raise OSError(28, "No space left on device", p)

        _ckpt_write.write_safetensors = disk_full
    try:
        _save(io, tmp, ema, shapes, 2)
        _fails_everywhere(
            rank,
            lambda: _save(io, tmp, ema, shapes, 3),
            RuntimeError,
            "epoch0-global_step2 failed: OSError",
            "CheckpointIO.save: ",
        )
    finally:
        _ckpt_write.write_safetensors = real_write
    dist.barrier()
    assert sorted(os.listdir(tmp)) == ["epoch0-global_step1"]
    dist.barrier()  # rank 0 makes the next save's directory as soon as it is past the first
    path3 = _save(io, tmp, ema, shapes, 3)
    io._sync_io()
    dist.barrier()

    # --- a load that fails on one rank fails on every rank
    back = Net(5)
    wrong = torch.nn.Linear(2, 2)
    _fails_everywhere(
        rank,
        lambda: io.load(None, path3, ema=back if rank else wrong, strict=True),
        RuntimeError,
        "Error(s) in loading state_dict",
        "CheckpointIO.load: ",
    )
    for p in (path, path3):
        back = Net(5)
        assert io.load(None, p, ema=back, strict=True) == (0, int(p[-1]))
        for k, v in orig.items():
            assert_bitwise_equal(back.state_dict()[k], v, k)
    dist.barrier()


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_errors_reach_every_rank(world, tmp_path):
    method = "spawn" if torch.cuda.is_available() else "fork"
    mp.start_processes(_worker, args=(world, _port(), str(tmp_path)), nprocs=world, join=True, start_method=method)
