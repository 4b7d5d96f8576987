"""Drop-in for ``opensora.utils.sampling``: sampling options, timestep schedules, noise,
latent packing, model-input preparation and the denoisers.

Needs only torch and einops. Text encoders and the diffusion model are passed in as
callables (``t5(prompts, added_tokens=, seq_align=)``, ``clip(prompts)``,
``model(img=, timesteps=, guidance=, **inputs)``), so no Open-Sora model code is
imported. ``prepare_models`` is not ported: it builds Open-Sora's own model classes
from its registry (use Open-Sora's, or build the models yourself).
``prepare_api`` is ported with the same flow; its reference handling uses
``collect_references_batch`` / ``prepare_inference_condition`` from
:mod:`opensora_fast.utils.inference` when that module provides them.

Differences from upstream, on purpose:

- ``sanitize_sampling_option`` raises ValueError (naming what is missing) where
  upstream asserts, and an unknown ``method`` string lists the accepted ones.
- ``get_noise`` draws from a generator on ``device`` seeded with ``seed``, as
  upstream; ``seed=None`` draws a fresh random seed instead of failing.
"""

from __future__ import annotations

import math
import os
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor, nn

from ..datasets.aspect import get_image_size
from .inference import SamplingMethod

__all__ = [
    "SamplingOption",
    "sanitize_sampling_option",
    "get_oscillation_gs",
    "Denoiser",
    "I2VDenoiser",
    "DistilledDenoiser",
    "SamplingMethodDict",
    "time_shift",
    "get_res_lin_function",
    "get_schedule",
    "get_noise",
    "pack",
    "unpack",
    "prepare",
    "prepare_ids",
    "prepare_api",
]


def _einops():
    try:
        import einops
    except ImportError as e:  # einops is a base dependency; this only trips on a broken install
        raise ImportError("opensora_fast.utils.sampling needs einops: pip install einops") from e
    return einops


# ======================================================
# Sampling options
# ======================================================


@dataclass
class SamplingOption:
    """Generation settings (upstream's fields and defaults)."""

    width: int | None = None  # image/video width
    height: int | None = None  # image/video height
    resolution: str | None = None  # e.g. "256px"; with aspect_ratio, overrides height and width
    aspect_ratio: str | None = None  # e.g. "16:9"
    num_frames: int = 1
    num_steps: int = 50
    guidance: float = 4.0  # classifier-free guidance (text)
    text_osci: bool = False  # oscillate the text guidance
    guidance_img: float | None = None  # guidance on the image / video condition
    image_osci: bool = False  # oscillate the image guidance
    scale_temporal_osci: bool = False  # scale the image guidance along time
    seed: int | None = None
    shift: bool = True  # shift the timestep schedule
    method: str | SamplingMethod = SamplingMethod.I2V
    temporal_reduction: int = 1
    is_causal_vae: bool = False
    flow_shift: float | None = None


def _round_up_16(v: int) -> int:
    return (v // 16 + (1 if v % 16 else 0)) * 16


def sanitize_sampling_option(sampling_option: SamplingOption) -> SamplingOption:
    """A copy with height/width resolved (from resolution + aspect_ratio, inference table)
    and rounded up to multiples of 16, and ``method`` as a :class:`SamplingMethod`."""
    opt = sampling_option
    if opt.resolution is not None or opt.aspect_ratio is not None:
        if opt.resolution is None or opt.aspect_ratio is None:
            raise ValueError(
                "Both resolution and aspect ratio must be provided "
                f"(got resolution={opt.resolution!r}, aspect_ratio={opt.aspect_ratio!r})"
            )
        height, width = get_image_size(opt.resolution, opt.aspect_ratio, training=False)
    else:
        if opt.height is None or opt.width is None:
            raise ValueError(
                f"Both height and width must be provided (got height={opt.height!r}, width={opt.width!r}), "
                "or resolution and aspect_ratio"
            )
        height, width = opt.height, opt.width
    changes = dict(height=_round_up_16(height), width=_round_up_16(width))
    if isinstance(opt.method, str):
        changes["method"] = SamplingMethod(opt.method)
    return replace(opt, **changes)


def get_oscillation_gs(guidance_scale: float, i: int, force_num: int = 10) -> float:
    """Guidance for step ``i``: ``guidance_scale`` for the first ``force_num`` steps and
    even steps after, 1.0 (no guidance) on odd steps after."""
    if i < force_num or i % 2 == 0:
        return guidance_scale
    return 1.0


# ======================================================
# Denoising
# ======================================================


class Denoiser(ABC):
    @abstractmethod
    def denoise(self, model: nn.Module, **kwargs) -> Tensor:
        """Denoise the input."""

    @abstractmethod
    def prepare_guidance(
        self,
        text: list[str],
        optional_models: dict[str, nn.Module],
        device: torch.device,
        dtype: torch.dtype,
        **kwargs,
    ):
        """``(text, extra model inputs)`` for classifier-free guidance."""


class I2VDenoiser(Denoiser):
    """Euler sampling with text + image classifier-free guidance over a 3x batch
    ``[cond, uncond-text, uncond-all]`` (upstream's I2V denoiser)."""

    def denoise(self, model: nn.Module, **kwargs) -> Tensor:
        img = kwargs.pop("img")
        timesteps = kwargs.pop("timesteps")
        guidance = kwargs.pop("guidance")
        guidance_img = kwargs.pop("guidance_img")
        masks = kwargs.pop("masks")
        masked_ref = kwargs.pop("masked_ref")
        kwargs.pop("sigma_min")
        text_osci = kwargs.pop("text_osci", False)
        image_osci = kwargs.pop("image_osci", False)
        scale_temporal_osci = kwargs.pop("scale_temporal_osci", False)
        patch_size = kwargs.pop("patch_size", 2)

        guidance_vec = torch.full((img.shape[0],), guidance, device=img.device, dtype=img.dtype)
        b, c, t, H, W = masked_ref.shape
        cond_in = pack(torch.cat((masks, masked_ref), dim=1), patch_size=patch_size)
        for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
            t_vec = torch.full((img.shape[0],), t_curr, dtype=img.dtype, device=img.device)
            kwargs["cond"] = torch.cat([cond_in, cond_in, torch.zeros_like(cond_in)], dim=0)
            x = img[: len(img) // 3]
            img = torch.cat([x, x, x], dim=0)
            pred = model(img=img, **kwargs, timesteps=t_vec, guidance=guidance_vec)

            text_gs = get_oscillation_gs(guidance, i) if text_osci else guidance
            image_gs = get_oscillation_gs(guidance_img, i) if image_osci else guidance_img
            p_cond, p_uncond, p_uncond2 = pred.chunk(3, dim=0)
            if image_gs > 1.0 and scale_temporal_osci:
                # lower bound 1.0 at the first frame, rising along time to a per-step maximum
                step_max = torch.linspace(image_gs, 1.0, len(timesteps))[i]
                ramp = torch.linspace(1.0, step_max, t)[None, None, :, None, None].expand(b, c, t, H, W)
                image_gs = pack(ramp.contiguous(), patch_size=patch_size).to(p_cond.device, p_cond.dtype)
            pred = p_uncond2 + image_gs * (p_uncond - p_uncond2) + text_gs * (p_cond - p_uncond)
            pred = torch.cat([pred, pred, pred], dim=0)
            img = img + (t_prev - t_curr) * pred
        return img[: len(img) // 3]

    def prepare_guidance(self, text, optional_models, device, dtype, **kwargs):
        neg = kwargs.get("neg", None)
        extra = {"guidance_img": kwargs.pop("guidance_img")}
        if neg is None:
            neg = [""] * len(text)
        return text + neg + neg, extra


class DistilledDenoiser(Denoiser):
    """Plain Euler sampling with guidance embedded in the model (upstream's distilled/Flux denoiser)."""

    def denoise(self, model: nn.Module, **kwargs) -> Tensor:
        img = kwargs.pop("img")
        timesteps = kwargs.pop("timesteps")
        guidance = kwargs.pop("guidance")
        guidance_vec = torch.full((img.shape[0],), guidance, device=img.device, dtype=img.dtype)
        for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]):
            t_vec = torch.full((img.shape[0],), t_curr, dtype=img.dtype, device=img.device)
            pred = model(img=img, **kwargs, timesteps=t_vec, guidance=guidance_vec)
            img = img + (t_prev - t_curr) * pred
        return img

    def prepare_guidance(self, text, optional_models, device, dtype, **kwargs):
        return text, {}


SamplingMethodDict = {
    SamplingMethod.I2V: I2VDenoiser(),
    SamplingMethod.DISTILLED: DistilledDenoiser(),
}


# ======================================================
# Timesteps
# ======================================================


def time_shift(alpha: float, t: Tensor) -> Tensor:
    """``alpha * t / (1 + (alpha - 1) * t)``: pushes timesteps towards 1 for ``alpha > 1``."""
    return alpha * t / (1 + (alpha - 1) * t)


def get_res_lin_function(x1: float = 256, y1: float = 1, x2: float = 4096, y2: float = 3) -> Callable[[float], float]:
    """The line through ``(x1, y1)`` and ``(x2, y2)``."""
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def get_schedule(
    num_steps: int,
    image_seq_len: int,
    num_frames: int,
    shift_alpha: float | None = None,
    base_shift: float = 1,
    max_shift: float = 3,
    shift: bool = True,
) -> list[float]:
    """``num_steps + 1`` timesteps from 1 to 0 (fp32 linspace); with ``shift``, through
    :func:`time_shift` with ``shift_alpha`` or, when None, the line from (256, base_shift)
    to (4096, max_shift) at ``image_seq_len`` times ``sqrt(num_frames)``."""
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        if shift_alpha is None:
            shift_alpha = get_res_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
            shift_alpha *= math.sqrt(num_frames)
        timesteps = time_shift(shift_alpha, timesteps)
    return timesteps.tolist()


def _spatial_unit() -> int:
    return int(os.environ.get("AE_SPATIAL_COMPRESSION", 16))


def get_noise(
    num_samples: int,
    height: int,
    width: int,
    num_frames: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    patch_size: int = 2,
    channel: int = 16,
) -> Tensor:
    """Gaussian noise ``[num_samples, channel, num_frames, patch*ceil(height/D), patch*ceil(width/D)]``
    from ``torch.Generator(device).manual_seed(seed)`` (``D`` = ``AE_SPATIAL_COMPRESSION``, 16)."""
    D = _spatial_unit()
    if seed is None:
        seed = random.randint(0, 2**32 - 1)
    return torch.randn(
        num_samples,
        channel,
        num_frames,
        patch_size * math.ceil(height / D),
        patch_size * math.ceil(width / D),
        device=device,
        dtype=dtype,
        generator=torch.Generator(device=device).manual_seed(seed),
    )


def pack(x: Tensor, patch_size: int = 2) -> Tensor:
    """``[B, C, T, H, W]`` -> ``[B, T*(H/p)*(W/p), C*p*p]`` (``b c t (h ph) (w pw) -> b (t h w) (c ph pw)``)."""
    return _einops().rearrange(x, "b c t (h ph) (w pw) -> b (t h w) (c ph pw)", ph=patch_size, pw=patch_size)


def unpack(x: Tensor, height: int, width: int, num_frames: int, patch_size: int = 2) -> Tensor:
    """Inverse of :func:`pack` for an image of ``height`` x ``width`` pixels (latent grid ``ceil(height/D)``)."""
    D = _spatial_unit()
    return _einops().rearrange(
        x,
        "b (t h w) (c ph pw) -> b c t (h ph) (w pw)",
        h=math.ceil(height / D),
        w=math.ceil(width / D),
        t=num_frames,
        ph=patch_size,
        pw=patch_size,
    )


# ======================================================
# Prepare
# ======================================================


def _img_ids(t: int, h: int, w: int, bs: int) -> Tensor:
    """``[bs, t*h*w, 3]`` float32 (t, h, w) position of each token."""
    ids = torch.zeros(t, h, w, 3)
    ids[..., 0] += torch.arange(t)[:, None, None]
    ids[..., 1] += torch.arange(h)[None, :, None]
    ids[..., 2] += torch.arange(w)[None, None, :]
    return ids.reshape(1, t * h * w, 3).expand(bs, -1, -1).contiguous()


def _repeat_batch(x: Tensor, bs: int) -> Tensor:
    return _einops().repeat(x, "1 ... -> bs ...", bs=bs)


def prepare(
    t5: Callable,
    clip: Callable,
    img: Tensor,
    prompt: str | list[str],
    seq_align: int = 1,
    patch_size: int = 2,
) -> dict[str, Tensor]:
    """Model inputs: packed ``img``, ``img_ids`` (t, h, w per token), ``txt`` from
    ``t5(prompts, added_tokens=n_img_tokens, seq_align=seq_align)``, zero ``txt_ids``
    and ``y_vec`` from ``clip(prompts)``, all in img's device and dtype; the batch
    follows the number of prompts."""
    einops = _einops()
    bs, c, t, h, w = img.shape
    device, dtype = img.device, img.dtype
    if isinstance(prompt, str):
        prompt = [prompt]
    bs = len(prompt)
    img = pack(img, patch_size=patch_size)
    if img.shape[0] != bs:
        img = einops.repeat(img, "b ... -> (repeat b) ...", repeat=bs // img.shape[0])
    img_ids = _img_ids(t, h // patch_size, w // patch_size, bs)
    txt = t5(prompt, added_tokens=img_ids.shape[1], seq_align=seq_align)
    if txt.shape[0] == 1 and bs > 1:
        txt = _repeat_batch(txt, bs)
    txt_ids = torch.zeros(bs, txt.shape[1], 3)
    vec = clip(prompt)
    if vec.shape[0] == 1 and bs > 1:
        vec = _repeat_batch(vec, bs)
    return {
        "img": img,
        "img_ids": img_ids.to(device, dtype),
        "txt": txt.to(device, dtype),
        "txt_ids": txt_ids.to(device, dtype),
        "y_vec": vec.to(device, dtype),
    }


def prepare_ids(img: Tensor, t5_embedding: Tensor, clip_embedding: Tensor) -> dict[str, Tensor]:
    """:func:`prepare` with precomputed embeddings (patch size 2, batch from ``img``)."""
    bs, c, t, h, w = img.shape
    device, dtype = img.device, img.dtype
    img = pack(img, patch_size=2)
    img_ids = _img_ids(t, h // 2, w // 2, bs)
    if t5_embedding.shape[0] == 1 and bs > 1:
        t5_embedding = _repeat_batch(t5_embedding, bs)
    txt_ids = torch.zeros(bs, t5_embedding.shape[1], 3)
    if clip_embedding.shape[0] == 1 and bs > 1:
        clip_embedding = _repeat_batch(clip_embedding, bs)
    return {
        "img": img,
        "img_ids": img_ids.to(device, dtype),
        "txt": t5_embedding.to(device, dtype),
        "txt_ids": txt_ids.to(device, dtype),
        "y_vec": clip_embedding.to(device, dtype),
    }


def _denoiser_for(method) -> Denoiser:
    if isinstance(method, str):
        method = SamplingMethod(method)
    try:
        return SamplingMethodDict[method]
    except KeyError:
        raise ValueError(
            f"Unknown sampling method {method!r}; accepted: {', '.join(repr(m) for m in SamplingMethodDict)}"
        ) from None


def prepare_api(
    model: nn.Module,
    model_ae: nn.Module,
    model_t5: Callable,
    model_clip: Callable,
    optional_models: dict[str, nn.Module],
) -> Callable:
    """The inference function ``api_fn(opt, cond_type="t2v", seed=None, sigma_min=1e-5,
    text=None, neg=None, patch_size=2, channel=16, **kwargs)`` -> decoded video ``[B, C, T, H, W]``,
    upstream's flow: noise, references (``kwargs["ref"]`` for i2v/v2v), schedule,
    guidance, denoise, unpack, replace conditioned frames, decode."""

    @torch.inference_mode()
    def api_fn(
        opt: SamplingOption,
        cond_type: str = "t2v",
        seed: int | None = None,
        sigma_min: float = 1e-5,
        text: list[str] | None = None,
        neg: list[str] | None = None,
        patch_size: int = 2,
        channel: int = 16,
        **kwargs,
    ):
        from . import inference as _inference

        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        if seed is None:
            seed = opt.seed if opt.seed is not None else random.randint(0, 2**32 - 1)
        if opt.num_frames == 1:
            num_frames = 1
        elif opt.is_causal_vae:
            num_frames = (opt.num_frames - 1) // opt.temporal_reduction + 1
        else:
            num_frames = opt.num_frames // opt.temporal_reduction

        z = get_noise(
            len(text),
            opt.height,
            opt.width,
            num_frames,
            device,
            dtype,
            seed,
            patch_size=patch_size,
            channel=channel // (patch_size**2),
        )
        denoiser = _denoiser_for(opt.method)

        references = [None] * len(text)
        if cond_type != "t2v" and "ref" in kwargs:
            collect = getattr(_inference, "collect_references_batch", None)
            if collect is None:
                raise ImportError("prepare_api: reference conditioning needs collect_references_batch (not available)")
            references = collect(
                kwargs.pop("ref"), cond_type, model_ae, (opt.height, opt.width), is_causal=opt.is_causal_vae
            )
        elif cond_type != "t2v":
            print(
                "your csv file doesn't have a ref column or is not processed properly. will default to cond_type t2v!"
            )
            cond_type = "t2v"

        timesteps = get_schedule(
            opt.num_steps,
            (z.shape[-1] * z.shape[-2]) // patch_size**2,
            num_frames,
            shift=opt.shift,
            shift_alpha=opt.flow_shift,
        )
        text, extra = denoiser.prepare_guidance(
            text=text,
            optional_models=optional_models,
            device=device,
            dtype=dtype,
            neg=neg,
            guidance_img=opt.guidance_img,
        )
        inp = prepare(model_t5, model_clip, z, prompt=text, patch_size=patch_size)
        inp.update(extra)
        if opt.method in (SamplingMethod.I2V,):
            cond_fn = getattr(_inference, "prepare_inference_condition", None)
            if cond_fn is None:
                raise ImportError("prepare_api: I2V sampling needs prepare_inference_condition (not available)")
            masks, masked_ref = cond_fn(z, cond_type, ref_list=references, causal=opt.is_causal_vae)
            inp["masks"], inp["masked_ref"], inp["sigma_min"] = masks, masked_ref, sigma_min

        x = denoiser.denoise(
            model,
            **inp,
            timesteps=timesteps,
            guidance=opt.guidance,
            text_osci=opt.text_osci,
            image_osci=opt.image_osci,
            scale_temporal_osci=(opt.scale_temporal_osci and "i2v" in cond_type),
            flow_shift=opt.flow_shift,
            patch_size=patch_size,
        )
        x = unpack(x, opt.height, opt.width, num_frames, patch_size=patch_size)
        if cond_type == "i2v_head":
            x[0, :, :1] = references[0][0]
        elif cond_type == "i2v_tail":
            x[0, :, -1:] = references[0][0]
        elif cond_type == "i2v_loop":
            x[0, :, :1] = references[0][0]
            x[0, :, -1:] = references[0][1]
        x = model_ae.decode(x)
        x = x[:, :, : opt.num_frames]
        if not opt.is_causal_vae and cond_type in ("i2v_head", "i2v_tail", "i2v_loop"):
            pad = model_ae.compression[0] - 1
            if cond_type == "i2v_head":
                x = x[:, :, pad:]
            elif cond_type == "i2v_tail":
                x = x[:, :, :-pad]
            else:
                x = x[:, :, pad:-pad]
        return x

    return api_fn
