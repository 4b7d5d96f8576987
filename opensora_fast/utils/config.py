"""Drop-in for ``opensora.utils.config``: Python config files, command-line overrides, workspaces.

``read_config`` uses mmengine's ``Config.fromfile`` when mmengine is installed,
else :class:`Config`, a small loader of the same Python files: module-level
names (not ``__dunder__``, modules, functions or classes) become keys, dicts
become attribute-accessible :class:`ConfigDict`, and ``_base_`` (a path or a
list of paths, relative to the file) is inherited the mmengine way — bases may
not share keys, the child's dicts merge recursively into the base's unless they
hold ``_delete_=True``, everything else replaces.

Differences from upstream, on purpose:

- ``merge_args`` also converts when the current value is None (upstream calls
  ``NoneType(v)`` and crashes): the string is parsed with :func:`auto_convert`.
  A list/tuple/dict value is replaced by the parsed literal (upstream:
  ``list("[1,2]")``, a list of characters). A missing intermediate key of a
  dotted override raises ``KeyError`` naming it and listing the keys that exist
  at that level (upstream asserts against the root config).
- An odd number of override tokens or a token without ``--`` raises ValueError
  (upstream: ``assert``, or silently drops the last token).
- ``parse_alias`` raises a clear KeyError when an alias needs a section the
  config lacks (``sampling_option`` / ``model``).
- ``sync_string`` broadcasts on the CPU under a gloo group (upstream always uses
  CUDA) and refuses strings longer than its 256-byte buffer.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import types
from datetime import datetime
from typing import Any

import torch

from .logger import is_distributed, is_main_process

__all__ = [
    "Config",
    "ConfigDict",
    "parse_args",
    "read_config",
    "parse_configs",
    "merge_args",
    "auto_convert",
    "sync_string",
    "create_experiment_workspace",
    "config_to_name",
    "parse_alias",
]

_BASE_KEY = "_base_"
_DELETE_KEY = "_delete_"


class ConfigDict(dict):
    """A dict whose keys are also attributes; nested dicts are converted on assignment."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    @staticmethod
    def _wrap(value):
        if isinstance(value, dict) and not isinstance(value, ConfigDict):
            return ConfigDict(value)
        if isinstance(value, list):
            return [ConfigDict._wrap(v) for v in value]
        if isinstance(value, tuple):
            return tuple(ConfigDict._wrap(v) for v in value)
        return value

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, self._wrap(value))

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"{type(self).__name__} has no key {name!r}; keys: {', '.join(map(str, self.keys())) or '(none)'}"
            ) from None

    def __setattr__(self, name: str, value) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    def update(self, *args, **kwargs) -> None:  # keep conversion
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def __deepcopy__(self, memo):
        return type(self)({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def __reduce__(self):
        return (type(self), (dict(self),))

    def to_dict(self) -> dict:
        """A plain nested ``dict`` / ``list`` copy."""
        return _plain(self)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


class Config(ConfigDict):
    """A loaded config: a :class:`ConfigDict` plus ``filename`` (also ``_filename``, as mmengine)."""

    def __init__(self, cfg_dict: dict | None = None, filename: str | None = None):
        super().__init__(cfg_dict or {})
        object.__setattr__(self, "_filename", filename)

    @property
    def filename(self) -> str | None:
        return self._filename

    def __getattr__(self, name: str):
        if name == "_filename":
            return object.__getattribute__(self, "_filename")
        return super().__getattr__(name)

    def __deepcopy__(self, memo):
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()}, self._filename)

    def __reduce__(self):
        return (Config, (dict(self), self._filename))

    @staticmethod
    def fromfile(filename: str) -> "Config":
        """Load a Python config file with ``_base_`` inheritance; ``filename`` is kept as given."""
        filename = os.fspath(filename)
        return Config(_file_to_dict(os.path.abspath(os.path.expanduser(filename)), ()), filename=filename)


def _file_to_dict(filename: str, chain: tuple[str, ...]) -> dict:
    if not os.path.isfile(filename):
        raise FileNotFoundError(f"config file {filename!r} not found")
    if not filename.endswith(".py"):
        raise ValueError(f"config file {filename!r}: only Python (.py) config files are supported without mmengine")
    real = os.path.realpath(filename)
    if real in chain:
        raise ValueError(f"config file {filename!r}: circular _base_ inheritance ({' -> '.join(chain + (real,))})")
    with open(filename, encoding="utf-8") as f:
        source = f.read()
    namespace: dict[str, Any] = {"__file__": filename, "__name__": "__opensora_fast_config__"}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - config files are code, as with mmengine
    cfg = {
        k: v
        for k, v in namespace.items()
        if not k.startswith("__") and not isinstance(v, (types.ModuleType, types.FunctionType, type))
    }
    if _BASE_KEY not in cfg:
        return cfg
    bases = cfg.pop(_BASE_KEY)
    bases = bases if isinstance(bases, (list, tuple)) else [bases]
    here = os.path.dirname(filename)
    merged: dict = {}
    for base in bases:
        base_dict = _file_to_dict(os.path.join(here, base), chain + (real,))
        dup = merged.keys() & base_dict.keys()
        if dup:
            raise KeyError(f"Duplicate key is not allowed among bases: {sorted(dup)} (in the bases of {filename!r})")
        merged.update(base_dict)
    return _merge_a_into_b(cfg, merged)


def _strip_delete(value):
    if isinstance(value, dict):
        return {k: _strip_delete(v) for k, v in value.items() if k != _DELETE_KEY}
    return value


def _merge_a_into_b(a: dict, b: dict) -> dict:
    """Merge child ``a`` into base ``b`` (new dict): dicts merge recursively unless ``_delete_``."""
    b = dict(b)
    for k, v in a.items():
        if isinstance(v, dict) and k in b and not v.get(_DELETE_KEY, False):
            if not isinstance(b[k], dict):
                raise TypeError(
                    f"{k}={v} in child config cannot inherit from base because {k} is a dict in the child config "
                    f"but is of type {type(b[k]).__name__} in base config. You may set `{_DELETE_KEY}=True` to "
                    "ignore the base config."
                )
            b[k] = _merge_a_into_b({kk: vv for kk, vv in v.items() if kk != _DELETE_KEY}, b[k])
        else:
            b[k] = _strip_delete(v)
    return b


def parse_args() -> tuple[str, list[str]]:
    """The config path (first positional argument) and the remaining ``--key value`` tokens."""
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=str, help="model config file path")
    args, unknown_args = parser.parse_known_args()
    return args.config, unknown_args


def read_config(config_path: str):
    """Load a Python config file: mmengine's ``Config.fromfile`` when installed, else :meth:`Config.fromfile`."""
    try:
        from mmengine.config import Config as MMConfig
    except ImportError:
        return Config.fromfile(config_path)
    return MMConfig.fromfile(config_path)


def parse_configs():
    """``parse_args`` + ``read_config`` + ``merge_args``; sets ``cfg.config_path`` and
    ``AE_SPATIAL_COMPRESSION`` (from ``cfg.ae_spatial_compression``) as upstream."""
    config, args = parse_args()
    cfg = read_config(config)
    cfg = merge_args(cfg, args)
    cfg.config_path = config
    if cfg.get("ae_spatial_compression", None) is not None:
        os.environ["AE_SPATIAL_COMPRESSION"] = str(cfg.ae_spatial_compression)
    return cfg


def _key_list(d) -> str:
    return ", ".join(map(str, d.keys())) or "(none)"


def merge_args(cfg, args: list[str]):
    """Apply ``--a.b-c value`` override pairs to ``cfg`` in place and return it.

    ``-`` in keys becomes ``_``; dots walk nested dicts. ``"none"`` (any case) sets
    None. For a top-level key that exists, the string is cast to the current
    value's type (bool: :func:`auto_convert`); a nested key, a new key, or one
    whose current value is None, is parsed with :func:`auto_convert` — as upstream,
    except that upstream crashes on a None value and casts a list/tuple/dict
    value with ``list("[1, 2]")`` (characters); ours parses those with
    :func:`auto_convert`.
    """
    args = list(args)
    if len(args) % 2:
        raise ValueError(f"merge_args: overrides come in '--key value' pairs; {args[-1]!r} has no value")
    for k, v in zip(args[::2], args[1::2]):
        if not isinstance(k, str) or not k.startswith("--"):
            raise ValueError(f"Invalid argument: {k!r} (expected '--key value')")
        k = k[2:].replace("-", "_")
        parts = k.split(".")
        target = cfg
        for i, key in enumerate(parts[:-1]):
            if not isinstance(target, dict) or key not in target:
                where = ".".join(parts[:i]) or "the config"
                keys = _key_list(target) if isinstance(target, dict) else f"(a {type(target).__name__})"
                raise KeyError(f"Key {key!r} of --{k} not found in {where}; keys: {keys}")
            target = target[key]
        last = parts[-1]
        if v.lower() == "none":
            value = None
        elif len(parts) == 1 and last in target and target[last] is not None:
            current = target[last]
            if isinstance(current, (bool, list, tuple, dict)):
                value = auto_convert(v)
            else:
                value = type(current)(v)
        else:
            value = auto_convert(v)
        target[last] = value
    return cfg


def auto_convert(value: str) -> int | float | bool | list | dict | None | str:
    """Parse a command-line string: "" stays, none/true/false (any case), int, float,
    a Python literal (list, dict, tuple, quoted string), else the string itself."""
    if value == "":
        return value
    low = value.lower()
    if low == "none":
        return None
    if low == "true":
        return True
    if low == "false":
        return False
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    return value


_SYNC_LEN = 256


def sync_string(value: str) -> str:
    """Rank 0's ``value`` on every rank (unchanged when not distributed); at most 256 UTF-8 bytes."""
    if not is_distributed():
        return value
    data = value.encode("utf-8")
    if len(data) > _SYNC_LEN:
        raise ValueError(f"sync_string: {len(data)} bytes do not fit the {_SYNC_LEN}-byte buffer: {value[:40]!r}...")
    device = "cpu" if torch.distributed.get_backend() == "gloo" else "cuda"
    buf = torch.zeros(_SYNC_LEN, dtype=torch.uint8, device=device)
    if data:
        buf[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    torch.distributed.broadcast(buf, 0)
    return bytes(buf.cpu().tolist()).decode("utf-8").rstrip("\x00")


def create_experiment_workspace(
    output_dir: str, model_name: str | None = None, config: dict | None = None, exp_name: str | None = None
) -> tuple[str, str]:
    """Create ``{output_dir}/{exp_name}`` (main process) with ``config.txt`` (the config as JSON).

    Without ``exp_name`` the name is ``"%y%m%d_%H%M%S"`` (rank 0's clock) plus
    ``-{model_name}`` with ``/`` replaced by ``-``. Returns ``(exp_name, exp_dir)``.
    """
    if exp_name is None:
        stamp = sync_string(datetime.now().strftime("%y%m%d_%H%M%S"))
        suffix = "-" + model_name.replace("/", "-") if model_name is not None else ""
        exp_name = f"{stamp}{suffix}"
    exp_dir = f"{output_dir}/{exp_name}"
    if is_main_process():
        os.makedirs(exp_dir, exist_ok=True)
        with open(f"{exp_dir}/config.txt", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=4)
    return exp_name, exp_dir


def config_to_name(cfg) -> str:
    """``configs/diffusion/train/stage1.py`` -> ``diffusion_train_stage1`` (from ``cfg._filename``).

    As upstream, every ``configs/`` and ``.py`` in the path is removed, then ``/`` becomes ``_``.
    """
    filename = cfg._filename
    if filename is None:
        raise ValueError("config_to_name: the config has no file name (_filename is None)")
    return filename.replace("configs/", "").replace(".py", "").replace("/", "_")


_ALIASES = {
    # top-level key: (section, key in section, conversion)
    "resolution": ("sampling_option", "resolution", None),
    "guidance": ("sampling_option", "guidance", float),
    "guidance_img": ("sampling_option", "guidance_img", float),
    "num_steps": ("sampling_option", "num_steps", int),
    "num_frames": ("sampling_option", "num_frames", int),
    "aspect_ratio": ("sampling_option", "aspect_ratio", None),
    "ckpt_path": ("model", "from_pretrained", None),
}


def parse_alias(cfg):
    """Copy the short top-level aliases into their sections, in place:
    resolution, guidance (float), guidance_img (float), num_steps (int), num_frames (int),
    aspect_ratio -> ``sampling_option.*``; ckpt_path -> ``model.from_pretrained``. None values are ignored."""
    for alias, (section, key, conv) in _ALIASES.items():
        value = cfg.get(alias, None)
        if value is None:
            continue
        if section not in cfg:
            raise KeyError(
                f"parse_alias: {alias}={value!r} sets {section}.{key}, but the config has no {section!r} section; "
                f"keys: {_key_list(cfg)}"
            )
        cfg[section][key] = conv(value) if conv is not None else value
    return cfg
