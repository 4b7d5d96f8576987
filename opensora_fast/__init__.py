"""opensora_fast: an accelerated drop-in for Open-Sora's utility layer.

Swap ``from opensora.utils.train import update_ema`` for
``from opensora_fast.utils.train import update_ema`` or call
:func:`patch_opensora` once, before the training script imports from
``opensora.utils``.
"""

from __future__ import annotations

import importlib
import sys
import types

from ._ext import HAS_NATIVE, build_info
from ._version import __version__

# upstream module -> (our module, names). The accelerated functions: what
# patch_opensora() replaces by default. Add a row (or a name) as more of
# opensora/utils gets a kernel.
_DROP_INS: dict[str, tuple[str, list[str]]] = {
    "opensora.utils.train": (
        "opensora_fast.utils.train",
        ["update_ema", "get_batch_loss", "prepare_visual_condition_causal", "prepare_visual_condition_uncausal"],
    ),
    "opensora.utils.inference": (
        "opensora_fast.utils.inference",
        ["prepare_inference_condition", "collect_references_batch", "add_noise_to_ref"],
    ),
    # the bucketed gathers (unpad kernel), and model_sharding, whose side-by-side
    # shards let a bucket be sent without packing. Upstream's CheckpointIO.save
    # calls the gathers through its module, so patching them speeds it up too.
    # (upstream's ckpt imports only with colossalai and tensornvme's GitHub build;
    # where it does not import, the row is skipped)
    "opensora.utils.ckpt": (
        "opensora_fast.utils.ckpt",
        ["model_sharding", "model_gathering", "master_weights_gathering"],
    ),
}

# Plain-Python ports with upstream's names (functions only: replacing classes would
# break isinstance checks on objects already created). Patched with ports=True;
# they bring the fixes listed in each module's docstring (no exit(), no crash on
# None, proper CSV quoting, ...).
_PORTS: dict[str, tuple[str, list[str]]] = {
    "opensora.utils.inference": (
        "opensora_fast.utils.inference",
        [
            "create_tmp_csv",
            "modify_option_to_t2i",
            "get_save_path_name",
            "get_names_from_path",
            "process_and_save",
            "check_fps_added",
            "ensure_sentence_ends_with_period",
            "add_fps_info_to_text",
            "add_motion_score_to_text",
        ],
    ),
    "opensora.utils.train": (
        "opensora_fast.utils.train",
        [
            "set_lr",
            "set_warmup_steps",
            "set_eps",
            "setup_device",
            "create_colossalai_plugin",
            "dropout_condition",
            "warmup_ae",
        ],
    ),
    "opensora.utils.optimizer": ("opensora_fast.utils.optimizer", ["create_optimizer", "create_lr_scheduler"]),
    "opensora.utils.misc": (
        "opensora_fast.utils.misc",
        [
            "create_tensorboard_writer",
            "log_cuda_memory",
            "log_cuda_max_memory",
            "get_model_numel",
            "log_model_params",
            "format_numel_str",
            "format_duration",
            "all_reduce_mean",
            "all_reduce_sum",
            "to_tensor",
            "to_ndarray",
            "to_torch_dtype",
            "is_pipeline_enabled",
            "is_log_process",
            "get_process_mem",
            "get_total_mem",
            "print_mem",
        ],
    ),
    "opensora.utils.logger": (
        "opensora_fast.utils.logger",
        ["is_distributed", "is_main_process", "get_world_size", "create_logger", "log_message"],
    ),
    "opensora.utils.config": (
        "opensora_fast.utils.config",
        [
            "parse_args",
            "read_config",
            "parse_configs",
            "merge_args",
            "auto_convert",
            "sync_string",
            "create_experiment_workspace",
            "config_to_name",
            "parse_alias",
        ],
    ),
    "opensora.utils.sampling": (
        "opensora_fast.utils.sampling",
        [
            "sanitize_sampling_option",
            "get_oscillation_gs",
            "time_shift",
            "get_res_lin_function",
            "get_schedule",
            "get_noise",
            "pack",
            "unpack",
            "prepare",
            "prepare_ids",
        ],
    ),
    "opensora.utils.cai": (
        "opensora_fast.utils.cai",
        ["set_group_size", "init_inference_environment", "get_is_saving_process"],
    ),
    "opensora.utils.prompt_refine": (
        "opensora_fast.utils.prompt_refine",
        ["image_to_url", "refine_prompt", "refine_prompts"],
    ),
    "opensora.utils.ckpt": (
        "opensora_fast.utils.ckpt",
        [
            "remove_padding",
            "record_model_param_shape",
            "load_checkpoint",
            "rm_checkpoints",
            "load_master_weights",
            "save_json",
            "load_json",
            "load_from_hf_hub",
            "print_load_warning",
        ],
    ),
}

# (module, attribute, original, ours) for every replacement made, in order
_patched: list[tuple[types.ModuleType, str, object, object]] = []


def _scanned(modname: str) -> bool:
    return modname == "opensora" or modname.startswith("opensora.") or modname == "__main__"


def patch_opensora(strict: bool = False, ports: bool = False) -> list[str]:
    """Replace functions of an installed Open-Sora with ours, in place.

    For each row of the drop-in table (``ports=True`` adds the plain-Python
    ports) whose ``opensora.utils.<module>`` imports, the attribute on that
    module is replaced, and so is every copy of the original function already
    bound in another loaded ``opensora.*`` module or in ``__main__`` (a
    ``from opensora.utils.train import update_ema`` that ran before the patch).
    Code importing afterwards gets ours. Names the installed module does not
    have are left alone. Calling it again is harmless.

    Returns the replaced locations (``"opensora.utils.train.update_ema"``,
    ``"opensora.scripts_mod.update_ema"``, ...). Modules that cannot be imported
    (Open-Sora absent, or its own dependencies such as colossalai missing) are
    skipped, or raise ImportError when ``strict``. :func:`unpatch_opensora`
    restores the originals.
    """
    tables = [_DROP_INS] + ([_PORTS] if ports else [])
    done: list[str] = []
    for table in tables:
        for upstream, (ours, names) in table.items():
            try:
                target = importlib.import_module(upstream)
            except ImportError:
                if strict:
                    raise
                continue
            mine = importlib.import_module(ours)
            for name in names:
                if not hasattr(target, name):
                    continue
                old, new = getattr(target, name), getattr(mine, name)
                if old is new:
                    continue
                _patched.append((target, name, old, new))
                setattr(target, name, new)
                done.append(f"{upstream}.{name}")
    # every original we have replaced, this call or before -> ours
    swap = {id(old): (old, new) for _m, _a, old, new in _patched}
    if not swap:
        return done
    for modname, mod in list(sys.modules.items()):
        if mod is None or not _scanned(modname):
            continue
        namespace = getattr(mod, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attr, value in list(namespace.items()):
            hit = swap.get(id(value))
            if hit is not None and hit[0] is value:
                _patched.append((mod, attr, value, hit[1]))
                setattr(mod, attr, hit[1])
                done.append(f"{modname}.{attr}")
    return done


def unpatch_opensora() -> list[str]:
    """Undo :func:`patch_opensora`: put every original back where ours still is.

    Returns the restored locations. A location changed again since the patch
    (neither ours nor the original) is left as it is.
    """
    restored = []
    while _patched:
        mod, attr, old, new = _patched.pop()
        if getattr(mod, attr, None) is new:
            setattr(mod, attr, old)
            restored.append(f"{getattr(mod, '__name__', '?')}.{attr}")
    restored.reverse()
    return restored


__all__ = ["__version__", "HAS_NATIVE", "build_info", "patch_opensora", "unpatch_opensora"]
