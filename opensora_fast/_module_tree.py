"""The slots of a module tree, held so that a later check sees any change to
them cheaply: the pairing caches of ``update_ema`` (opensora_fast/utils/_ema.py)
and of FusedAdamW's attached EMA (opensora_fast/optim/fused_adamw.py), and the
checkpoint plans' ``ModuleSlots`` (opensora_fast/utils/_ckpt_plan.py)."""

from __future__ import annotations

import operator
import weakref
from typing import Tuple

import torch

__all__ = ["ModuleTree"]

_is = operator.is_


class ModuleTree:
    """The slots (``_parameters`` and ``_modules`` by default; a subclass may
    name more) of every module of one tree, checked in a few C-level passes
    (no Python code per slot): each module must still hold the very slot
    dicts it held, empty dicts must stay empty, each other dict must keep its
    length and hold the same object under each of its keys. That sees a
    parameter or submodule added, replaced, renamed or deleted however it was
    done (``m.w = P``, ``m._parameters["w"] = P``, ``del m.b``,
    ``ModuleList.insert``, a replaced submodule, a slot attribute rebound to a
    fresh dict). The root is held weakly: a cache keyed by a model must not
    keep it alive through its own entry."""

    __slots__ = ("getters", "root", "mods", "dicts", "empty", "full", "lens", "owners", "keys", "values")
    SLOTS: Tuple[str, ...] = ("_parameters", "_modules")

    def __init__(self, root: torch.nn.Module) -> None:
        mods = list(root.modules())
        self.getters = getters = tuple(map(operator.attrgetter, self.SLOTS))  # made once: unchanged() runs per step
        self.root = weakref.ref(root)
        self.mods = mods[1:]  # root.modules() starts with the root; its slots are checked through the root
        every = [d for get in getters for d in map(get, mods)]
        self.dicts = [(get(root), list(map(get, self.mods))) for get in getters]  # (the root's, the others')
        self.empty = [d for d in every if not d]
        self.full = [d for d in every if d]
        self.lens = list(map(len, self.full))
        self.owners = [d for d in self.full for _ in range(len(d))]
        self.keys = [k for d in self.full for k in d]
        self.values = [v for d in self.full for v in d.values()]

    def unchanged(self, root: torch.nn.Module) -> bool:
        try:
            if self.root() is not root:
                return False
            for get, (own, others) in zip(self.getters, self.dicts):
                if get(root) is not own or not all(map(_is, map(get, self.mods), others)):
                    return False
            return (
                not any(self.empty)
                and list(map(len, self.full)) == self.lens
                and all(map(_is, map(dict.get, self.owners, self.keys), self.values))
            )
        except (TypeError, AttributeError):  # a slot dict that is not a dict: no cache
            return False
