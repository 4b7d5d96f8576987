"""Reference of ``opensora_fast::unpad_``: the unpack of a bucketed gather.

``gathered`` is ``[world, bucket]``; entry ``i`` owns bucket columns
``[offset[i], offset[i] + count[i])`` of every row, holding shard columns
``[begin[i], begin[i] + count[i])`` of a parameter sharded by ``model_sharding``
into ``world`` shards of ``shard[i]`` elements. Bucket element ``(r, c)`` is
element ``r * shard[i] + begin[i] + c`` of the flattened parameter; elements
past its numel are padding and are dropped. With ``begin = 0`` and
``count = shard`` an entry is upstream's ``remove_padding(cat(all_params),
shape)``. A copy: bit-exact on every backend.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._checks import check_int64, find_overlap, is_dense, shape_str, tensor_span


def _name(span) -> str:
    return span.arg if span.index < 0 else f"{span.arg}[{span.index}]"


def check_arguments(
    gathered: torch.Tensor,
    out: Sequence[torch.Tensor],
    offset: Sequence[int],
    shard: Sequence[int],
    begin: Sequence[int],
    count: Sequence[int],
) -> None:
    """What the native schema takes: tensors, and ints within int64 (the
    wrapper raises these where the schema parser would)."""
    if not isinstance(gathered, torch.Tensor):
        raise TypeError(f"unpad_: gathered must be a tensor, got {type(gathered).__name__}")
    for i, o in enumerate(out):
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"unpad_: out[{i}] must be a tensor, got {type(o).__name__}")
    for name, values in (("offset", offset), ("shard", shard), ("begin", begin), ("count", count)):
        check_int64("unpad_", name, values)


def check_inputs(
    gathered: torch.Tensor,
    out: Sequence[torch.Tensor],
    offset: Sequence[int],
    shard: Sequence[int],
    begin: Sequence[int],
    count: Sequence[int],
) -> None:
    """The native op's checks, in its order and with its messages
    (csrc/unpad/unpad.cpp). Nothing is written by a call that fails one."""
    check_arguments(gathered, out, offset, shard, begin, count)
    if torch.is_grad_enabled():
        for i, o in enumerate(out):
            if o.requires_grad:
                raise RuntimeError(
                    f"unpad_: out[{i}] requires grad and grad mode is on; unpad_ is not differentiable: "
                    "call it under torch.no_grad()"
                )
    n = len(out)
    if not (len(offset) == n and len(shard) == n and len(begin) == n and len(count) == n):
        raise ValueError(
            f"unpad_: offset, shard, begin and count must each have len(out)={n} entries, got "
            f"{len(offset)}, {len(shard)}, {len(begin)} and {len(count)}"
        )
    if not is_dense(gathered):
        raise ValueError("unpad_: gathered must be a dense (strided) tensor")
    if gathered.dim() != 2:
        raise ValueError(f"unpad_: gathered must be [world, bucket], got shape {shape_str(gathered.shape)}")
    if gathered.shape[0] < 1:
        raise ValueError(
            f"unpad_: gathered must have at least one row (world >= 1), got shape {shape_str(gathered.shape)}"
        )
    if not gathered.is_contiguous():
        raise ValueError("unpad_: gathered is not contiguous")
    world, bucket = int(gathered.shape[0]), int(gathered.shape[1])
    cuda_src = gathered.device.type == "cuda"
    spans, storages = [], {}
    for i, o in enumerate(out):
        if not is_dense(o):
            raise ValueError(f"unpad_: out[{i}] must be a dense (strided) tensor")
        if o.dtype != gathered.dtype:
            raise TypeError(f"unpad_: out[{i}] has dtype {o.dtype} but gathered has dtype {gathered.dtype}")
        host_ok = cuda_src and o.device.type == "cpu" and o.is_pinned()
        if o.device != gathered.device and not host_ok:
            raise ValueError(
                f"unpad_: out[{i}] is on {o.device} but gathered is on {gathered.device} (out must be on "
                "gathered's device, or in pinned host memory when gathered is on CUDA)"
            )
        if not o.is_contiguous():
            raise ValueError(f"unpad_: out[{i}] is not contiguous")
        if o.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"unpad_: out[{i}] is an inference tensor; it can only be written in place inside "
                "torch.inference_mode()"
            )
        off, sh, bg, ct = int(offset[i]), int(shard[i]), int(begin[i]), int(count[i])
        if min(off, sh, bg, ct) < 0:
            raise ValueError(
                f"unpad_: entry {i}: offset, shard, begin and count must be >= 0, got offset={off}, "
                f"shard={sh}, begin={bg}, count={ct}"
            )
        if ct > sh - bg:
            raise ValueError(f"unpad_: entry {i}: begin + count = {bg} + {ct} exceeds shard = {sh}")
        if ct > bucket - off:
            raise ValueError(f"unpad_: entry {i}: offset + count = {off} + {ct} exceeds the bucket's {bucket} columns")
        if sh < -(-o.numel() // world):
            raise ValueError(
                f"unpad_: out[{i}] has {o.numel()} elements but world * shard = {world} * {sh} covers fewer"
            )
        if gathered.device.type != "meta":
            spans.append(tensor_span(o, True, "out", i, storages))
    if gathered.device.type != "meta":
        spans.append(tensor_span(gathered, False, "gathered", -1, storages))
    hit = find_overlap(spans)
    if hit is not None:
        a, b = hit
        raise ValueError(
            f"unpad_: {_name(a)} and {_name(b)} overlap in memory; every out tensor must share no memory with "
            "gathered or another out"
        )


def unpad_(
    gathered: torch.Tensor,
    out: Sequence[torch.Tensor],
    offset: Sequence[int],
    shard: Sequence[int],
    begin: Sequence[int],
    count: Sequence[int],
) -> None:
    """In place: every entry's valid bucket elements into ``out[i]`` (see the module doc)."""
    out = list(out)
    check_inputs(gathered, out, offset, shard, begin, count)
    with torch.no_grad():
        for i, o in enumerate(out):
            flat = o.view(-1)
            n, sh, bg, ct, off = o.numel(), int(shard[i]), int(begin[i]), int(count[i]), int(offset[i])
            for r in range(gathered.shape[0]):
                j = r * sh + bg
                k = min(ct, n - j)
                if k <= 0:
                    break
                flat[j : j + k].copy_(gathered[r, off : off + k])
