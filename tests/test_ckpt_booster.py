"""The Booster's part of CheckpointIO.save: handed to a Booster that writes in
the background (ColossalAI's ``checkpoint_io.async_writers``/``_sync_io``)
with ``use_async=True`` under ``async_io``, and the checkpoint renamed only
once every rank's writes are done; synchronous otherwise. World 1 in process,
world 2 on gloo."""

import os
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from opensora_fast.utils import _ckpt_booster, _ckpt_files, ckpt


class _Writer:
    def __init__(self, path: str, data: bytes, gate: threading.Event, fail: bool):
        self.path, self.error = path, None
        self.thread = threading.Thread(target=self._run, args=(data, gate, fail), daemon=True)
        self.thread.start()

    def _run(self, data, gate, fail):
        try:
            gate.wait(30)
            if fail:
                raise OSError(28, "No space left on device")
            with open(self.path, "wb") as f:
                f.write(data)
        except BaseException as e:
            self.error = e

    def sync_before_step(self):
        pass

    def synchronize(self):
        self.thread.join()
        if self.error is not None:
            e, self.error = self.error, None
            raise e


class _IO:
    def __init__(self):
        self.async_writers = []

    def _sync_io(self):
        for w in self.async_writers:
            w.synchronize()
        self.async_writers.clear()


class Booster:
    """Writes one file per call and rank; with ``use_async`` on a thread held
    back by ``gate`` (failing with ENOSPC when ``fail``)."""

    def __init__(self, background: bool = True, fail: bool = False):
        self.gate = threading.Event()
        self.fail = fail
        self.calls = []
        if background:
            self.checkpoint_io = _IO()

    def _write(self, path, name, use_async):
        self.calls.append((name, use_async))
        os.makedirs(path, exist_ok=True)
        rank = dist.get_rank() if dist.is_initialized() else 0
        file = os.path.join(path, f"{name}-rank{rank}.bin")
        data = f"{name} of rank {rank}".encode()
        if use_async:
            if name == "model":
                self.checkpoint_io._sync_io()  # as ColossalAI's save_model
            self.checkpoint_io.async_writers.append(_Writer(file, data, self.gate, self.fail))
        else:
            with open(file, "wb") as f:
                f.write(data)

    def save_model(self, model, path, shard=True, use_safetensors=True, size_per_shard=4096, use_async=False):
        self._write(path, "model", use_async)

    def save_optimizer(self, optimizer, path, shard=True, size_per_shard=4096, use_async=False):
        self._write(path, "optimizer", use_async)


def _save(io, booster, root, step, async_io=True):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return io.save(
        booster, root, model=model, optimizer=opt, epoch=0, step=step, global_step=step,
        actual_update_step=step, async_io=async_io,
    )  # fmt: skip


def _booster_files(path):
    return sorted(
        os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs if f.endswith(".bin")
    )


def test_async_booster_writes_in_the_background_and_the_rename_waits(tmp_path):
    io, b = ckpt.CheckpointIO(), Booster()
    final = _save(io, b, str(tmp_path), 1)
    assert b.calls == [("model", True), ("optimizer", True)]
    assert not os.path.exists(final)  # the Booster's writes are held: no rename yet
    assert os.path.isdir(_ckpt_files.partial_name(final))
    b.gate.set()
    io._sync_io()
    assert _ckpt_files.is_complete(final)
    assert _booster_files(final) == ["model/model-rank0.bin", "optimizer/optimizer-rank0.bin"]
    sums = _ckpt_files.load_json(os.path.join(final, _ckpt_files.COMPLETE))["checksums"]
    assert {"model/model-rank0.bin", "optimizer/optimizer-rank0.bin"} <= set(sums)
    _ckpt_files.verify("t", final, sums, ["model", "optimizer"])
    assert not [f for f in os.listdir(final) if f.startswith(".booster")]


@pytest.mark.parametrize("background, async_io", [(True, False), (False, True)])
def test_booster_writes_synchronously_without_async_io_or_background_writers(tmp_path, background, async_io):
    io, b = ckpt.CheckpointIO(), Booster(background=background)
    final = _save(io, b, str(tmp_path), 1, async_io=async_io)
    io._sync_io()
    assert b.calls == [("model", False), ("optimizer", False)]
    assert _booster_files(final) == ["model/model-rank0.bin", "optimizer/optimizer-rank0.bin"]


def test_a_failed_background_booster_write_fails_the_save_and_keeps_the_previous(tmp_path):
    io = ckpt.CheckpointIO()
    good = Booster()
    good.gate.set()
    first = _save(io, good, str(tmp_path), 1)
    io._sync_io()
    bad = Booster(fail=True)
    second = _save(io, bad, str(tmp_path), 2)
    bad.gate.set()
    with pytest.raises(RuntimeError, match="No space left") as info:
        io._sync_io()
    assert "the previous ones are intact" in str(info.value)
    assert not os.path.exists(second) and not os.path.exists(_ckpt_files.partial_name(second))
    assert _ckpt_files.is_complete(first)


def test_wait_ranks_names_a_failed_rank_and_a_silent_one(tmp_path):
    d = str(tmp_path)
    _ckpt_booster.mark(d, 1, OSError("disk gone"))
    with pytest.raises(RuntimeError, match="rank 1: .*disk gone"):
        _ckpt_booster.wait_ranks(d, [], 3, timeout=0.2)
    os.remove(os.path.join(d, ".booster-rank1.failed"))
    _ckpt_booster.mark(d, 1)
    with pytest.raises(TimeoutError, match=r"ranks \[2\]"):
        _ckpt_booster.wait_ranks(d, [], 3, timeout=0.2)
    assert not os.path.exists(os.path.join(d, ".booster-rank1.done"))  # seen, then removed
    _ckpt_booster.mark(d, 1)
    _ckpt_booster.mark(d, 2)
    _ckpt_booster.wait_ranks(d, [], 3, timeout=0.2)
    assert os.listdir(d) == []


def _worker(rank, world, port, tmp, case):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _ckpt_booster.RANK_TIMEOUT_S = 20.0  # a broken marker fails the test instead of hanging it
    try:
        io, b = ckpt.CheckpointIO(), Booster(fail=(case == "fail" and rank == 1))
        final = _save(io, b, tmp, 1)
        assert b.calls == [("model", True), ("optimizer", True)]
        if rank == 1:  # rank 0's rename waits for this rank's held writes
            assert not os.path.exists(final)
        dist.barrier()
        b.gate.set()
        if case == "fail":
            with pytest.raises(RuntimeError, match="No space left" if rank == 1 else "rank 1: .*No space left"):
                io._sync_io()
            dist.barrier()
            assert not os.path.exists(final)
        else:
            io._sync_io()
            dist.barrier()
            assert _ckpt_files.is_complete(final)
            names = [f"{p}/{p}-rank{r}.bin" for p in ("model", "optimizer") for r in range(world)]
            assert _booster_files(final) == sorted(names)
            sums = _ckpt_files.load_json(os.path.join(final, _ckpt_files.COMPLETE))["checksums"]
            assert set(names) <= set(sums)
            assert not [f for f in os.listdir(final) if f.startswith(".booster")]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", ["ok", "fail"])
def test_every_rank_writes_in_the_background_and_rank_0_renames_after_all(tmp_path, case):
    method = "spawn" if torch.cuda.is_available() else "fork"
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path), case), nprocs=2, join=True, start_method=method)
