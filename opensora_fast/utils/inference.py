"""Drop-in for ``opensora.utils.inference``: prompt files, save paths, sample saving, prompt text helpers.

(The conditioning helpers ``prepare_inference_condition``, ``collect_references_batch``
and ``add_noise_to_ref``, on the native op ``condition``, are written in
:mod:`._condition` and re-exported here, where upstream keeps them.)

Differences from upstream, on purpose:

- ``create_tmp_csv`` writes through the ``csv`` module, so a prompt holding ``"``,
  ``,`` or a newline round-trips (upstream writes ``"{prompt}"`` verbatim and
  breaks the file); for other prompts the bytes are upstream's.
- ``add_motion_score_to_text(text, "dynamic")`` takes a ``scorer`` (prompts ->
  motion-score strings). Without one it uses :func:`~opensora_fast.utils.prompt_refine.refine_prompts`
  only when an OpenAI client is configured, and otherwise raises RuntimeError
  (upstream silently appends the unrefined prompt when the API call fails).
- ``get_save_path_name`` treats ``num_sample_pos=None`` as 0 and raises a clear
  ValueError when neither ``name`` nor ``index`` is given (upstream: TypeError).
"""

from __future__ import annotations

import copy
import csv
import io
import os
import re
from enum import Enum
from typing import Callable, Sequence

import torch

from ..datasets.aspect import get_image_size
from ..datasets.utils import save_sample
from ._condition import add_noise_to_ref, collect_references_batch, prepare_inference_condition
from .logger import log_message

__all__ = [
    "SamplingMethod",
    "create_tmp_csv",
    "modify_option_to_t2i",
    "get_save_path_name",
    "get_names_from_path",
    "process_and_save",
    "check_fps_added",
    "ensure_sentence_ends_with_period",
    "add_fps_info_to_text",
    "add_motion_score_to_text",
    "prepare_inference_condition",
    "collect_references_batch",
    "add_noise_to_ref",
]


class SamplingMethod(Enum):
    """How to sample: ``I2V`` (Open-Sora video generation) or ``DISTILLED`` (Flux image generation)."""

    I2V = "i2v"
    DISTILLED = "distill"

    @classmethod
    def _missing_(cls, value):
        raise ValueError(f"{value!r} is not a valid SamplingMethod; accepted: {', '.join(repr(m.value) for m in cls)}")


def create_tmp_csv(save_dir: str, prompt: str, ref: str | None = None, create: bool = True) -> str:
    """Write ``{save_dir}/prompt.csv`` with a ``text`` column (and ``ref`` when given); return its path.

    Every field is quoted, and quotes inside a field are doubled, so any prompt
    reads back unchanged with ``csv`` or pandas. With ``create=False`` only the
    path is returned.
    """
    tmp_file = os.path.join(save_dir, "prompt.csv")
    if not create:
        return tmp_file
    header = "text,ref\n" if ref is not None else "text\n"
    row = [prompt, ref] if ref is not None else [prompt]
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n").writerow(row)
    with open(tmp_file, "w", encoding="utf-8", newline="") as f:
        # no final newline, like upstream (a newline inside a field is quoted, so this is safe)
        f.write(header + buf.getvalue()[:-1])
    return tmp_file


def modify_option_to_t2i(sampling_option, distilled: bool = False, img_resolution: str = "1080px"):
    """A shallow copy of ``sampling_option`` for the text-to-image stage of t2i2v:
    one frame at ``img_resolution`` (same aspect ratio), guidance 4.0,
    ``resized_resolution`` = the original resolution; method DISTILLED when ``distilled``."""
    opt = copy.copy(sampling_option)
    if distilled:
        opt.method = SamplingMethod.DISTILLED
    opt.num_frames = 1
    opt.height, opt.width = get_image_size(img_resolution, sampling_option.aspect_ratio)
    opt.guidance = 4.0
    opt.resized_resolution = sampling_option.resolution
    return opt


def get_save_path_name(
    save_dir: str,
    sub_dir: str,
    save_prefix: str = "",
    name: str | None = None,
    fallback_name: str | None = None,
    index: int | None = None,
    num_sample_pos: int | None = None,
    prompt_as_path: bool = False,
    prompt: str | None = None,
) -> str:
    """``{save_dir}/{sub_dir}/{fname}`` (no extension).

    ``prompt_as_path``: fname = ``{prompt stripped of leading/trailing '.'}-{num_sample_pos}``.
    Else fname = ``{save_prefix}{name}`` or ``{save_prefix}{fallback_name}_{index:04d}``,
    plus ``_{num_sample_pos}`` when it is > 0.
    """
    if prompt_as_path:
        fname = f"{prompt.strip('.')}-{num_sample_pos}"
    else:
        if name is not None:
            fname = save_prefix + name
        else:
            if index is None or fallback_name is None:
                raise ValueError(
                    "get_save_path_name: without a name, both fallback_name and index are needed "
                    f"(got fallback_name={fallback_name!r}, index={index!r})"
                )
            fname = f"{save_prefix + fallback_name}_{index:04d}"
        if num_sample_pos is not None and num_sample_pos > 0:
            fname += f"_{num_sample_pos}"
    return os.path.join(save_dir, sub_dir, fname)


def get_names_from_path(path: str) -> str:
    """The file name of ``path`` without directory and extension."""
    return os.path.splitext(os.path.basename(path))[0]


def _cfg_get(cfg, key, default=None):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def process_and_save(
    x: torch.Tensor,
    batch: dict,
    cfg: dict,
    sub_dir: str,
    generate_sampling_option,
    epoch: int,
    start_index: int,
    saving: bool = True,
) -> list[str]:
    """Save each generated sample of ``x`` (``[B, C, T, H, W]``) and its prompt (``.txt``); return their names.

    Paths come from :func:`get_save_path_name` with ``cfg.save_dir``, ``cfg.save_prefix``,
    ``cfg.prompt_as_path``, the batch's ``name``/``index`` (index offset by ``start_index``)
    and ``epoch`` as the sample position; fps is ``cfg.fps_save`` (16). With
    ``cfg.use_t2i2v`` an image whose resolution differs from ``resized_resolution``
    is rescaled after saving.
    """
    prompt_as_path = _cfg_get(cfg, "prompt_as_path", False)
    fps_save = _cfg_get(cfg, "fps_save", 16)
    save_dir = cfg.save_dir if hasattr(cfg, "save_dir") else cfg["save_dir"]
    names = batch["name"] if "name" in batch else [None] * len(x)
    indices = batch["index"] if "index" in batch else [None] * len(x)
    if "index" in batch:
        indices = [i + start_index for i in indices]
    prompts = batch["text"]

    fallback_name = None
    if not prompt_as_path and any(n is None for n in names):
        fallback_name = cfg["dataset"]["data_path"].split("/")[-1].split(".")[0]

    ret_names = []
    is_image = generate_sampling_option.num_frames == 1
    for img, name, index, prompt in zip(x, names, indices, prompts):
        save_path = get_save_path_name(
            save_dir,
            sub_dir,
            save_prefix=_cfg_get(cfg, "save_prefix", ""),
            name=name,
            fallback_name=fallback_name,
            index=index,
            num_sample_pos=epoch,
            prompt_as_path=prompt_as_path,
            prompt=prompt,
        )
        ret_names.append(get_names_from_path(save_path))
        if not saving:
            continue
        with open(save_path + ".txt", "w", encoding="utf-8") as f:
            f.write(prompt)
        save_sample(img, save_path=save_path, fps=fps_save)
        opt = generate_sampling_option
        if _cfg_get(cfg, "use_t2i2v", False) and is_image and opt.resolution != opt.resized_resolution:
            log_message("Rescaling image to %s...", opt.resized_resolution)
            height, width = get_image_size(opt.resized_resolution, opt.aspect_ratio)
            from ..datasets import utils as _dutils

            rescale = getattr(_dutils, "rescale_image_by_path", None)
            if rescale is None:
                raise ImportError(
                    "process_and_save(use_t2i2v): opensora_fast.datasets.utils.rescale_image_by_path is missing"
                )
            rescale(save_path + ".png", width, height)
    return ret_names


_FPS_SUFFIX = re.compile(r"\d+ FPS\.$")


def check_fps_added(sentence: str) -> bool:
    """True when ``sentence`` ends with ``"<digits> FPS."``."""
    return _FPS_SUFFIX.search(sentence) is not None


def ensure_sentence_ends_with_period(sentence: str) -> str:
    """Strip surrounding whitespace and append ``"."`` unless it already ends with one."""
    sentence = sentence.strip()
    return sentence if sentence.endswith(".") else sentence + "."


def add_fps_info_to_text(text: list[str], fps: int = 16) -> list[str]:
    """End each prompt with a period, then ``" {fps} FPS."`` unless an FPS suffix is already there."""
    out = []
    for item in text:
        item = ensure_sentence_ends_with_period(item)
        if not check_fps_added(item):
            item = item + f" {fps} FPS."
        out.append(item)
    return out


def add_motion_score_to_text(
    text: Sequence[str],
    motion_score: int | str,
    scorer: Callable[[list[str]], list[str]] | None = None,
) -> list[str]:
    """Append ``" {motion_score} motion score."`` to each prompt.

    ``motion_score="dynamic"`` asks ``scorer(prompts)`` for one string per prompt
    (e.g. ``"4 motion score"``) and appends ``" {score}."``. Without a scorer,
    an OpenAI client (``pip install opensora_fast[refine]`` and ``OPENAI_API_KEY``)
    is used through ``refine_prompts(type="motion_score")``; with neither, RuntimeError.
    """
    text = list(text)
    if motion_score == "dynamic":
        if scorer is None:
            from .prompt_refine import default_client, refine_prompts

            client = default_client()
            if client is None:
                raise RuntimeError(
                    "add_motion_score_to_text(motion_score='dynamic') needs a scorer: pass "
                    "scorer=callable(prompts) -> scores, or install the OpenAI client "
                    "(pip install opensora_fast[refine]) and set OPENAI_API_KEY"
                )
            scores = refine_prompts(text, type="motion_score", client=client)
        else:
            scores = list(scorer(text))
        if len(scores) != len(text):
            raise ValueError(
                f"add_motion_score_to_text: the scorer returned {len(scores)} scores for {len(text)} prompts"
            )
        return [f"{t} {scores[i]}." for i, t in enumerate(text)]
    return [f"{t} {motion_score} motion score." for t in text]
