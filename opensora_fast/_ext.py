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
import re
from typing import Any

import torch

from ._version import __version__

logger = logging.getLogger("opensora_fast")

_BACKENDS = ("auto", "native", "reference")


class BuildMismatchError(ImportError):
    """opensora_fast._C was built for another torch (major.minor) or CUDA major."""


def _major_minor(version: str | None) -> tuple[str, ...]:
    return tuple((version or "").split("+")[0].split(".")[:2])


def _local_tag(torch_version: str, cuda_version: str | None) -> str:
    """The wheel tag a build for this torch carries (setup.py's rule): cu130torch2.14."""
    cuda = "cu" + "".join(cuda_version.split(".")[:2]) if cuda_version else "cpu"
    return f"{cuda}torch{'.'.join(_major_minor(torch_version))}"


def build_mismatch(meta: Any, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why the extension recorded in ``meta`` (opensora_fast/_build_meta.py) cannot
    load under this torch, or None. It must match torch's major.minor and, when it
    holds CUDA kernels, torch's CUDA major."""
    built_torch = getattr(meta, "TORCH_VERSION", None)
    built_cuda = getattr(meta, "CUDA_VERSION", None)
    if not built_torch:
        return None
    torch_ok = _major_minor(built_torch) == _major_minor(torch_version)
    if not built_cuda:
        cuda_ok = True
    elif not torch_cuda:
        cuda_ok = False
    else:
        cuda_ok = built_cuda.split(".")[0] == torch_cuda.split(".")[0]
    if torch_ok and cuda_ok:
        return None
    built = f"torch {built_torch}" + (f" with CUDA {built_cuda}" if built_cuda else " (CPU kernels only)")
    here = f"torch {torch_version}" + (f" with CUDA {torch_cuda}" if torch_cuda else " without CUDA")
    version = getattr(meta, "VERSION", __version__)
    return (
        f"opensora_fast {version} was built for {built}, but this environment has {here}; "
        f"its compiled extension cannot load under another torch major.minor or CUDA major. "
        f"Install the build for this torch (version tag +{_local_tag(torch_version, torch_cuda)}), "
        f"or rebuild against it: pip install --no-build-isolation --force-reinstall --no-deps "
        f"--no-binary opensora_fast opensora_fast (from a checkout: pip install --no-build-isolation .). "
        f"OPENSORA_FAST_BACKEND=reference imports without the extension (PyTorch references only)."
    )


def _check_build() -> str | None:
    """Compares the recorded build with this torch BEFORE _C is loaded."""
    import importlib.util

    try:
        from . import _build_meta
    except ImportError:  # not built by our setup.py (or no extension): nothing to check
        return None
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return None
    return build_mismatch(_build_meta, torch.__version__, torch.version.cuda)


_MISMATCH = _check_build()
if _MISMATCH is not None and os.environ.get("OPENSORA_FAST_BACKEND", "").strip().lower() != "reference":
    raise BuildMismatchError(_MISMATCH)

try:
    if _MISMATCH is not None:
        raise ImportError(_MISMATCH)
    from . import _C  # noqa: F401  (registers torch.ops.opensora_fast.*)

    HAS_NATIVE = True
    _IMPORT_ERROR: str | None = None
except ImportError as e:  # pure-Python install, or a build for another torch
    import importlib.util

    _C = None
    HAS_NATIVE = False
    if _MISMATCH is not None:
        _IMPORT_ERROR = _MISMATCH
    elif importlib.util.find_spec(f"{__package__}._C") is None:
        _IMPORT_ERROR = "opensora_fast._C is not built (OPENSORA_FAST_NO_EXT=1 install, or no compiler)"
    else:
        _IMPORT_ERROR = f"opensora_fast._C failed to load (built for another torch?): {e}"


_FORCE_SMALL_TABLES = "OPENSORA_FAST_FORCE_SMALL_TABLES"


def _env_flag(name: str) -> bool:
    """A 0/1 switch from the environment (unset or empty: off)."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 0 or 1 (or true/false, yes/no, on/off); got {raw!r}")


# For tests (benchmarks/gpu_check.sh runs the CUDA tests once more with it): every
# CUDA launch uses the small 4 KiB launch tables, as with a CUDA before 12.1.
if _env_flag(_FORCE_SMALL_TABLES) and HAS_NATIVE:
    torch.ops.opensora_fast._force_small_tables(True)


def registered_ops() -> list[str]:
    """The public ops the extension registered, read from the dispatcher
    (private ``_*`` test ops left out)."""
    if not HAS_NATIVE:
        return []
    names = (n for n in torch._C._dispatch_get_all_op_names() if n.startswith("opensora_fast::"))
    return sorted(n for n in names if not n.split("::", 1)[1].startswith("_"))


def build_info() -> dict[str, Any]:
    """What was built: version, torch, native, cuda_kernels, cuda_archs (and of
    them cuda_sass, cuda_ptx), ops, ..."""
    info: dict[str, Any] = {
        "version": __version__,
        "torch_runtime": torch.__version__,
        "native": HAS_NATIVE,
        "cuda_kernels": False,
        "cuda_archs": "",
        "cuda_sass": "",
        "cuda_ptx": "",
        "cuda": None,
        "torch": None,
        "ops": [],
        "backend": backend_setting(),
    }
    if HAS_NATIVE:
        info.update(_C.build_info())
        info["ops"] = registered_ops()
        info.update(_arch_code(info["cuda_archs"]))
    else:
        info["import_error"] = _IMPORT_ERROR
    info["cuda_available"] = torch.cuda.is_available()
    return info


def _arch_code(archs: str) -> dict[str, str]:
    """Which archs of the build carry SASS (machine code) and which PTX, as
    setup.py recorded them in _build_meta.py for the arch list ``archs``; "" for
    none, "?" when the record is missing or is of another build."""
    if not archs:
        return {"cuda_sass": "", "cuda_ptx": ""}
    try:
        from . import _build_meta
    except ImportError:
        _build_meta = None
    recorded = getattr(_build_meta, "CUDA_ARCHS", None)
    sass, ptx = getattr(_build_meta, "CUDA_SASS", None), getattr(_build_meta, "CUDA_PTX", None)

    def norm(a: Any) -> str:  # _C holds the list with separators rewritten (setup.py _sanitize)
        return ";".join(re.split(r"[^A-Za-z0-9.+]+", str(a).strip()))

    if recorded is None or norm(recorded) != norm(archs) or sass is None or ptx is None:
        return {"cuda_sass": "?", "cuda_ptx": "?"}
    return {"cuda_sass": sass, "cuda_ptx": ptx}


_setting: tuple = (object(), "auto")  # (raw environment value, its parsed setting)


def backend_setting() -> str:
    return _parse_setting(os.environ.get("OPENSORA_FAST_BACKEND"))


def _parse_setting(raw: str | None) -> str:
    global _setting
    if raw == _setting[0]:
        return _setting[1]  # read at every op call: parsed once per distinct value
    value = (raw or "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"OPENSORA_FAST_BACKEND must be one of {', '.join(_BACKENDS)}; got {value!r}")
    _setting = (raw, value)
    return value


_told: set[tuple[str, str, str]] = set()


def _say_once(op: str, device: str, reason: str) -> None:
    key = (op, device, reason)
    if key not in _told:
        _told.add(key)
        logger.warning("opensora_fast.%s on %s: using the PyTorch reference (%s)", op, device, reason)


_kernels: dict[tuple[str, str], bool] = {}


def _has_kernel(op: str, device_type: str) -> bool:
    # Cached: the dispatcher query costs microseconds per op call, and _C registers
    # every kernel once, at import.
    known = _kernels.get((op, device_type))
    if known is None:
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
        known = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"opensora_fast::{op}", key)
        _kernels[(op, device_type)] = known
    return known


def use_native(op: str, device: torch.device) -> bool:
    """True when ``op`` should run its native kernel for tensors on ``device``."""
    return _decide(op, device.type, backend_setting())


def _decide(op: str, device_type: str, setting: str) -> bool:
    if setting == "reference":
        _say_once(op, device_type, "OPENSORA_FAST_BACKEND=reference")
        return False
    if not HAS_NATIVE:
        why = _IMPORT_ERROR
    elif not _has_kernel(op, device_type):
        why = f"the extension has no {device_type} kernel for it"
    else:
        return True
    if setting == "native":
        raise RuntimeError(
            f"OPENSORA_FAST_BACKEND=native but opensora_fast.{op} cannot run natively on {device_type}: {why}"
        )
    _say_once(op, device_type, why)
    return False


def _traced_choice(op: str, device_type: str, raw: str | None) -> tuple:
    """use_native's answer at trace time, as (native, error type, message):
    dynamo runs this once per trace and keeps the answer as a constant (it
    cannot trace the dispatcher query), so an error comes back as data."""
    try:
        return _decide(op, device_type, _parse_setting(raw)), None, None
    except (ValueError, RuntimeError) as e:
        return False, "ValueError" if isinstance(e, ValueError) else "RuntimeError", str(e)


# What torch.compiler.assume_constant_result does, without its import of
# torch._dynamo (seconds, and optional dependencies such as tqdm) when the package
# loads; tests/test_ema.py checks that the decorator still sets this mark.
_traced_choice._dynamo_marked_constant = True  # type: ignore[attr-defined]


def pick(op: str, device: torch.device, reference_impl):
    """The callable to run for ``op`` on ``device``: ``torch.ops.opensora_fast.<op>``
    or ``reference_impl``. Under torch.compile the same rules decide at trace
    time; the environment read stays in the traced code, so dynamo guards on
    OPENSORA_FAST_BACKEND and a changed setting retraces."""
    if torch.compiler.is_compiling():
        native, error, message = _traced_choice(op, device.type, os.environ.get("OPENSORA_FAST_BACKEND"))
        if error is not None:
            raise (ValueError if error == "ValueError" else RuntimeError)(message)
    else:
        native = use_native(op, device)
    return getattr(torch.ops.opensora_fast, op) if native else reference_impl
