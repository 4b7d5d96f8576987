"""Loads the native extension once and decides, per op and device, whether the
native kernel or the pure-PyTorch reference runs.

``OPENSORA_FAST_BACKEND=auto|native|reference`` (default ``auto``):

* ``auto``: the native kernel when the extension has one for the tensors'
  device, else the reference, with one log message per (op, device, reason).
* ``native``: the native kernel or a ``RuntimeError`` saying why it cannot run.
* ``reference``: always the reference.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch

logger = logging.getLogger("opensora_fast")

_BACKENDS = ("auto", "native", "reference")

try:
    from . import _C  # noqa: F401  (registers torch.ops.opensora_fast.*)

    HAS_NATIVE = True
    _IMPORT_ERROR: str | None = None
except ImportError as e:  # pure-Python install, or a build for another torch
    import importlib.util

    _C = None
    HAS_NATIVE = False
    if importlib.util.find_spec(f"{__package__}._C") is None:
        _IMPORT_ERROR = "opensora_fast._C is not built (OPENSORA_FAST_NO_EXT=1 install, or no compiler)"
    else:
        _IMPORT_ERROR = f"opensora_fast._C failed to load (built for another torch?): {e}"

from ._version import __version__


def registered_ops() -> list[str]:
    """The public ops the extension registered, read from the dispatcher
    (private ``_*`` test ops left out)."""
    if not HAS_NATIVE:
        return []
    names = (n for n in torch._C._dispatch_get_all_op_names() if n.startswith("opensora_fast::"))
    return sorted(n for n in names if not n.split("::", 1)[1].startswith("_"))


def build_info() -> dict[str, Any]:
    """What was built: version, torch, native, cuda_kernels, cuda_archs, ops, ..."""
    info: dict[str, Any] = {
        "version": __version__,
        "torch_runtime": torch.__version__,
        "native": HAS_NATIVE,
        "cuda_kernels": False,
        "cuda_archs": "",
        "cuda": None,
        "torch": None,
        "ops": [],
        "backend": backend_setting(),
    }
    if HAS_NATIVE:
        info.update(_C.build_info())
        info["ops"] = registered_ops()
    else:
        info["import_error"] = _IMPORT_ERROR
    info["cuda_available"] = torch.cuda.is_available()
    return info


def backend_setting() -> str:
    value = os.environ.get("OPENSORA_FAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(
            f"OPENSORA_FAST_BACKEND must be one of {', '.join(_BACKENDS)}; got {value!r}"
        )
    return value


_told: set[tuple[str, str, str]] = set()


def _say_once(op: str, device: str, reason: str) -> None:
    key = (op, device, reason)
    if key not in _told:
        _told.add(key)
        logger.warning("opensora_fast.%s on %s: using the PyTorch reference (%s)", op, device, reason)


def _has_kernel(op: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"opensora_fast::{op}", key)


def use_native(op: str, device: torch.device) -> bool:
    """True when ``op`` should run its native kernel for tensors on ``device``."""
    setting = backend_setting()
    if setting == "reference":
        _say_once(op, device.type, "OPENSORA_FAST_BACKEND=reference")
        return False
    if not HAS_NATIVE:
        why = _IMPORT_ERROR
    elif not _has_kernel(op, device.type):
        why = f"the extension has no {device.type} kernel for it"
    else:
        return True
    if setting == "native":
        raise RuntimeError(f"OPENSORA_FAST_BACKEND=native but opensora_fast.{op} cannot run natively on {device.type}: {why}")
    _say_once(op, device.type, why)
    return False


def pick(op: str, device: torch.device, reference_impl):
    """The callable to run for ``op`` on ``device``: ``torch.ops.opensora_fast.<op>``
    or ``reference_impl``. Under torch.compile the choice is made at trace time
    from HAS_NATIVE alone (dynamo cannot trace the dispatcher queries)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.opensora_fast, op) if HAS_NATIVE else reference_impl
    return getattr(torch.ops.opensora_fast, op) if use_native(op, device) else reference_impl
