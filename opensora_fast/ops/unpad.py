"""The unpad op (csrc/unpad/): unpacks a bucketed all-gather ``[world, bucket]``
into every parameter's unpadded tensor in one call. Wrapper and fake."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..reference import unpad as _ref
from ..reference._checks import is_dense
from ._registry import explain_schema_refusal, pick, register_fake


def unpad_(
    gathered: torch.Tensor,
    out: Sequence[torch.Tensor],
    offset: Sequence[int],
    shard: Optional[Sequence[int]] = None,
    begin: Optional[Sequence[int]] = None,
    count: Optional[Sequence[int]] = None,
) -> None:
    """In place, for every entry ``i``: bucket element ``(r, c)`` of columns
    ``[offset[i], offset[i] + count[i])`` is element ``r * shard[i] + begin[i] + c``
    of ``out[i]`` flattened; elements past ``out[i].numel()`` (model_sharding's
    padding) are dropped. A copy, bit-exact on every backend.

    Defaults: ``shard[i] = ceil(out[i].numel() / world)`` (model_sharding's shard),
    ``begin = 0``, ``count = shard`` (the whole shard in this bucket). A shard
    split across buckets is one entry per bucket with its own ``begin``/``count``.

    ``out[i]`` has ``gathered``'s dtype, is contiguous and on ``gathered``'s device
    (or pinned host memory for a CUDA ``gathered``: the kernel writes it directly).
    Out tensors must not overlap each other or ``gathered``. Bad input raises
    TypeError/ValueError naming the argument; every check runs before any write.
    Version counters of the outputs are bumped.
    """
    out = list(out)
    if not isinstance(gathered, torch.Tensor):
        raise TypeError(f"unpad_: gathered must be a tensor, got {type(gathered).__name__}")
    for i, o in enumerate(out):
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"unpad_: out[{i}] must be a tensor, got {type(o).__name__}")
    dense = is_dense(gathered)  # the op refuses the others; no shape to read here
    world = int(gathered.shape[0]) if dense and gathered.dim() >= 1 and gathered.shape[0] > 0 else 1
    if shard is None:
        shard = [-(-o.numel() // world) if is_dense(o) else 0 for o in out]
    if begin is None:
        begin = [0] * len(out)
    if count is None:
        count = [int(s) - int(b) for s, b in zip(shard, begin)]
    unpad_lists(
        gathered,
        out,
        [int(x) for x in offset],
        [int(x) for x in shard],
        [int(x) for x in begin],
        [int(x) for x in count],
    )


def unpad_lists(gathered: torch.Tensor, out: list, offset: list, shard: list, begin: list, count: list) -> None:
    """:func:`unpad_` for callers whose arguments already are a list of tensors
    and lists of ints, all given (no per-entry conversion: host time, ~1100
    entries a bucket for an 11B model). The op checks them all the same."""
    if not isinstance(gathered, torch.Tensor):
        raise TypeError(f"unpad_: gathered must be a tensor, got {type(gathered).__name__}")
    args = (gathered, out, offset, shard, begin, count)
    explain_schema_refusal(pick("unpad_", gathered.device, _ref.unpad_), args, lambda: _ref.check_arguments(*args))


@register_fake("unpad_")
def _unpad_fake(gathered, out, offset, shard, begin, count):
    _ref.check_inputs(gathered, out, offset, shard, begin, count)
    return None
