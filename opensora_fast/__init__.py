"""opensora_fast: an accelerated drop-in for Open-Sora's utility layer.

Swap ``from opensora.utils.train import update_ema`` for
``from opensora_fast.utils.train import update_ema`` or call
:func:`patch_opensora` once, before the training script imports from
``opensora.utils``.
"""
from __future__ import annotations

import importlib

from ._ext import HAS_NATIVE, build_info
from ._version import __version__

# (upstream module, name) -> our module; extended as more of opensora/utils lands.
_DROP_INS = {
    "opensora.utils.train": ("opensora_fast.utils.train", ["update_ema", "get_batch_loss"]),
}


def patch_opensora(strict: bool = False) -> list[str]:
    """Replace functions of an installed Open-Sora with ours, in place.

    Patches the attribute on ``opensora.utils.<module>``, so code that imports
    it afterwards (``from opensora.utils.train import update_ema``) gets ours.
    Returns the patched names (``"opensora.utils.train.update_ema"``, ...).
    Modules that cannot be imported (Open-Sora absent, or its own dependencies
    such as colossalai missing) are skipped, or raise ImportError when ``strict``.
    """
    patched = []
    for upstream, (ours, names) in _DROP_INS.items():
        try:
            target = importlib.import_module(upstream)
        except ImportError:
            if strict:
                raise
            continue
        mine = importlib.import_module(ours)
        for name in names:
            setattr(target, name, getattr(mine, name))
            patched.append(f"{upstream}.{name}")
    return patched


__all__ = ["__version__", "HAS_NATIVE", "build_info", "patch_opensora"]
