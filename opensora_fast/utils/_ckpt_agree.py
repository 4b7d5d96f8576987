"""Cross-rank agreement for the checkpoint code: before a collective that a
failed rank would never join, every rank learns whether any rank failed, and
raises. One small ``all_reduce`` when all is well; one more ``broadcast``
(the first failing rank's message) when not.

Every agreement uses the same tensor layout, so an agreement reached from one
call site pairs with one reached from another (a rank that failed early in
``CheckpointIO.save`` meets the others in ``model_gathering``'s check) and
every rank still runs the same sequence of collectives."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

# [first failing rank (or the group size)] + [min, -max] per agreed value
_N_VALUES = 2
_LAYOUT = 1 + 2 * _N_VALUES
TAIL_LEN = _LAYOUT - 1  # the tail an exchange must carry to pair with an agree on another rank
_MSG_BYTES = 4096
VALUE_CAP = 1 << 62  # values travel as int64; a rank leaves this in a MIN slot that another rank fills


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def agreement_device(group=None) -> torch.device:
    """Where a small agreement tensor lives: NCCL needs a CUDA tensor; every
    other backend takes a CPU one."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mark_agreed(e: BaseException) -> BaseException:
    """Marks an exception every rank raises together (no further agreement
    round is needed for it: every rank already knows)."""
    e._osf_agreed = True  # type: ignore[attr-defined]
    return e


def is_agreed(e: Optional[BaseException]) -> bool:
    return e is not None and getattr(e, "_osf_agreed", False)


def _message(failure: Union[str, BaseException]) -> str:
    if isinstance(failure, str):
        return failure
    return f"{type(failure).__name__}: {failure}"


def exchange(fn: str, failure: Union[None, str, BaseException], group, tail: Sequence[int]) -> List[int]:
    """One ``all_reduce(MIN)`` of ``[first failing rank] + tail`` over
    ``group``: several facts in one collective (a value every rank must share
    as ``v, -v``; one rank's value with ``VALUE_CAP`` on the others). When a
    rank failed, its message reaches every rank and every rank raises.
    :func:`agree` is this call with its values as the tail, so a tail of
    agree's length pairs with an ``agree`` on a rank that failed before this
    call. Returns the reduced tail."""
    own = ValueError(failure) if isinstance(failure, str) else failure
    world = dist.get_world_size(group) if dist_on() else 1
    if world == 1:
        if own is not None:
            raise own
        return [int(v) for v in tail]
    me = dist.get_rank(group)
    t = torch.tensor([me if own is not None else world, *tail], dtype=torch.int64, device=agreement_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    got = t.tolist()
    first = int(got[0])
    if first < world:  # the first failing rank's message, to every rank
        msg = torch.zeros(_MSG_BYTES, dtype=torch.uint8, device=t.device)
        if me == first:
            raw = _message(own).encode("utf-8", "replace")[:_MSG_BYTES]
            msg[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        dist.broadcast(msg, src=first if group is None else dist.get_global_rank(group, first), group=group)
        if own is not None:
            raise mark_agreed(own)
        text = bytes(msg.cpu().tolist()).rstrip(b"\0").decode("utf-8", "replace")
        raise mark_agreed(RuntimeError(f"{fn}: stopped on every rank: rank {first} failed: {text}"))
    return got[1:]


def agree(
    fn: str,
    failure: Union[None, str, BaseException],
    group=None,
    values: Optional[Dict[str, int]] = None,
) -> None:
    """Every rank of ``group`` calls this at the same point. Returns when no
    rank failed and every rank passed the same ``values`` (at most two named
    ints); otherwise raises on every rank: a failing rank its own exception
    (a str failure: ValueError), the others a RuntimeError naming ``fn``, the
    failing rank and its message; different values: the same ValueError on
    every rank. Without a process group, or in a group of one, no
    collective runs: it raises the failure, if any."""
    values = dict(values or {})
    if len(values) > _N_VALUES:
        raise ValueError(f"agree: at most {_N_VALUES} values, got {len(values)}")
    own = ValueError(failure) if isinstance(failure, str) else failure
    flat: List[int] = []
    for v in values.values():
        v = max(-VALUE_CAP, min(int(v), VALUE_CAP))
        flat += [v, -v]
    flat += [0] * (TAIL_LEN - len(flat))
    got = [0] + exchange(fn, own, group, flat)
    for j, (name, _) in enumerate(values.items()):
        lo, hi = int(got[1 + 2 * j]), -int(got[2 + 2 * j])
        if lo != hi:
            raise mark_agreed(
                ValueError(
                    f"{fn}: the ranks passed different {name} (from {lo} to {hi}); every rank must pass the same"
                )
            )


def agree_exception(fn: str, failure: Optional[BaseException], group=None) -> None:
    """:func:`agree` for a step that raised (or not) on this rank; an error
    already agreed on (every rank raised it together) is re-raised without a
    further collective."""
    if is_agreed(failure):
        raise failure  # type: ignore[misc]
    agree(fn, failure, group)
