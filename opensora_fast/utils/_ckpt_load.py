"""Loading checkpoints: safe ``torch.load`` (``weights_only``), safetensors
with errors that name the file, ``load_checkpoint`` and its helpers, and the
parts of a ``CheckpointIO`` directory a load reads."""

from __future__ import annotations

import os
import pickle
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ._ckpt_shard import load_master_weights
from .logger import log_message


def torch_load(path: str, map_location="cpu", weights_only: bool = True):
    """``torch.load``; a file refused by ``weights_only`` is an UnpicklingError naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if not weights_only:
            raise
        raise pickle.UnpicklingError(
            f"{path}: refused by weights_only loading (it holds objects other than tensors and plain "
            f"containers, which unpickling would run as code). Pass weights_only=False only for a file you "
            f"trust. Detail: {str(e).splitlines()[0]}"
        ) from e


def load_safetensors(path: str, device: str = "cpu") -> Dict[str, torch.Tensor]:
    """A safetensors file's tensors; a damaged file is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupted?): {e}") from e


def needs_colossalai(what: str) -> None:
    try:
        import colossalai  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{what} needs colossalai: pip install opensora_fast[colossalai]") from e


def search_valid_path(path: str) -> str:
    if os.path.exists(f"{path}.safetensors"):
        return f"{path}.safetensors"
    if os.path.exists(f"{path}.pt"):
        return f"{path}.pt"
    return path


def load_from_hf_hub(repo_path: str, cache_dir: str = None) -> str:
    """Download (or find in the cache) ``org/repo/file`` from the Hugging Face
    Hub; returns the local path. Honours HF_HUB_OFFLINE and HF_ENDPOINT."""
    from huggingface_hub import hf_hub_download

    repo_id, _, repo_file = repo_path.rpartition("/")
    if not repo_id or "/" not in repo_id:
        raise ValueError(f"load_from_hf_hub: expected 'org/repo/file', got {repo_path!r}")
    return hf_hub_download(repo_id=repo_id, filename=repo_file, cache_dir=cache_dir)


def load_from_sharded_state_dict(model: nn.Module, ckpt_path: str, model_name: str = "model", strict=False):
    """Load a ColossalAI sharded checkpoint directory (needs colossalai)."""
    needs_colossalai("load_from_sharded_state_dict")
    from colossalai.checkpoint_io import GeneralCheckpointIO

    GeneralCheckpointIO().load_model(model, os.path.join(ckpt_path, model_name), strict=strict)


def print_load_warning(missing: list, unexpected: list) -> None:
    """Log the missing and unexpected keys of a load_state_dict."""
    if len(missing) > 0 and len(unexpected) > 0:
        log_message(f"Got {len(missing)} missing keys:\n\t" + "\n\t".join(missing))
        log_message("\n" + "-" * 79 + "\n")
        log_message(f"Got {len(unexpected)} unexpected keys:\n\t" + "\n\t".join(unexpected))
    elif len(missing) > 0:
        log_message(f"Got {len(missing)} missing keys:\n\t" + "\n\t".join(missing))
    elif len(unexpected) > 0:
        log_message(f"Got {len(unexpected)} unexpected keys:\n\t" + "\n\t".join(unexpected))
    else:
        log_message("Model loaded successfully")


def rename(ckpt: dict, rename_keys: Optional[dict]) -> dict:
    """Upstream's rule: the first old key of ``rename_keys`` found anywhere in
    a checkpoint key (not only at its start) is replaced, every occurrence."""
    if rename_keys is None:
        return ckpt
    out = {}
    for old_key, v in ckpt.items():
        new_key = old_key
        for old_prefix, new_prefix in rename_keys.items():
            if old_prefix in old_key:
                new_key = old_key.replace(old_prefix, new_prefix)
                log_message(f"Renamed {old_key} to {new_key} in the loaded state_dict")
                break
        out[new_key] = v
    return out


def load_checkpoint(
    model: nn.Module,
    path: str,
    cache_dir: str = None,
    device_map: torch.device | str = "cpu",
    cai_model_name: str = "model",
    strict: bool = False,
    rename_keys: dict = None,
    *,
    weights_only: bool = True,
) -> nn.Module:
    """Load a checkpoint into ``model``: a ``.safetensors`` file, a ``.pt``/``.pth``
    file (``weights_only=True`` by default: a pickle that would run code is
    refused; pass ``weights_only=False`` only for a trusted legacy file), a
    ColossalAI sharded directory (needs colossalai), or, when ``path`` does not
    exist locally, ``org/repo/file`` on the Hugging Face Hub. ``rename_keys``
    maps old key substrings to new ones (both file formats)."""
    if not os.path.exists(path):
        log_message(f"Checkpoint not found at {path}, trying to download from Hugging Face Hub")
        path = load_from_hf_hub(path, cache_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_checkpoint: could not find checkpoint at {path}")
    log_message(f"Loading checkpoint from {path}")
    if path.endswith(".safetensors"):
        ckpt = rename(load_safetensors(path), rename_keys)
        missing, unexpected = model.load_state_dict(ckpt, strict=strict)
        print_load_warning(missing, unexpected)
    elif path.endswith(".pt") or path.endswith(".pth"):
        ckpt = rename(torch_load(path, map_location=device_map, weights_only=weights_only), rename_keys)
        missing, unexpected = model.load_state_dict(ckpt, strict=strict)
        print_load_warning(missing, unexpected)
    else:
        if not os.path.isdir(path):
            raise ValueError(
                f"load_checkpoint: invalid checkpoint path {path} (not .safetensors, .pt, .pth or a directory)"
            )
        load_from_sharded_state_dict(model, path, model_name=cai_model_name, strict=strict)
    return model


def parts_read(model, ema, optimizer, lr_scheduler, sampler, include_master_weights) -> List[str]:
    """The checkpoint files (or folders) a load with these arguments reads."""
    parts: List[str] = []
    if model is not None:
        parts += ["model.safetensors", "model.pt", "model"]
    if ema is not None:
        parts += ["ema.safetensors", "ema.pt"]
    if optimizer is not None:
        parts += ["optimizer.pt", "optimizer"] + (["master.safetensors"] if include_master_weights else [])
    if lr_scheduler is not None:
        parts += ["lr_scheduler.pt", "lr_scheduler"]
    if sampler is not None:
        parts.append("sampler")
    return parts


def _load_model(booster, load_dir: str, model: nn.Module, strict: bool) -> None:
    plain = os.path.join(load_dir, "model.safetensors")
    if booster is None or os.path.isfile(plain):
        if not os.path.isfile(plain):
            needs_colossalai(f"loading the sharded model in {load_dir}")
        missing, unexpected = model.load_state_dict(load_safetensors(plain), strict=strict)
        print_load_warning(missing, unexpected)
    else:
        booster.load_model(
            model,
            search_valid_path(os.path.join(load_dir, "model")),
            strict=strict,
            low_cpu_mem_mode=False,
            num_threads=32,
        )


def _load_optimizer(booster, load_dir: str, model, optimizer, include_master_weights: bool) -> None:
    plain = os.path.join(load_dir, "optimizer.pt")
    if booster is None or os.path.isfile(plain):
        if not os.path.isfile(plain):
            needs_colossalai(f"loading the sharded optimizer in {load_dir}")
        optimizer.load_state_dict(torch_load(plain))
    else:
        booster.load_optimizer(optimizer, os.path.join(load_dir, "optimizer"), low_cpu_mem_mode=False, num_threads=32)
    if include_master_weights:
        master = load_safetensors(os.path.join(load_dir, "master.safetensors"))
        load_master_weights(model, optimizer, master)


def load_parts(booster, load_dir, model, ema, optimizer, lr_scheduler, sampler, strict, include_master_weights):
    """CheckpointIO.load's reading, part by part (plain files, or the Booster's)."""
    if model is not None:
        _load_model(booster, load_dir, model, strict)
    if ema is not None:
        st = os.path.join(load_dir, "ema.safetensors")
        if os.path.exists(st):
            ema_state_dict = load_safetensors(st)
        else:
            ema_state_dict = torch_load(os.path.join(load_dir, "ema.pt"))
        ema.load_state_dict(ema_state_dict, strict=strict, assign=True)
    if optimizer is not None:
        _load_optimizer(booster, load_dir, model, optimizer, include_master_weights)
    if lr_scheduler is not None:
        plain = os.path.join(load_dir, "lr_scheduler.pt")
        if booster is None or os.path.isfile(plain):
            lr_scheduler.load_state_dict(torch_load(plain))
        else:
            booster.load_lr_scheduler(lr_scheduler, os.path.join(load_dir, "lr_scheduler"))
    if sampler is not None:
        sampler.load_state_dict(torch_load(os.path.join(load_dir, "sampler")))
