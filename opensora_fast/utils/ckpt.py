"""Drop-in for ``opensora.utils.ckpt``: the same names, signatures and results,
with a bucketed gather, an async crash-safe ``CheckpointIO`` and safe loading.

What differs from upstream (each on purpose):

* **Gathers** (``model_gathering``, ``master_weights_gathering``): parameters are
  grouped by process group and dtype into buckets of at most ``bucket_bytes``
  (default 256 MiB, for the ``[world, bucket]`` gathered buffer; a shard larger
  than a bucket is split across buckets); one collective per bucket (a
  ``gather`` to rank 0 on gloo, where only rank 0 needs the bytes;
  ``all_gather_into_tensor`` on NCCL); one ``opensora_fast::unpad_`` call per
  bucket writes every parameter's unpadded tensor straight into its pinned
  destination, or (``staging``, the default when the destinations lie side by
  side in a few pinned buffers, as CheckpointIO's 1 GiB segments do) into a
  device buffer laid out like them,
  which the copy engine then moves in one transfer per bucket. The next
  bucket's collective runs while the current one is unpacked (or copied out).
  Extra memory per rank: at most two buckets (``2 * bucket_bytes``), every
  buffer counted: two gathered buffers (when staging on a GPU, rank 0 holds
  one gathered and two staging buffers, so one bucket is copied out while the
  next is unpacked) and, where shards are not side by side, a send buffer to
  pack them (``model_sharding``'s are, so a bucket is sent as a view of them);
  the ranks agree on a bucket size that fits. The results are upstream's, bit for bit;
  0-dim parameters work (upstream's ``remove_padding`` fails on them).
* **Writing**: the EMA and master weights are written as safetensors from the
  pinned buffers by a background thread; ``save`` returns once the buffers are
  filled, ``_sync_io`` waits, and a new save waits for the previous one. The
  thread writes each file through tensornvme's ``AsyncFileWriter`` (reached, as
  upstream does, through ``colossalai.utils.safetensors.save``) when both import,
  else with our own streaming writer; tensornvme's AsyncFileWriter is not on
  PyPI, so the second is what a pip install gets. Either way the file is
  fsynced before the checkpoint is renamed complete.
* **Crash safety**: a checkpoint is written under a hidden temporary name
  (``.epochE-global_stepS.partial``), every file fsynced, ``running_states.json``
  last, then renamed. A directory named ``epoch*-global_step*`` with a
  ``running_states.json`` is complete; ``load`` refuses anything else and
  ``rm_checkpoints`` ignores it. ``rm_checkpoints`` removes ``running_states.json``
  first, so a removal cut short never leaves a loadable half checkpoint; it
  lists ``save_dir`` (upstream globbed it: ``exp[12]`` matched ``exp1``).
  ``epoch`` and ``actual_update_step`` name the directory: non-negative ints only.
* **Checksums**: a CRC-32 of every file (computed while writing it where we
  write it) is recorded under ``"checksums"`` in ``running_states.json``;
  ``load`` checks the files it reads first (``verify=False`` skips it), so a
  flipped bit is a ValueError naming the file, not silently wrong weights.
* **Failures**: a failed background write is raised by ``_sync_io`` /
  ``close`` and by the next ``save``; one never asked for is logged and makes
  the interpreter exit with status 1 (:mod:`._ckpt_exit`). In a process group
  a failure on any rank, before or inside the gathers, raises on every rank
  (one small ``all_reduce`` agrees on success before each collective step),
  and the gathers refuse ranks passing different ``bucket_bytes`` or
  ``collective``.
* **Loading**: ``.pt``/``.pth`` with ``weights_only=True`` unless
  ``weights_only=False`` is passed for a trusted legacy file; safetensors
  errors name the file; ``rename_keys`` applies to both formats.
* **Without colossalai** (``booster=None``): the model's state dict is saved as
  ``model.safetensors`` and the optimizer, lr scheduler and sampler states as
  ``*.pt`` files loaded back with ``weights_only=True``. Booster-sharded models
  and optimizers (ZeRO, hybrid parallel), LoRA saving and sharded-directory
  loading need colossalai's Booster (``pip install opensora_fast[colossalai]``);
  with a booster those parts are written inside the temporary directory so the
  rename covers them: under ``async_io``, by the Booster's background writers
  when it has them (ColossalAI's ``use_async``, as upstream), the rename
  waiting for every rank's writes (:mod:`._ckpt_booster`); else before
  ``save`` goes on.
* ``CheckpointIO.save`` also writes the EMA as ``ema.safetensors`` when
  ``async_io=False`` (upstream then ``torch.save``s the still-sharded EMA).
* **Gather-free checkpoints** (not upstream's; ``save/load(parallel=True)``,
  :func:`save_sharded_as_consolidated`, :func:`load_sharded_from_consolidated`
  and their master-weight forms): every rank writes its own shards' bytes of
  the one consolidated safetensors file with positioned writes (the same
  file as the gather path's) and reads back only its own bytes; see
  docs/checkpoints.md and :mod:`._ckpt_parallel`.
* **World size 1** (no process group, or a group of one): the gathers run no
  collective; each shard is the whole padded tensor, so its prefix is copied
  straight into the destination (same bits).

Layout (private modules, no import circle): :mod:`._ckpt_plan` (bucket
planning, layout tests), :mod:`._ckpt_gather` (the bucketed gather),
:mod:`._ckpt_shard` (sharding and the gathers), :mod:`._ckpt_write` (the
writer and its background job), :mod:`._ckpt_booster` (the Booster's part),
:mod:`._ckpt_files` (checksums, fsync, JSON, the directory layout),
:mod:`._ckpt_load` (loaders), :mod:`._ckpt_io` (CheckpointIO), :mod:`._ckpt_dist` / :mod:`._ckpt_agree` (process groups),
:mod:`._ckpt_parallel` / :mod:`._ckpt_parallel_io` / :mod:`._ckpt_parallel_crc`
(the gather-free files).
"""

from __future__ import annotations

import os

from . import _ckpt_dist, _ckpt_files, _ckpt_io, _ckpt_load, _ckpt_plan, _ckpt_write
from ._ckpt_files import load_json, rm_checkpoints, save_json
from ._ckpt_io import CheckpointIO
from ._ckpt_load import load_checkpoint, load_from_hf_hub, load_from_sharded_state_dict, print_load_warning
from ._ckpt_parallel_io import (
    load_master_sharded_from_consolidated,
    load_sharded_from_consolidated,
    save_master_sharded_as_consolidated,
    save_sharded_as_consolidated,
)
from ._ckpt_plan import DEFAULT_BUCKET_BYTES
from ._ckpt_shard import (
    load_master_weights,
    master_weights_gathering,
    model_gathering,
    model_sharding,
    record_model_param_shape,
    remove_padding,
)

__all__ = [
    "CheckpointIO",
    "load_checkpoint",
    "load_from_hf_hub",
    "load_from_sharded_state_dict",
    "load_json",
    "load_master_sharded_from_consolidated",
    "load_master_weights",
    "load_sharded_from_consolidated",
    "master_weights_gathering",
    "model_gathering",
    "model_sharding",
    "print_load_warning",
    "record_model_param_shape",
    "remove_padding",
    "rm_checkpoints",
    "save_json",
    "save_master_sharded_as_consolidated",
    "save_sharded_as_consolidated",
    "DEFAULT_BUCKET_BYTES",
]

hf_endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"

# Private names the tests read through this module. Patch them where they live
# (_ckpt_write.phase_hook, _ckpt_write.write_safetensors, _ckpt_io.PIN_SEGMENT_BYTES).
PIN_SEGMENT_BYTES = _ckpt_io.PIN_SEGMENT_BYTES
_Item = _ckpt_plan.Item
_is_complete = _ckpt_files.is_complete
_bucket_cols = _ckpt_plan.bucket_cols
_plan_buckets = _ckpt_plan.plan_buckets
_run_starts = _ckpt_plan.run_starts
_side_by_side = _ckpt_plan.side_by_side
_show_progress = _ckpt_dist.show_progress
_load_safetensors = _ckpt_load.load_safetensors
_rename = _ckpt_load.rename
_write_safetensors = _ckpt_write.write_safetensors
