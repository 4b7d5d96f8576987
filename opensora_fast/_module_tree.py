"""The parameter and submodule slots of a module tree, held so that a later
check sees any change to them cheaply: the pairing caches of ``update_ema``
(opensora_fast/utils/_ema.py) and of FusedAdamW's attached EMA
(opensora_fast/optim/fused_adamw.py)."""

from __future__ import annotations

import operator
import weakref

import torch

__all__ = ["ModuleTree"]

_is = operator.is_
_param_slots = operator.attrgetter("_parameters")
_module_slots = operator.attrgetter("_modules")


class ModuleTree:
    """The parameter and submodule slots of one module tree, checked in a few
    C-level passes (no Python code per slot): every ``_parameters`` and
    ``_modules`` dict of every submodule, held with its contents. Empty dicts
    must stay empty; each other dict must keep its length and hold the same
    object under each of its keys. That sees a parameter or submodule added,
    replaced, renamed or deleted however it was done (``m.w = P``,
    ``m._parameters["w"] = P``, ``del m.b``, ``ModuleList.insert``, a replaced
    submodule), and each module must still hold the very dicts it held, so a
    ``_parameters``/``_modules`` attribute rebound to a fresh dict is seen too.
    The root is held weakly: the plans are kept per EMA model in a weak map,
    and a strong reference from a plan to its key would keep the EMA alive."""

    __slots__ = ("root", "mods", "pdicts", "mdicts", "empty", "full", "lens", "owners", "keys", "values")

    def __init__(self, root: torch.nn.Module) -> None:
        dicts = []
        mods = list(root.modules())
        for m in mods:
            dicts += (m._parameters, m._modules)
        self.pdicts = list(map(_param_slots, mods))
        self.mdicts = list(map(_module_slots, mods))
        self.mods = mods[1:]  # root.modules() starts with the root
        self.root = weakref.ref(root)
        self.empty = [d for d in dicts if not d]
        self.full = [d for d in dicts if d]
        self.lens = list(map(len, self.full))
        self.owners = [d for d in self.full for _ in range(len(d))]
        self.keys = [k for d in self.full for k in d]
        self.values = [v for d in self.full for v in d.values()]

    def unchanged(self, root: torch.nn.Module) -> bool:
        try:
            return (
                root is self.root()
                and root._parameters is self.pdicts[0]
                and root._modules is self.mdicts[0]
                and all(map(_is, map(_param_slots, self.mods), self.pdicts[1:]))
                and all(map(_is, map(_module_slots, self.mods), self.mdicts[1:]))
                and not any(self.empty)
                and list(map(len, self.full)) == self.lens
                and all(map(_is, map(dict.get, self.owners, self.keys), self.values))
            )
        except (TypeError, AttributeError):  # a slot dict that is not a dict: no cache
            return False
