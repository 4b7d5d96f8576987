"""Stand-ins for what ColossalAI gives upstream's training script, kept small:
a ZeRO-like optimizer (fp32 master shards behind ``get_working_to_master_map()``
and ``param_to_pg``, as LowLevelZeroOptimizer) and a Booster that writes the
model and optimizer states. Both runs of the demo use these same objects, so
they are not what the demo compares."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..utils import _ckpt_write


def _world(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


class ShardedMasterOptimizer:
    """A torch optimizer stepping fp32 master shards of a (bf16) model.

    Every parameter gets a 1-D fp32 master shard laid out as ``model_sharding``
    lays out the EMA (flattened, zero-padded to a multiple of the world, this
    rank's chunk), frozen ones included (never stepped), so the upstream
    helpers find one for each name. ``step()`` averages the working gradients
    over the group, moves this rank's chunk into the master's ``.grad``, steps
    the inner optimizer and writes the masters back into the working params.
    """

    def __init__(self, model: nn.Module, make_inner: Callable[[List[torch.Tensor]], torch.optim.Optimizer], group=None):
        self.group = group if group is not None else (dist.group.WORLD if dist.is_initialized() else None)
        self.rank, self.world = _world(self.group)
        self.params: List[nn.Parameter] = list(model.parameters())
        self.masters: List[torch.Tensor] = []
        for p in self.params:
            n = p.numel()
            chunk = -(-n // self.world)
            flat = torch.zeros(chunk * self.world, dtype=torch.float32, device=p.device)
            flat[:n].copy_(p.detach().reshape(-1))
            self.masters.append(flat[self.rank * chunk : (self.rank + 1) * chunk].clone())
        self._w2m: Dict[int, torch.Tensor] = {id(p): m for p, m in zip(self.params, self.masters)}
        self.param_to_pg = {p: self.group for p in self.params}
        self.trainable = [(p, m) for p, m in zip(self.params, self.masters) if p.requires_grad]
        self.inner = make_inner([m for _, m in self.trainable])
        self.optim = self.inner  # where ZeRO wrappers keep it (FusedAdamW's attach_ema looks there)
        self.param_groups = self.inner.param_groups

    def get_working_to_master_map(self) -> Dict[int, torch.Tensor]:
        return self._w2m

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, m in self.trainable:
            p.grad = None
            m.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p, m in self.trainable:
            if p.grad is None:
                m.grad = None
                continue
            g = p.grad.reshape(-1).float()
            if self.world > 1:
                dist.all_reduce(g, group=self.group)
                g /= self.world
            chunk = m.numel()
            lo = self.rank * chunk
            mg = torch.zeros_like(m)
            part = g[lo : lo + chunk]
            mg[: part.numel()].copy_(part)
            m.grad = mg
        self.inner.step()
        self.write_back()

    @torch.no_grad()
    def write_back(self) -> None:
        """Working params <- masters (cast to their dtype)."""
        for p, m in self.trainable:
            n = p.numel()
            if self.world > 1:
                full = torch.empty(m.numel() * self.world, dtype=m.dtype, device=m.device)
                dist.all_gather_into_tensor(full, m, group=self.group)
            else:
                full = m
            p.data.view(-1).copy_(full[:n])

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.inner.load_state_dict(sd)


def _stream_safetensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """A safetensors file written tensor by tensor from the host buffers, the
    GIL released in each write, as tensornvme's C++ writer (no fsync, as upstream)."""
    names = sorted(tensors)
    blob = _ckpt_write._safetensors_header(tensors, names, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for k in names:
            if tensors[k].numel():
                f.write(memoryview(tensors[k].reshape(-1).view(torch.uint8).numpy()))


class _ThreadWriter:
    """One background file write; ``synchronize()`` waits and raises its failure."""

    def __init__(self, write: Callable[[], None], path: str):
        self.path, self.error = path, None
        self._thread = threading.Thread(target=self._run, args=(write,), daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as e:  # raised by synchronize()
            self.error = e

    def sync_before_step(self) -> None:
        """The host copies were made before the write started: nothing to wait for."""

    def synchronize(self) -> None:
        self._thread.join()
        if self.error is not None:
            e, self.error = self.error, None
            raise RuntimeError(f"writing {self.path} failed: {e}") from e


class DemoCheckpointIO:
    """The part of ColossalAI's Booster CheckpointIO that the async saves use:
    ``async_writers``, ``_sync_io`` (wait for the writes), ``synchronize``
    (wait for the host copies, before the next optimizer step)."""

    def __init__(self):
        self.async_writers: List[_ThreadWriter] = []
        self.pinned_state_dicts: Dict[int, dict] = {}

    def _sync_io(self) -> None:
        for w in self.async_writers:
            w.synchronize()
        self.async_writers.clear()

    def _sync_d2h(self) -> None:
        for w in self.async_writers:
            w.sync_before_step()

    def synchronize(self) -> None:
        self._sync_d2h()

    def stage(self, key: int, tensors: dict) -> dict:
        """Host copies of ``tensors`` in buffers kept per ``key`` (pinned when CUDA
        is there), made once and reused, as ColossalAI's ``pinned_state_dicts``."""
        bufs = self.pinned_state_dicts.get(key)
        if (
            bufs is None
            or bufs.keys() != tensors.keys()
            or any(bufs[k].shape != v.shape or bufs[k].dtype != v.dtype for k, v in tensors.items())
        ):
            pin = torch.cuda.is_available()
            bufs = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=pin) for k, v in tensors.items()}
            self.pinned_state_dicts[key] = bufs
        for k, v in tensors.items():
            bufs[k].copy_(v.detach())
        return bufs


class DemoBooster:
    """The Booster calls CheckpointIO.save makes: the model's state dict as
    safetensors, the optimizer state with torch.save, each into the directory it
    is given. With ``use_async`` it behaves as ColossalAI's: the save waits for
    the previous background writes, copies the state into host buffers kept
    across saves and writes them on a thread (``checkpoint_io`` holds the
    writers). ``seconds`` adds up the time spent in the calls."""

    def __init__(self):
        self.seconds = 0.0
        self.checkpoint_io = DemoCheckpointIO()

    def save_model(
        self,
        model: nn.Module,
        path: str,
        shard: bool = True,
        use_safetensors: bool = True,
        size_per_shard: int = 4096,
        use_async: bool = False,
    ) -> None:
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        self.checkpoint_io._sync_io()
        os.makedirs(path, exist_ok=True)
        file = os.path.join(path, "model.safetensors")
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        if use_async:
            staged = self.checkpoint_io.stage(id(model), sd)
            self.checkpoint_io.async_writers.append(_ThreadWriter(lambda: _stream_safetensors(file, staged), file))
        else:
            save_file({k: v.cpu().contiguous() for k, v in sd.items()}, file)
        self.seconds += time.perf_counter() - t0

    def save_optimizer(
        self, optimizer, path: str, shard: bool = True, size_per_shard: int = 4096, use_async: bool = False
    ) -> None:
        t0 = time.perf_counter()
        os.makedirs(path, exist_ok=True)
        file = os.path.join(path, "optimizer.pt")
        sd = optimizer.state_dict()
        if use_async:
            flat = {(i, k): v for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
            staged = self.checkpoint_io.stage(id(optimizer), flat)
            groups = json.dumps(sd["param_groups"])
            file = os.path.join(path, "optimizer.safetensors")  # as ColossalAI's async optimizer save
            named = {f"state.{i}.{k}": t for (i, k), t in staged.items()}
            self.checkpoint_io.async_writers.append(
                _ThreadWriter(lambda: _stream_safetensors(file, named, {"param_groups": groups}), file)
            )
        else:
            torch.save(sd, file)
        self.seconds += time.perf_counter() - t0

    def save_lr_scheduler(self, lr_scheduler, path: str) -> None:
        torch.save(lr_scheduler.state_dict(), path)


def fused_optimizer_class() -> Optional[type]:
    """``opensora_fast.optim.FusedAdamW`` when that module imports, else None
    (the demo then leaves out its third column)."""
    try:
        from ..optim import FusedAdamW  # type: ignore[attr-defined]
    except Exception:
        return None
    return FusedAdamW
