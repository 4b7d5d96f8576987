"""The upstream-faithful side's CheckpointIO: upstream's ``CheckpointIO.save``
step by step (Booster parts, ``master_weights_gathering`` and ``model_gathering``
into pinned host buffers made once, ``running_states.json``, the EMA and master
weights written in the background), with the gathers from
:mod:`opensora_fast.reference.upstream.ckpt`. Upstream hands the background writes to
tensornvme's AsyncFileWriter, which pip cannot install; a thread writing
safetensors stands in for it. Written from upstream's semantics for the demo."""

from __future__ import annotations

import json
import os
import threading
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..reference.upstream import ckpt as ref_ckpt


def _pinned(shape, dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="cpu", pin_memory=torch.cuda.is_available())


class _Writer(threading.Thread):
    def __init__(self, path: str, tensors: Dict[str, torch.Tensor]):
        super().__init__(daemon=True)
        self.path, self.tensors = path, tensors
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        from safetensors.torch import save_file

        try:
            save_file(self.tensors, self.path)
        except BaseException as e:  # reported by synchronize()
            self.error = e

    def synchronize(self) -> None:
        self.join()
        if self.error is not None:
            raise RuntimeError(f"writing {self.path} failed: {self.error}") from self.error


class UpstreamCheckpointIO:
    """``save(booster, save_dir, model, ema, optimizer, ...)`` with upstream's arguments."""

    def __init__(self):
        self.writers: List[_Writer] = []
        self.pinned_state_dict: Optional[Dict[str, torch.Tensor]] = None
        self.master_pinned_state_dict: Optional[Dict[str, torch.Tensor]] = None

    def _sync_io(self) -> None:
        writers, self.writers = self.writers, []
        for w in writers:
            w.synchronize()

    def close(self) -> None:
        self._sync_io()

    def save(
        self,
        booster,
        save_dir: str,
        model: nn.Module = None,
        ema: nn.Module = None,
        optimizer=None,
        lr_scheduler=None,
        sampler=None,
        epoch: int = None,
        step: int = None,
        global_step: int = None,
        batch_size: int = None,
        lora: bool = False,
        actual_update_step: int = None,
        ema_shape_dict: dict = None,
        async_io: bool = True,
        include_master_weights: bool = False,
    ) -> str:
        self._sync_io()
        save_dir = os.path.join(save_dir, f"epoch{epoch}-global_step{actual_update_step}")
        rank = dist.get_rank()
        if model is not None:
            os.makedirs(os.path.join(save_dir, "model"), exist_ok=True)
            booster.save_model(
                model,
                os.path.join(save_dir, "model"),
                shard=True,
                use_safetensors=True,
                size_per_shard=4096,
                use_async=async_io,
            )
        if optimizer is not None:
            booster.save_optimizer(
                optimizer, os.path.join(save_dir, "optimizer"), shard=True, size_per_shard=4096, use_async=async_io
            )
            if include_master_weights:
                if self.master_pinned_state_dict is None and rank == 0:
                    w2m = optimizer.get_working_to_master_map()
                    self.master_pinned_state_dict = {
                        n: _pinned(p.shape, w2m[id(p)].dtype) for n, p in model.named_parameters()
                    }
                ref_ckpt.master_weights_gathering(model, optimizer, self.master_pinned_state_dict)
        if ema is not None:
            if self.pinned_state_dict is None and rank == 0:
                sd = {n: _pinned(ema_shape_dict[n], p.dtype) for n, p in ema.named_parameters()}
                for k, v in ema.state_dict(keep_vars=True).items():
                    sd.setdefault(k, _pinned(v.shape, v.dtype))
                self.pinned_state_dict = sd
            ref_ckpt.model_gathering(ema, ema_shape_dict, self.pinned_state_dict)
        if rank == 0:
            states = dict(
                epoch=epoch,
                step=step,
                global_step=global_step,
                batch_size=batch_size,
                actual_update_step=actual_update_step,
            )
            with open(os.path.join(save_dir, "running_states.json"), "w", encoding="utf-8") as f:
                json.dump(states, f, indent=4)
            files = []
            if ema is not None:
                files.append(("ema.safetensors", self.pinned_state_dict))
            if optimizer is not None and include_master_weights:
                files.append(("master.safetensors", self.master_pinned_state_dict))
            for name, tensors in files:
                w = _Writer(os.path.join(save_dir, name), tensors)
                self.writers.append(w)
                w.start()
            if not async_io:
                self._sync_io()
        dist.barrier()
        return save_dir
