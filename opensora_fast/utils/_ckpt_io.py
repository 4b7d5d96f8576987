"""Open-Sora's ``CheckpointIO``: a save in three agreed steps (local work,
the collectives, rank 0's files), a load that refuses incomplete or damaged
checkpoints, and the reusable pinned host buffers."""

from __future__ import annotations

import os
import shutil
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from . import (
    _ckpt_booster,
    _ckpt_dist,
    _ckpt_exit,
    _ckpt_files,
    _ckpt_load,
    _ckpt_parallel_io,
    _ckpt_state,
    _ckpt_write,
)
from ._ckpt_plan import numel, side_by_side_views
from ._ckpt_shard import master_weights_gathering, model_gathering

PIN_SEGMENT_BYTES = 1 << 30  # CheckpointIO's pinned buffers: segments of at most this (a larger tensor: its own)


class CheckpointIO:
    """Open-Sora's CheckpointIO: ``save``/``load`` of model, EMA, optimizer,
    master weights, lr scheduler, sampler and running states, with the EMA and
    master weights written in the background and every checkpoint crash-safe
    (see :mod:`opensora_fast.utils.ckpt`). ``booster`` may be None (plain torch
    state dicts)."""

    def __init__(
        self, n_write_entries: int = 32, *, bucket_bytes: Optional[int] = None, progress: Optional[bool] = None
    ):
        self.n_write_entries = n_write_entries
        self.bucket_bytes = bucket_bytes
        self.progress = progress
        self.writer: Optional[_ckpt_write.Job] = None
        self.master_writer = None  # kept for upstream's attribute; one job writes both files
        self.pinned_state_dict: Optional[Dict[str, torch.Tensor]] = None
        self.master_pinned_state_dict: Optional[Dict[str, torch.Tensor]] = None
        self._shared_dirs: Dict[str, bool] = {}  # save(parallel=True): the probe's verdict per save_dir

    def _sync_io(self):
        """Waits until the previous save's files are written and renamed;
        raises RuntimeError if that write failed (once: the failure is then
        reported)."""
        job, self.writer = self.writer, None
        if job is not None:
            job.wait()

    def close(self) -> None:
        """Waits for the last background write, raising its failure (as
        :meth:`_sync_io`). Call it before a script ends."""
        self._sync_io()

    def __del__(self):
        try:
            self._sync_io()
        except Exception as e:  # nobody to raise to: logged, and the exit status will say so
            _ckpt_exit.swallowed(f"{e} (found when the CheckpointIO was dropped)")

    @staticmethod
    def _pinned_dict(entries) -> Dict[str, torch.Tensor]:
        """Host buffers for ``entries`` (name, shape, dtype): views side by side
        in pinned segments (when CUDA is there) of up to ``PIN_SEGMENT_BYTES``
        per dtype, in order, so a gathered bucket reaches them in one or two
        copy-engine transfers and pinning is paid per segment, not per tensor.
        Segments, not one buffer: torch's pinned allocator rounds every
        allocation up to a power of two, so one 22 GB buffer would pin 32 GB;
        1 GiB segments waste at most the unused tail of each."""
        pin = torch.cuda.is_available()
        entries = [(k, tuple(int(d) for d in shape), dt) for k, shape, dt in entries]
        views = side_by_side_views(
            ((numel(shape), dt) for _, shape, dt in entries),
            lambda n, dt: torch.empty(n, dtype=dt, device="cpu", pin_memory=pin),
            PIN_SEGMENT_BYTES,
        )
        return {k: v.view(shape) for (k, shape, _), v in zip(entries, views)}

    def _prepare_pinned_state_dict(self, ema: nn.Module, ema_shape_dict: dict):
        """Rank 0: host buffers for the EMA, reused while they still fit it."""
        if _ckpt_dist.rank() == 0:
            entries = _ckpt_state.ema_entries("CheckpointIO.save", ema, ema_shape_dict)
            if not _ckpt_state.fits(self.pinned_state_dict, entries):
                self.pinned_state_dict = None  # the old buffers go before the new ones are pinned
                self.pinned_state_dict = self._pinned_dict(entries)

    def _prepare_master_pinned_state_dict(self, model: nn.Module, optimizer):
        """Rank 0: host buffers for the master weights, reused while they fit."""
        if _ckpt_dist.rank() == 0:
            entries = _ckpt_state.master_entries(model, optimizer)
            if not _ckpt_state.fits(self.master_pinned_state_dict, entries):
                self.master_pinned_state_dict = None
                self.master_pinned_state_dict = self._pinned_dict(entries)

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
        *,
        parallel: bool = False,
    ) -> str:
        """Save a checkpoint to ``save_dir/epoch{epoch}-global_step{actual_update_step}``
        and return that path. Every rank must call it. Returns once the EMA and
        master weights are in pinned host memory; with ``async_io`` the files are
        written (and the directory appears under its final name) in the
        background — ``_sync_io()`` waits; the next save waits too, and raises
        if that write failed. A failure on any rank raises on every rank.

        ``parallel``: the EMA and master weights are written without a gather,
        every rank its own shards' bytes of the one consolidated file
        (:func:`save_sharded_as_consolidated`; same files, no host buffers,
        written before ``save`` returns); when the ranks do not all see
        ``save_dir`` (probed at this CheckpointIO's first save into it), one
        log line and the gather path. In one process with ``async_io`` there is
        no gather to avoid: the EMA and master weights are copied to host
        buffers and written in the background, as without ``parallel`` (the
        same files; ``save`` returns sooner)."""
        fn = "CheckpointIO.save"
        made: List[str] = []  # rank 0: the temporary directory, once made (removed if the save fails)
        failure = final = tmp = states = None
        sums: Dict[str, str] = {}
        masters = optimizer is not None and include_master_weights
        if parallel and async_io and _ckpt_dist.world_size() == 1:
            parallel = False  # nothing to gather: host copies written in the background, the same files
        # 1. local work: checks, rank 0's plain files and host buffers
        try:
            self._sync_io()
            states = _ckpt_state.check_counters(
                fn,
                epoch=epoch,
                step=step,
                global_step=global_step,
                batch_size=batch_size,
                actual_update_step=actual_update_step,
            )
            final = os.path.join(save_dir, f"epoch{states['epoch']}-global_step{states['actual_update_step']}")
            tmp = _ckpt_files.partial_name(final)
            self._check_save(fn, final, booster, model, ema, ema_shape_dict, lora)
            if _ckpt_dist.rank() == 0:
                sums = self._save_local(
                    tmp,
                    made,
                    booster,
                    model,
                    ema,
                    optimizer,
                    lr_scheduler,
                    sampler,
                    step,
                    ema_shape_dict,
                    masters,
                    host_buffers=not parallel,
                )
        except Exception as e:
            failure = e
        self._agree(fn, failure, made)
        # 2. the collectives: the Booster's parts, the gathers (or each rank's own bytes)
        writers: list = []  # the Booster's background writers of this save
        use_async = False  # whether the Booster writes in the background
        try:
            if parallel:
                parallel = self._shared_save_dir(fn, save_dir, tmp)
                if not parallel and _ckpt_dist.rank() == 0:  # the fallback gathers into host buffers
                    self._save_local(None, made, None, None, ema, optimizer, None, None, step, ema_shape_dict, masters)
            if parallel:
                sums.update(
                    _ckpt_parallel_io.save_files(tmp, ema, ema_shape_dict, model, optimizer, masters, self.progress)
                )
            else:
                self._save_gathered(fn, tmp, model, ema, optimizer, ema_shape_dict, masters)
            if booster is not None:  # after our copies, which its background writes would slow
                use_async = async_io and self._booster_in_background(fn, booster, save_dir, tmp)
                writers = _ckpt_booster.save_parts(booster, tmp, model, optimizer, lr_scheduler, lora, use_async)
        except Exception as e:
            failure = e
        self._agree(fn, failure, made, writers)
        # 3. rank 0 writes the rest (in the background with async_io) and renames, once
        # every rank's Booster writes are done; the others wait for theirs in the background
        try:
            rank = _ckpt_dist.rank()
            if rank == 0:
                with_ema, with_masters = (ema is not None, masters) if not parallel else (False, False)
                before = None
                if use_async:
                    world = _ckpt_dist.world_size()
                    before = lambda: _ckpt_booster.wait_ranks(tmp, writers, world)  # noqa: E731
                self._save_files(tmp, final, states, sums, with_ema, with_masters, async_io, before)
            elif use_async:
                self.writer = _ckpt_write.RankJob(tmp, final, rank, writers)
                self.writer.start()
        except Exception as e:
            failure = e
        self._agree(fn, failure, made if not async_io else [])
        return final

    def _shared_save_dir(self, fn: str, save_dir: str, tmp: str) -> bool:
        """save(parallel=True): whether every rank sees ``save_dir``, probed in
        the first save's temporary directory and remembered: every save goes to
        a fresh subdirectory of it, and each parallel file write proves again
        that every rank sees the file (a ValueError on every rank if not). Every
        rank makes the same saves, so every rank probes at the same saves."""
        key = os.path.abspath(save_dir)
        if key not in self._shared_dirs:
            self._shared_dirs[key] = _ckpt_parallel_io.use_parallel(fn, tmp)
        return self._shared_dirs[key]

    @staticmethod
    def _check_save(fn: str, final: str, booster, model, ema, ema_shape_dict, lora: bool) -> None:
        _ckpt_files.check_target(fn, final)
        if ema is not None and ema_shape_dict is None:
            raise ValueError(f"{fn}: ema_shape_dict is required with ema (record_model_param_shape)")
        if model is not None and booster is None and lora:
            _ckpt_load.needs_colossalai("CheckpointIO.save(lora=True)")

    def _save_local(
        self,
        tmp: str,
        made: List[str],
        booster,
        model,
        ema,
        optimizer,
        lr_scheduler,
        sampler,
        step,
        ema_shape_dict,
        masters: bool,
        host_buffers: bool = True,
    ) -> Dict[str, str]:
        """Rank 0: the temporary directory, the plain parts, the host buffers
        (``tmp`` None: only the host buffers); returns the checksums of the
        files written."""
        sums: Dict[str, str] = {}
        if tmp is None:
            host_buffers = True
        elif os.path.exists(tmp):
            shutil.rmtree(tmp)  # left by a save that was killed
        if tmp is not None:
            os.makedirs(tmp)
            made.append(tmp)
            _ckpt_write.phase("mkdir")
            if booster is None:
                sums = _ckpt_write.save_plain_parts(tmp, model, optimizer, lr_scheduler)
            if sampler is not None:  # only for VariableVideoBatchSampler
                sums["sampler"] = _ckpt_files.torch_save_synced(sampler.state_dict(step), os.path.join(tmp, "sampler"))
        if not host_buffers:
            return sums
        if ema is not None:
            self._prepare_pinned_state_dict(ema, ema_shape_dict)
        if masters:
            self._prepare_master_pinned_state_dict(model, optimizer)
        return sums

    def _save_gathered(self, fn: str, tmp: str, model, ema, optimizer, ema_shape_dict, masters: bool) -> None:
        """Every rank: the gathers into the host buffers."""
        if masters:
            master_weights_gathering(
                model, optimizer, self.master_pinned_state_dict, bucket_bytes=self.bucket_bytes, progress=self.progress
            )
        if ema is not None:
            if _ckpt_dist.dist_on():
                model_gathering(
                    ema, ema_shape_dict, self.pinned_state_dict, bucket_bytes=self.bucket_bytes, progress=self.progress
                )
            else:  # one process: the EMA is whole (model_sharding needs a process group)
                _ckpt_state.copy_whole_ema(fn, ema, self.pinned_state_dict)

    def _save_files(
        self,
        tmp: str,
        final: str,
        states: dict,
        sums: Dict[str, str],
        with_ema: bool,
        masters: bool,
        async_io: bool,
        before=None,
    ) -> None:
        """Rank 0: the EMA and master files, running_states.json, the rename
        (after ``before``: the wait for the Booster's background writes)."""
        files: List[Tuple[str, Dict[str, torch.Tensor]]] = []
        if with_ema:
            files.append(("ema.safetensors", self.pinned_state_dict))
        if masters:
            files.append(("master.safetensors", self.master_pinned_state_dict))
        job = _ckpt_write.Job(tmp, final, files, states, _ckpt_dist.show_progress(self.progress), sums, before)
        self.writer = job
        if async_io:
            job.start()
        else:
            job.run()
            self._sync_io()

    def _booster_in_background(self, fn: str, booster, save_dir: str, tmp: str) -> bool:
        """Whether the Booster's parts go to its background writers: it has them,
        and one process or a directory every rank sees (probed once per
        ``save_dir``, as for ``parallel``; the same verdict on every rank)."""
        if _ckpt_booster.background_io(booster) is None:
            return False
        return _ckpt_dist.world_size() == 1 or self._shared_save_dir(fn, save_dir, tmp)

    @staticmethod
    def _agree(fn: str, failure: Optional[BaseException], made: List[str], writers: Optional[list] = None) -> None:
        """Raises on every rank when any rank failed; rank 0 then removes the
        temporary directory it made (once this rank's Booster writers into it
        are done)."""
        try:
            _ckpt_dist.agree_exception(fn, failure)
        except BaseException:
            _ckpt_booster.quiet_wait(writers or [])
            for d in made:
                shutil.rmtree(d, ignore_errors=True)
            raise

    def load(
        self,
        booster,
        load_dir: str,
        model: nn.Module = None,
        ema: nn.Module = None,
        optimizer=None,
        lr_scheduler=None,
        sampler=None,
        strict: bool = False,
        include_master_weights: bool = False,
        *,
        verify: bool = True,
        parallel: bool = False,
    ) -> tuple:
        """Load a complete checkpoint; returns ``(epoch, step)``. A directory
        without running_states.json (a save cut short) is refused. With
        ``verify`` (the default) every file to be read is first checked
        against the checksum recorded at save time (a checkpoint written
        before checksums, or by upstream, has none to check): a damaged file
        is a ValueError naming it, raised before anything is loaded. A
        failure on any rank raises on every rank.

        ``parallel``: the EMA must already be sharded by ``model_sharding``;
        each rank reads only its own shards of the EMA and master files
        (:func:`load_sharded_from_consolidated`), which the ranks verify
        together instead of each reading the whole file."""
        fn = "CheckpointIO.load"
        failure = running_states = None
        own = ("ema.safetensors", "master.safetensors") if parallel else ()
        try:
            running_states = self._open_checkpoint(load_dir)
            if verify:
                parts = _ckpt_load.parts_read(model, ema, optimizer, lr_scheduler, sampler, include_master_weights)
                parts = [p for p in parts if p not in own]
                _ckpt_files.verify(fn, load_dir, running_states.get("checksums"), parts)
        except Exception as e:
            failure = e
        _ckpt_dist.agree_exception(fn, failure)
        try:
            self._load_parts(
                booster,
                load_dir,
                model,
                None if parallel else ema,
                optimizer,
                lr_scheduler,
                sampler,
                strict,
                include_master_weights and not parallel,
            )
        except Exception as e:
            failure = e
        _ckpt_dist.agree_exception(fn, failure)
        if parallel:  # agrees on its own; every rank gets here together
            sums = running_states.get("checksums") if verify else None
            masters = include_master_weights and optimizer is not None
            _ckpt_parallel_io.load_files(load_dir, ema, model, optimizer, masters, sums, self.progress)
        return (running_states["epoch"], running_states["step"])

    @staticmethod
    def _open_checkpoint(load_dir: str) -> dict:
        """The running states of a complete checkpoint (refuses anything else)."""
        complete = _ckpt_files.COMPLETE
        if not os.path.isdir(load_dir):
            raise FileNotFoundError(f"CheckpointIO.load: checkpoint directory {load_dir} does not exist")
        base = os.path.basename(os.path.normpath(load_dir))
        if not os.path.isfile(os.path.join(load_dir, complete)) or (base.startswith(".") and base.endswith(".partial")):
            raise FileNotFoundError(
                f"CheckpointIO.load: {load_dir} is not a complete checkpoint (no {complete}: its save did not finish)"
            )
        running_states = _ckpt_files.load_json(os.path.join(load_dir, complete))
        if not isinstance(running_states, dict):
            raise ValueError(f"CheckpointIO.load: {os.path.join(load_dir, complete)} is not a JSON object")
        return running_states

    _load_parts = staticmethod(_ckpt_load.load_parts)
