"""opensora_fast.utils.misc and .logger against small ports of upstream's semantics
(opensora/utils/misc.py and logger.py at 7ad6a96)."""

import logging
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from opensora_fast.utils import logger as L
from opensora_fast.utils import misc as M

# ---------------------------------------------------------------- reference ports


def ref_format_numel_str(numel):
    # upstream: B = 1024**3, M = 1024**2, K = 1024, two decimals, plain int below K
    if numel >= 1024**3:
        return f"{numel / 1024**3:.2f} B"
    if numel >= 1024**2:
        return f"{numel / 1024**2:.2f} M"
    if numel >= 1024:
        return f"{numel / 1024:.2f} K"
    return f"{numel}"


def ref_format_duration(seconds):
    d, r = divmod(seconds, 86400)
    h, r = divmod(r, 3600)
    m, s = divmod(r, 60)
    parts = []
    if d > 0:
        parts.append(f"{d}d")
    if h > 0:
        parts.append(f"{h}h")
    if m > 0:
        parts.append(f"{m}m")
    if s > 0 or not parts:
        parts.append(f"{s}s")
    return " ".join(parts)


# ---------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    "n", [0, 1, 1023, 1024, 1025, 1536, 1024**2 - 1, 1024**2, 3 * 1024**2 + 7, 1024**3, 11_891_390_528]
)
def test_format_numel_str(n):
    assert M.format_numel_str(n) == ref_format_numel_str(n)


def test_format_numel_str_exact_values():
    # derived by hand from upstream's binary units
    assert M.format_numel_str(1536) == "1.50 K"
    assert M.format_numel_str(11_891_390_528) == "11.07 B"
    assert M.format_numel_str(999) == "999"


@pytest.mark.parametrize("s", [0, 1, 59, 60, 61, 3599, 3600, 3661, 86399, 86400, 90061, 200000, 59.5, 3600.25])
def test_format_duration(s):
    assert M.format_duration(s) == ref_format_duration(s)


def test_format_duration_exact_values():
    assert M.format_duration(0) == "0s"
    assert M.format_duration(3600) == "1h"
    assert M.format_duration(90061) == "1d 1h 1m 1s"
    assert M.format_duration(86400 + 60) == "1d 1m"


# ---------------------------------------------------------------- dtypes, conversions


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("float64", torch.float64),
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("fp32", torch.float32),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("bf16", torch.bfloat16),
    ],
)
def test_to_torch_dtype_names(name, dtype):
    assert M.to_torch_dtype(name) is dtype
    assert M.to_torch_dtype(dtype) is dtype


@pytest.mark.parametrize("bad", ["bfloat16", "FP16", "", "float", " fp32"])
def test_to_torch_dtype_unknown_names_the_value_and_lists_accepted(bad):
    with pytest.raises(ValueError) as e:
        M.to_torch_dtype(bad)
    assert repr(bad) in str(e.value) and "bf16" in str(e.value) and "float64" in str(e.value)


def test_to_torch_dtype_wrong_type():
    with pytest.raises(ValueError, match="accepted"):
        M.to_torch_dtype(3)


def test_to_tensor():
    t = torch.arange(3)
    assert M.to_tensor(t) is t
    a = np.arange(4, dtype=np.float32)
    out = M.to_tensor(a)
    out[0] = 7  # shares memory, as torch.from_numpy
    assert a[0] == 7
    assert torch.equal(M.to_tensor([1, 2]), torch.tensor([1, 2]))
    i = M.to_tensor(5)
    assert i.dtype == torch.int64 and i.tolist() == [5]
    f = M.to_tensor(2.5)
    assert f.dtype == torch.float32 and f.tolist() == [2.5]
    with pytest.raises(TypeError, match="str"):
        M.to_tensor("abc")
    with pytest.raises(TypeError):
        M.to_tensor({1: 2})


def test_to_ndarray():
    t = torch.arange(3.0, requires_grad=True)
    assert np.array_equal(M.to_ndarray(t), np.array([0.0, 1.0, 2.0]))
    a = np.zeros(2)
    assert M.to_ndarray(a) is a
    assert np.array_equal(M.to_ndarray([1, 2]), np.array([1, 2]))
    # upstream returns np.ndarray([7]): an uninitialised array of 7 elements
    out = M.to_ndarray(7)
    assert out.shape == (1,) and out[0] == 7 and out.dtype.kind == "i"
    out = M.to_ndarray(0.5)
    assert out.shape == (1,) and out[0] == 0.5 and out.dtype == float
    with pytest.raises(TypeError):
        M.to_ndarray(object())


# ---------------------------------------------------------------- params, logging


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(10, 20)  # 220
        self.b = torch.nn.Linear(20, 3)  # 63
        self.b.weight.requires_grad_(False)  # -60 trainable


def test_get_model_numel_and_log(caplog):
    net = _Net()
    assert M.get_model_numel(net) == (283, 223)
    with caplog.at_level(logging.INFO):
        M.log_model_params(net)
    assert "[_Net] Number of parameters: 283" in caplog.text
    assert "[_Net] Number of trainable parameters: 223" in caplog.text


def test_log_cuda_memory_text(caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 3 * 1024**3)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: int(1.25 * 1024**3))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 2 * 1024**3)
    with caplog.at_level(logging.INFO):
        M.log_cuda_memory("fwd")
        M.log_cuda_memory()
        M.log_cuda_max_memory("eval")
        M.log_cuda_max_memory(None)  # upstream crashes on None
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [
        "CUDA memory usage at fwd: 3.0 GB",
        "CUDA memory usage: 3.0 GB",
        "CUDA max memory max memory allocated at eval: 1.2 GB",
        "CUDA max memory max memory reserved at eval: 2.0 GB",
        "CUDA max memory max memory allocated: 1.2 GB",
        "CUDA max memory max memory reserved: 2.0 GB",
    ]


def test_log_message_levels(caplog, capsys):
    with caplog.at_level(logging.INFO):
        L.log_message("a %d", 1)
        L.log_message("b", level="warning")
        L.log_message("c", level="error")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "a 1"),
        ("WARNING", "b"),
        ("ERROR", "c"),
    ]
    L.log_message("p", 2, level="print")
    assert capsys.readouterr().out == "p 2\n"
    with pytest.raises(ValueError) as e:
        L.log_message("x", level="debug")
    assert "'debug'" in str(e.value) and "warning" in str(e.value)


def test_logger_process_helpers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not L.is_distributed() and L.is_main_process() and L.get_world_size() == 1
    # launcher env without an initialised group: read from the environment (upstream crashes)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert L.is_distributed() and not L.is_main_process() and L.get_world_size() == 4
    monkeypatch.setenv("RANK", "0")
    assert L.is_main_process()


def test_create_logger_writes_file(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []
    try:
        logger = L.create_logger(str(tmp_path))
        logger.info("hello %s", "there")
        for h in root.handlers:
            h.flush()
        text = (tmp_path / "log.txt").read_text()
        assert "Experiment directory created at " + str(tmp_path) in text
        assert "hello there" in text
    finally:
        for h in root.handlers:
            h.close()
        root.handlers, lvl = saved
        root.setLevel(lvl)


def test_create_logger_non_main_gets_null_handler(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    logger = L.create_logger()
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)


# ---------------------------------------------------------------- plugins, timers, profilers


def test_is_pipeline_enabled():
    assert M.is_pipeline_enabled("hybrid", {"pp_size": 2})
    assert not M.is_pipeline_enabled("hybrid", {"pp_size": 1})
    assert not M.is_pipeline_enabled("hybrid", {})
    assert not M.is_pipeline_enabled("zero2", {"pp_size": 4})


def test_is_log_process(monkeypatch):
    monkeypatch.setattr(dist, "get_rank", lambda *a: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 4)
    assert M.is_log_process("hybrid", {"pp_size": 2})  # last rank
    assert not M.is_log_process("zero2", {})
    monkeypatch.setattr(dist, "get_rank", lambda *a: 0)
    assert M.is_log_process("zero2", {}) and not M.is_log_process("hybrid", {"pp_size": 2})


def test_timers(capsys):
    timers = M.Timers(record_time=True)
    with timers["a"] as t:
        pass
    assert t is timers["a"] and t.elapsed_time >= 0
    with M.Timer("x", log=True):
        pass
    assert capsys.readouterr().out.startswith("Elapsed time for x: ")
    d = timers.to_dict()
    assert list(d) == ["time_debug/a"]
    assert timers.to_str(1, 2).startswith("Rank 0 | Epoch 1 | Step 2 | a: ")
    off = M.Timers(record_time=False)
    with off["b"]:
        pass
    assert not isinstance(off["b"], M.Timer)


def test_timer_coordinator_block_all():
    calls = []
    coord = types.SimpleNamespace(block_all=lambda: calls.append(1))
    with M.Timer("x", coordinator=coord):
        pass
    assert calls == [1]


def test_nsys_profiler_start_stop(monkeypatch):
    events = []
    fake = types.SimpleNamespace(
        cudaProfilerStart=lambda: events.append("start"), cudaProfilerStop=lambda: events.append("stop")
    )
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    p = M.NsysProfiler(warmup_steps=2, num_steps=2)
    for _ in range(5):
        p.step()
    # upstream: start when step count == warmup, stop on every step >= warmup + num
    assert events == ["start", "stop", "stop"]
    off = M.NsysProfiler(enabled=False)
    off.step()
    assert off.current_step == 0 and not isinstance(off.range("r"), M.NsysRange)
    pushes = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda n: pushes.append(n))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: pushes.append("pop"))
    with p.range("fwd"):
        pass
    assert pushes == ["fwd", "pop"]


def test_profiler_context_returns_instead_of_exit(tmp_path):
    prof = M.ProfilerContext(save_path=str(tmp_path), wait=0, warmup=1, active=1, with_stack=False)
    assert prof.total_steps == 2
    done = []
    for _ in range(4):  # upstream would call exit(0) after the second step
        torch.ones(4).sum()
        done.append(prof.step())
    assert done == [False, True, True, True]
    assert any(p.suffix == ".json" for p in tmp_path.iterdir())
    assert M.ProfilerContext(enable=False).step() is False


def test_memory_helpers(capsys, tmp_path):
    assert 0 < M.get_process_mem() < 1024
    assert 0 < M.get_total_mem() < 1024 * 1024
    M.print_mem("pre")
    out = capsys.readouterr().out
    assert out.startswith("[0] pre process memory: ") and "total memory:" in out
    # /proc/meminfo parsing without psutil: psutil's Linux "used" = total - free - buffers - cached - sreclaimable
    mi = tmp_path / "meminfo"
    mi.write_text(
        "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 200 kB\nSReclaimable: 30 kB\nShmem: 5 kB\n"
    )
    assert M._used_bytes(str(mi)) == (1000 - 100 - 50 - 200 - 30) * 1024
    mi.write_text("MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 500 kB\nCached: 500 kB\n")
    assert M._used_bytes(str(mi)) == (1000 - 100) * 1024  # negative -> total - free


def test_create_tensorboard_writer(tmp_path, monkeypatch):
    made = []

    class FakeWriter:
        def __init__(self, d):
            made.append(d)

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    w = M.create_tensorboard_writer(str(tmp_path / "exp"))
    assert isinstance(w, FakeWriter) and made == [f"{tmp_path / 'exp'}/tensorboard"]
    assert (tmp_path / "exp" / "tensorboard").is_dir()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ImportError, match=r"opensora_fast\[tensorboard\]"):
        M.create_tensorboard_writer(str(tmp_path))


# ---------------------------------------------------------------- distributed (gloo, 2 processes)


def _dist_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    from opensora_fast.utils import config as C
    from opensora_fast.utils import train as T

    device, coord = T.setup_device(backend="gloo")
    try:
        results = {"device": str(device), "rank": coord.rank, "world": coord.world_size}
        x = torch.tensor([1.0 + rank, 10.0 * (rank + 1)])
        results["mean"] = M.all_reduce_mean(x.clone()).tolist()
        results["sum"] = M.all_reduce_sum(x.clone()).tolist()
        results["sync"] = C.sync_string("from-rank-0" if rank == 0 else "other")
        results["sync_unicode"] = C.sync_string("é✓ rank0" if rank == 0 else "x")
        results["main"] = L.is_main_process()
        results["log"] = M.is_log_process("zero2", {})
        torch.save(results, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_helpers_gloo(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{i}.pt") for i in range(2))
    for r in (r0, r1):
        # setup_device selects this rank's CUDA device when there is one, also on gloo
        want = f"cuda:{r['rank'] % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
        assert r["device"] == want and r["world"] == 2
        assert r["mean"] == [1.5, 15.0]  # (1 + 2) / 2, (10 + 20) / 2
        assert r["sum"] == [3.0, 30.0]
        assert r["sync"] == "from-rank-0" and r["sync_unicode"] == "é✓ rank0"
    assert r0["main"] and not r1["main"] and r0["log"] and not r1["log"]
