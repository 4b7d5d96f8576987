"""CheckpointIO's argument checks and its reusable host buffers: the
counters that name a checkpoint, and whether the pinned buffers of an
earlier save still fit what is saved now."""

from __future__ import annotations

import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

# (name, shape, dtype) of one pinned buffer
Entry = Tuple[str, Tuple[int, ...], torch.dtype]


def _counter(fn: str, name: str, value, required: bool) -> Optional[int]:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{fn}: {name} must be a non-negative int, got {type(value).__name__} {value!r}")
    try:
        v = operator.index(value)
    except TypeError as e:  # e.g. a float tensor: it has __index__ but refuses it
        raise TypeError(f"{fn}: {name} must be a non-negative int, got {type(value).__name__} {value!r}") from e
    if v < 0:
        raise ValueError(f"{fn}: {name} must be a non-negative int, got {v}")
    return int(v)


def check_counters(fn: str, *, epoch, step, global_step, batch_size, actual_update_step) -> Dict[str, Optional[int]]:
    """The running states, as plain ints. ``epoch`` and ``actual_update_step``
    name the checkpoint's directory (``epoch{E}-global_step{S}``, which
    ``rm_checkpoints`` and ``load`` parse as digits): both required; the others
    may be None. A bool, a float, a string (``"0/../x"`` would leave
    ``save_dir``) or a negative number is refused."""
    return {
        "epoch": _counter(fn, "epoch", epoch, True),
        "step": _counter(fn, "step", step, False),
        "global_step": _counter(fn, "global_step", global_step, False),
        "batch_size": _counter(fn, "batch_size", batch_size, False),
        "actual_update_step": _counter(fn, "actual_update_step", actual_update_step, True),
    }


def ema_entries(fn: str, ema: nn.Module, ema_shape_dict: dict) -> List[Entry]:
    """What the EMA's pinned buffers must be now: every parameter at its
    recorded full shape in its current dtype, then the buffers as they are."""
    entries: List[Entry] = []
    names = set()
    for name, p in ema.named_parameters():
        if name not in ema_shape_dict:
            raise ValueError(f"{fn}: ema_shape_dict has no entry for parameter {name!r}")
        entries.append((name, tuple(int(d) for d in ema_shape_dict[name]), p.dtype))
        names.add(name)
    entries += [(k, tuple(v.shape), v.dtype) for k, v in ema.state_dict(keep_vars=True).items() if k not in names]
    return entries


def master_entries(model: nn.Module, optimizer) -> List[Entry]:
    """What the master weights' pinned buffers must be: each working
    parameter's shape in its master weight's dtype."""
    w2m = optimizer.get_working_to_master_map()
    return [(n, tuple(p.shape), w2m[id(p)].dtype) for n, p in model.named_parameters()]


def fits(pinned: Optional[Dict[str, torch.Tensor]], entries: List[Entry]) -> bool:
    """The buffers of an earlier save hold exactly ``entries`` (names, shapes,
    dtypes): they can be reused, else they must be made again (an EMA
    converted to another dtype, a reshaped or added parameter)."""
    if pinned is None or len(pinned) != len(entries):
        return False
    for name, shape, dtype in entries:
        t = pinned.get(name)
        if t is None or t.dtype != dtype or tuple(t.shape) != shape:
            return False
    return True


def copy_whole_ema(fn: str, ema: nn.Module, pinned: Dict[str, torch.Tensor]) -> None:
    """One process: the EMA is whole; each tensor goes to its buffer at the
    recorded shape. Everything is checked before anything is written."""
    sd = ema.state_dict()
    for k, v in sd.items():
        t = pinned[k]
        if v.numel() != t.numel() or v.dtype != t.dtype:
            raise ValueError(
                f"{fn}: the EMA's {k!r} has shape {list(v.shape)} and dtype {v.dtype}, but ema_shape_dict "
                f"records shape {list(t.shape)} (dtype {t.dtype}); record it again (record_model_param_shape)"
            )
    with torch.no_grad():
        for k, v in sd.items():
            pinned[k].copy_(v.reshape(pinned[k].shape))
