"""Drop-in for ``opensora.utils.misc``: memory, parameter counts, formatting, reductions, timers, profilers.

Importable without colossalai, tensorboard or psutil (upstream needs all three).
Differences from upstream, each on purpose:

- ``to_ndarray(int)`` returns ``np.array([x])``; upstream's ``np.ndarray([x])``
  returns an uninitialised array of shape ``[x]``.
- ``to_ndarray(tensor)`` also accepts CUDA tensors and tensors that require grad.
- ``log_cuda_max_memory(None)`` works (upstream concatenates ``None``).
- ``Timer``, ``log_cuda_max_memory`` only synchronise CUDA when it is initialised,
  so they run on CPU-only machines; ``Timers.to_str`` and ``print_mem`` use rank 0
  outside a process group (upstream raises).
- ``ProfilerContext.step`` returns True once profiling has finished instead of
  calling ``exit(0)``; the caller decides whether to stop.
- ``get_process_mem`` / ``get_total_mem`` use psutil when installed, else
  ``/proc`` (Linux), with psutil's definitions.
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .logger import log_message

__all__ = [
    "create_tensorboard_writer",
    "GIGABYTE",
    "log_cuda_memory",
    "log_cuda_max_memory",
    "get_model_numel",
    "log_model_params",
    "format_numel_str",
    "format_duration",
    "all_reduce_mean",
    "all_reduce_sum",
    "to_tensor",
    "to_ndarray",
    "to_torch_dtype",
    "Timer",
    "Timers",
    "is_pipeline_enabled",
    "is_log_process",
    "NsysRange",
    "NsysProfiler",
    "ProfilerContext",
    "get_process_mem",
    "get_total_mem",
    "print_mem",
    "get_data_parallel_group",
    "set_data_parallel_group",
    "get_sequence_parallel_group",
    "set_sequence_parallel_group",
    "get_tensor_parallel_group",
    "set_tensor_parallel_group",
]

GIGABYTE = 1024**3

# ======================================================
# Parallel groups (upstream: opensora.acceleration.parallel_states)
# ======================================================
# When Open-Sora's own registry is loaded, it is the one source of truth, so groups
# set by upstream code (or by ours) are seen by both.

_GROUPS: dict[str, Any] = {}
_UPSTREAM_STATES = "opensora.acceleration.parallel_states"


def _upstream_states():
    return sys.modules.get(_UPSTREAM_STATES)


def set_data_parallel_group(group) -> None:
    """Register the data-parallel process group (used by ``all_reduce_mean``/``all_reduce_sum``)."""
    _GROUPS["data"] = group
    up = _upstream_states()
    if up is not None:
        up.set_data_parallel_group(group)


def get_data_parallel_group():
    """The data-parallel group: the registered one, else the world group."""
    up = _upstream_states()
    if up is not None:
        return up.get_data_parallel_group()
    return _GROUPS.get("data", dist.group.WORLD)


def set_sequence_parallel_group(group) -> None:
    """Register the sequence-parallel process group."""
    _GROUPS["sequence"] = group
    up = _upstream_states()
    if up is not None:
        up.set_sequence_parallel_group(group)


def get_sequence_parallel_group():
    """The sequence-parallel group, or None."""
    up = _upstream_states()
    if up is not None:
        return up.get_sequence_parallel_group()
    return _GROUPS.get("sequence", None)


def set_tensor_parallel_group(group) -> None:
    """Register the tensor-parallel process group."""
    _GROUPS["tensor"] = group
    up = _upstream_states()
    if up is not None:
        up.set_tensor_parallel_group(group)


def get_tensor_parallel_group():
    """The tensor-parallel group, or None."""
    up = _upstream_states()
    if up is not None:
        return up.get_tensor_parallel_group()
    return _GROUPS.get("tensor", None)


# ======================================================
# Tensorboard
# ======================================================


def create_tensorboard_writer(exp_dir: str):
    """Create a ``torch.utils.tensorboard.SummaryWriter`` logging to ``{exp_dir}/tensorboard``.

    Needs the ``tensorboard`` package (``pip install opensora_fast[tensorboard]``).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("create_tensorboard_writer needs tensorboard: pip install opensora_fast[tensorboard]") from e
    tensorboard_dir = f"{exp_dir}/tensorboard"
    os.makedirs(tensorboard_dir, exist_ok=True)
    return SummaryWriter(tensorboard_dir)


# ======================================================
# Memory
# ======================================================


def log_cuda_memory(stage: str | None = None) -> None:
    """Log the CUDA memory currently allocated, in GB (``"CUDA memory usage at {stage}: x GB"``)."""
    text = "CUDA memory usage"
    if stage is not None:
        text += f" at {stage}"
    log_message(text + ": %.1f GB", torch.cuda.memory_allocated() / GIGABYTE)


def log_cuda_max_memory(stage: str | None = None) -> None:
    """Log the peak CUDA memory allocated and reserved, in GB."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    allocated = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()
    where = f" at {stage}" if stage is not None else ""
    log_message("CUDA max memory max memory allocated" + where + ": %.1f GB", allocated / GIGABYTE)
    log_message("CUDA max memory max memory reserved" + where + ": %.1f GB", reserved / GIGABYTE)


# ======================================================
# Number of parameters
# ======================================================


def get_model_numel(model: torch.nn.Module) -> tuple[int, int]:
    """(total parameter count, trainable parameter count)."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


def log_model_params(model: nn.Module) -> None:
    """Log the total and trainable parameter counts of ``model``."""
    total, trainable = get_model_numel(model)
    name = model.__class__.__name__
    log_message(f"[{name}] Number of parameters: {format_numel_str(total)}")
    log_message(f"[{name}] Number of trainable parameters: {format_numel_str(trainable)}")


# ======================================================
# String
# ======================================================


def format_numel_str(numel: int) -> str:
    """Human-readable count with binary units: ``"1.50 K"``, ``"2.00 M"``, ``"1.00 B"`` (B = 1024**3)."""
    for unit, scale in (("B", 1024**3), ("M", 1024**2), ("K", 1024)):
        if numel >= scale:
            return f"{numel / scale:.2f} {unit}"
    return f"{numel}"


def format_duration(seconds: int) -> str:
    """``"1d 2h 3m 4s"``, leaving out zero parts; ``"0s"`` for zero."""
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{v}{u}" for v, u in ((days, "d"), (hours, "h"), (minutes, "m")) if v > 0]
    if secs > 0 or not parts:
        parts.append(f"{secs}s")
    return " ".join(parts)


# ======================================================
# PyTorch
# ======================================================


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the mean of ``tensor`` over the data-parallel group. Returns ``tensor``."""
    group = get_data_parallel_group()
    dist.all_reduce(tensor=tensor, group=group)
    tensor.div_(dist.get_world_size(group=group))
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum of ``tensor`` over the data-parallel group. Returns ``tensor``."""
    dist.all_reduce(tensor=tensor, group=get_data_parallel_group())
    return tensor


def to_tensor(data) -> torch.Tensor:
    """Convert a tensor, ndarray, non-string sequence, int or float to a tensor.

    int -> ``LongTensor([x])``, float -> ``FloatTensor([x])``; an ndarray shares memory.
    """
    if isinstance(data, torch.Tensor):
        return data
    np = _numpy_or_none()
    if np is not None and isinstance(data, np.ndarray):
        return torch.from_numpy(data)
    if isinstance(data, Sequence) and not isinstance(data, str):
        return torch.tensor(data)
    if isinstance(data, int):
        return torch.tensor([data], dtype=torch.int64)
    if isinstance(data, float):
        return torch.tensor([data], dtype=torch.float32)
    raise TypeError(f"type {type(data)} cannot be converted to tensor.")


def to_ndarray(data):
    """Convert a tensor, ndarray, sequence, int or float to ``numpy.ndarray``.

    int -> ``np.array([x])`` (upstream returns an uninitialised array of length x).
    """
    import numpy as np

    if isinstance(data, torch.Tensor):
        return data.detach().cpu().numpy()
    if isinstance(data, np.ndarray):
        return data
    if isinstance(data, Sequence):
        return np.array(data)
    if isinstance(data, int):
        return np.array([data], dtype=int)
    if isinstance(data, float):
        return np.array([data], dtype=float)
    raise TypeError(f"type {type(data)} cannot be converted to ndarray.")


def _numpy_or_none():
    try:
        import numpy
    except ImportError:
        return None
    return numpy


_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
}


def to_torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A ``torch.dtype`` from itself or one of upstream's names: float64, float32, float16, fp32, fp16, half, bf16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"Unsupported dtype {dtype!r}; accepted: {', '.join(_DTYPES)} or a torch.dtype")
        return _DTYPES[dtype]
    raise ValueError(
        f"Unsupported dtype {dtype!r} (type {type(dtype).__name__}); accepted: {', '.join(_DTYPES)} or a torch.dtype"
    )


# ======================================================
# Profile
# ======================================================


def _cuda_sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Timer:
    """Context manager measuring wall time, with CUDA sync (and an optional barrier) at both ends.

    ``coordinator`` is anything with ``block_all()`` (ColossalAI's DistCoordinator).
    """

    def __init__(self, name: str, log: bool = False, barrier: bool = False, coordinator=None):
        self.name = name
        self.start_time: float | None = None
        self.end_time: float | None = None
        self.log = log
        self.barrier = barrier
        self.coordinator = coordinator

    @property
    def elapsed_time(self) -> float:
        return self.end_time - self.start_time

    def __enter__(self) -> "Timer":
        _cuda_sync()
        if self.barrier:
            dist.barrier()
        self.start_time = time.time()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        if self.coordinator is not None:
            self.coordinator.block_all()
        _cuda_sync()
        if self.barrier:
            dist.barrier()
        self.end_time = time.time()
        if self.log:
            print(f"Elapsed time for {self.name}: {self.elapsed_time:.2f} s")


class Timers:
    """A named set of :class:`Timer`; ``timers["x"]`` is a no-op context when ``record_time`` is False."""

    def __init__(self, record_time: bool, record_barrier: bool = False, coordinator=None):
        self.timers: OrderedDict[str, Any] = OrderedDict()
        self.record_time = record_time
        self.record_barrier = record_barrier
        self.coordinator = coordinator

    def __getitem__(self, name: str):
        if name not in self.timers:
            if self.record_time:
                self.timers[name] = Timer(name, barrier=self.record_barrier, coordinator=self.coordinator)
            else:
                self.timers[name] = nullcontext()
        return self.timers[name]

    def to_dict(self) -> dict[str, float]:
        return {f"time_debug/{name}": timer.elapsed_time for name, timer in self.timers.items()}

    def to_str(self, epoch: int, step: int) -> str:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        out = f"Rank {rank} | Epoch {epoch} | Step {step} | "
        for name, timer in self.timers.items():
            out += f"{name}: {timer.elapsed_time:.2f} s | "
        return out


def is_pipeline_enabled(plugin_type: str, plugin_config: dict) -> bool:
    """True for the "hybrid" plugin with ``pp_size > 1``."""
    return plugin_type == "hybrid" and plugin_config.get("pp_size", 1) > 1


def is_log_process(plugin_type: str, plugin_config: dict) -> bool:
    """The last rank logs under pipeline parallelism (it holds the loss), else rank 0."""
    if is_pipeline_enabled(plugin_type, plugin_config):
        return dist.get_rank() == dist.get_world_size() - 1
    return dist.get_rank() == 0


class NsysRange:
    """An NVTX range for Nsight Systems (``torch.cuda.nvtx.range_push/pop``)."""

    def __init__(self, range_name: str):
        self.range_name = range_name

    def __enter__(self) -> "NsysRange":
        torch.cuda.nvtx.range_push(self.range_name)
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        torch.cuda.nvtx.range_pop()


class NsysProfiler:
    """Start the CUDA profiler (``cudaProfilerStart``) after ``warmup_steps`` calls of :meth:`step`
    and stop it ``num_steps`` later; run under ``nsys profile --capture-range=cudaProfilerApi``."""

    def __init__(self, warmup_steps: int = 0, num_steps: int = 1, enabled: bool = True):
        self.warmup_steps = warmup_steps
        self.num_steps = num_steps
        self.current_step = 0
        self.enabled = enabled

    def step(self) -> None:
        if not self.enabled:
            return
        self.current_step += 1
        if self.current_step == self.warmup_steps:
            torch.cuda.cudart().cudaProfilerStart()
        elif self.current_step >= self.warmup_steps + self.num_steps:
            torch.cuda.cudart().cudaProfilerStop()

    def range(self, range_name: str):
        if not self.enabled:
            return nullcontext()
        return NsysRange(range_name)


class ProfilerContext:
    """``torch.profiler`` over ``(wait + warmup + active) * repeat`` calls of :meth:`step`,
    traces written to ``save_path`` (TensorBoard trace format; needs no tensorboard package).

    Unlike upstream, :meth:`step` never calls ``exit(0)``: it returns True once the
    profile has been written (and from then on), so the caller can stop.
    CUDA activity is recorded only when CUDA is available.
    """

    def __init__(
        self,
        save_path: str = "./log",
        record_shapes: bool = False,
        with_stack: bool = True,
        wait: int = 1,
        warmup: int = 1,
        active: int = 1,
        repeat: int = 1,
        enable: bool = True,
        **kwargs,
    ):
        self.enable = enable
        self.prof = None
        self.step_cnt = 0
        self.total_steps = (wait + warmup + active) * repeat
        self._finished = False
        if enable:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=repeat),
                record_shapes=record_shapes,
                with_stack=with_stack,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(save_path),
                **kwargs,
            )

    def step(self) -> bool:
        """Advance the profiler; True when profiling has finished."""
        if not self.enable or self._finished:
            return self._finished
        if self.step_cnt == 0:
            self.prof.__enter__()
        self.prof.step()
        self.step_cnt += 1
        if self.is_profile_end():
            self.prof.__exit__(None, None, None)
            self._finished = True
        return self._finished

    def is_profile_end(self) -> bool:
        return self.step_cnt >= self.total_steps


def _read_kb(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    """Fields of a /proc/meminfo-style file, in bytes."""
    out = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in keys:
                out[name] = int(rest.split()[0]) * 1024
    return out


def _process_rss_bytes() -> int:
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process(os.getpid()).memory_info().rss


def _used_bytes(meminfo: str = "/proc/meminfo") -> int:
    """psutil's Linux ``virtual_memory().used``: total - free - buffers - cached (cached includes SReclaimable)."""
    m = _read_kb(meminfo, ("MemTotal", "MemFree", "Buffers", "Cached", "SReclaimable"))
    used = m["MemTotal"] - m["MemFree"] - m.get("Buffers", 0) - m.get("Cached", 0) - m.get("SReclaimable", 0)
    return used if used >= 0 else m["MemTotal"] - m["MemFree"]


def get_process_mem() -> float:
    """Resident memory of this process, in GiB."""
    return _process_rss_bytes() / 1024**3


def get_total_mem() -> float:
    """Memory used on this machine, in GiB (psutil's ``virtual_memory().used``)."""
    try:
        import psutil
    except ImportError:
        return _used_bytes() / 1024**3
    return psutil.virtual_memory().used / 1024**3


def print_mem(prefix: str = "") -> None:
    """Print this rank's process memory and the machine's used memory."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    print(
        f"[{rank}] {prefix} process memory: {get_process_mem():.2f} GB, total memory: {get_total_mem():.2f} GB",
        flush=True,
    )
