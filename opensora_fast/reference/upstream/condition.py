"""Step-by-step ports of upstream's ``prepare_inference_condition``,
``prepare_visual_condition_causal`` / ``_uncausal``, ``collect_references_batch``
and ``add_noise_to_ref`` (hpcaitech/Open-Sora ``opensora/utils/inference.py`` and
``train.py``): the oracle for the drop-ins in :mod:`opensora_fast.utils._condition`.
Upstream's quirks are kept: CPU fp32 buffers, a print for the t2v fallback,
per-sample encodes, condition_config mutated in place."""

from __future__ import annotations

import random

import torch

from ...datasets._media import read_from_path


def add_noise_to_ref(masked_ref: torch.Tensor, masks: torch.Tensor, t: float, sigma_min: float = 1e-5):
    noise = torch.randn_like(masked_ref)
    noisy = (1 - (1 - sigma_min) * t) * masked_ref + t * noise
    return masks * noisy


def prepare_inference_condition(z: torch.Tensor, mask_cond: str, ref_list=None, causal: bool = True):
    B, C, T, H, W = z.shape
    masks = torch.zeros(B, 1, T, H, W)
    masked_z = torch.zeros(B, C, T, H, W)
    if ref_list is None:
        assert mask_cond == "t2v", f"reference is required for {mask_cond}"
    for i in range(B):
        ref = ref_list[i]  # TypeError for ref_list=None, as upstream
        if ref is None and mask_cond != "t2v":
            print("no reference found. will default to cond_type t2v!")
        if ref is None or T <= 1:
            continue
        if mask_cond in ("i2v_head", "i2v_loop"):
            masks[i, :, 0] = 1
            masked_z[i, :, 0] = ref[0][:, 0]
        if mask_cond in ("i2v_tail", "i2v_loop"):
            masks[i, :, -1] = 1
            masked_z[i, :, -1] = ref[-1][:, -1]
        if mask_cond.startswith("v2v_"):
            k = (16 if mask_cond.endswith("_easy") else 8) + int(causal)
            if mask_cond in ("v2v_head", "v2v_head_easy"):
                masks[i, :, :k] = 1
                masked_z[i, :, :k] = ref[0][:, :k]
            elif mask_cond in ("v2v_tail", "v2v_tail_easy"):
                masks[i, :, -k:] = 1
                masked_z[i, :, -k:] = ref[0][:, -k:]
            else:
                raise AssertionError(f"Unknown mask condition {mask_cond}")
        elif mask_cond not in ("i2v_head", "i2v_tail", "i2v_loop"):
            assert mask_cond == "t2v", f"Unknown mask condition {mask_cond}"
    return masks.to(z.device, z.dtype), masked_z.to(z.device, z.dtype)


def _drop_v2v(config: dict, T: int, short: int, long: int) -> None:
    if T <= short:
        for key in ("v2v_head", "v2v_tail", "v2v_head_easy", "v2v_tail_easy"):
            config.pop(key, None)
    if T <= long:
        for key in ("v2v_head_easy", "v2v_tail_easy"):
            config.pop(key, None)


def prepare_visual_condition_causal(x: torch.Tensor, condition_config: dict, model_ae):
    B = x.shape[0]
    C = model_ae.cfg.latent_channels
    T, H, W = model_ae.get_latent_size(x.shape[-3:])
    tcr = model_ae.time_compression_ratio
    masks = torch.zeros(B, 1, T, H, W).to(x.device, x.dtype)
    latent = torch.zeros(B, C, T, H, W).to(x.device, x.dtype)
    x_0 = torch.zeros(B, C, T, H, W).to(x.device, x.dtype)
    if T > 1:
        _drop_v2v(condition_config, T, 32 // tcr + 1, 64 // tcr + 1)  # mutates the caller's dict
        options, weights = list(condition_config.keys()), list(condition_config.values())
        for i in range(B):
            mode = random.choices(options, weights=weights, k=1)[0]
            x_0[i] = model_ae.encode(x[i].unsqueeze(0))[0]
            if mode in ("i2v_head", "i2v_loop"):
                masks[i, :, 0] = 1
                latent[i, :, :1] = model_ae.encode(x[i, :, :1].unsqueeze(0))
            if mode in ("i2v_tail", "i2v_loop"):
                masks[i, :, -1] = 1
                latent[i, :, -1:] = model_ae.encode(x[i, :, -1:].unsqueeze(0))
            if "v2v_head" in mode or "v2v_tail" in mode:
                ref_t = 65 if "easy" in mode else 33
                assert (ref_t - 1) % tcr == 0
                ct = (ref_t - 1) // tcr + 1
                if "v2v_head" in mode:
                    masks[i, :, :ct] = 1
                    latent[i, :, :ct] = model_ae.encode(x[i, :, :ref_t].unsqueeze(0))
                else:
                    masks[i, :, -ct:] = 1
                    latent[i, :, -ct:] = model_ae.encode(x[i, :, -ref_t:].unsqueeze(0))
            elif mode not in ("i2v_head", "i2v_tail", "i2v_loop"):
                assert mode == "t2v", f"Unknown mask condition {mode}"
    else:
        x_0 = model_ae.encode(x)
    latent = masks * latent
    return x_0, torch.cat((masks, latent), dim=1)


def prepare_visual_condition_uncausal(x: torch.Tensor, condition_config: dict, model_ae, pad: bool = False):
    B = x.shape[0]
    C = model_ae.cfg.latent_channels
    T, H, W = model_ae.get_latent_size(x.shape[-3:])
    tcr = model_ae.time_compression_ratio
    masks = torch.zeros(B, 1, T, H, W).to(x.device, x.dtype)
    latent = torch.zeros(B, C, T, H, W).to(x.device, x.dtype)
    x_0 = torch.zeros(B, C, T, H, W).to(x.device, x.dtype)
    if T > 1:
        _drop_v2v(condition_config, T, 32 // tcr, 64 // tcr)  # mutates the caller's dict
        options, weights = list(condition_config.keys()), list(condition_config.values())
        p = tcr - 1  # pad_num
        for i in range(B):
            mode = random.choices(options, weights=weights, k=1)[0]
            if mode == "i2v_head":
                masks[i, :, 0] = 1
                if pad:
                    inp = torch.cat([x[i, :, :1]] * p + [x[i, :, :-p]], dim=1).unsqueeze(0)
                else:
                    inp = x[i : i + 1]
                x_0[i] = model_ae.encode(inp)[0]
                latent[i, :, :1] = model_ae.encode(x[i, :, :1].unsqueeze(0))
            elif mode == "i2v_loop":
                masks[i, :, 0] = 1
                masks[i, :, -1] = 1
                if pad:
                    inp = torch.cat(
                        [x[i, :, :1]] * p + [x[i, :, : -p * 2]] + [x[i, :, -p * 2 - 1].unsqueeze(1)] * p, dim=1
                    ).unsqueeze(0)
                    x_0[i] = model_ae.encode(inp)[0]
                    latent[i, :, :1] = model_ae.encode(x[i, :, :1].unsqueeze(0))
                    latent[i, :, -1:] = model_ae.encode(x[i, :, -p * 2 - 1].unsqueeze(1).unsqueeze(0))
                else:
                    x_0[i] = model_ae.encode(x[i : i + 1])[0]
                    latent[i, :, :1] = model_ae.encode(x[i, :, :1].unsqueeze(0))
                    latent[i, :, -1:] = model_ae.encode(x[i, :, -1:].unsqueeze(0))
            elif mode == "i2v_tail":
                masks[i, :, -1] = 1
                if pad:
                    inp = torch.cat([x[i, :, p:]] + [x[i, :, -1:]] * p, dim=1).unsqueeze(0)
                    x_0[i] = model_ae.encode(inp)[0]
                    latent[i, :, -1:] = model_ae.encode(x[i, :, -p * 2 - 1].unsqueeze(1).unsqueeze(0))
                else:
                    x_0[i] = model_ae.encode(x[i : i + 1])[0]
                    latent[i, :, -1:] = model_ae.encode(x[i, :, -1:].unsqueeze(0))
            elif mode in ("v2v_head", "v2v_tail", "v2v_head_easy", "v2v_tail_easy"):
                ct = (64 if "easy" in mode else 32) // tcr
                assert T > ct
                x_0[i] = model_ae.encode(x[i].unsqueeze(0))[0]
                if "head" in mode:
                    masks[i, :, :ct] = 1
                    latent[i, :, :ct] = x_0[i, :, :ct]
                else:
                    masks[i, :, -ct:] = 1
                    latent[i, :, -ct:] = x_0[i, :, -ct:]
            else:
                assert mode == "t2v", f"Unknown mask condition {mode}"
                x_0[i] = model_ae.encode(x[i].unsqueeze(0))[0]
    else:
        x_0 = model_ae.encode(x)
    latent = masks * latent
    return x_0, torch.cat((masks, latent), dim=1)


def collect_references_batch(reference_paths, cond_type, model_ae, image_size, is_causal=False):
    """Upstream's per-sample reading and per-reference encodes (media read by our
    :func:`opensora_fast.datasets._media.read_from_path`)."""
    param = next(model_ae.parameters())
    device, dtype = param.device, param.dtype
    out = []

    def enc(r):
        return model_ae.encode(r.unsqueeze(0).to(device, dtype)).squeeze(0)

    for path in reference_paths:
        if path == "":
            out.append(None)
            continue
        parts = path.split(";")
        if "v2v" in cond_type:
            r = read_from_path(parts[0], image_size, transform_name="resize_crop")
            n = r.size(1)
            want = (64 if (n >= 64 and "easy" in cond_type) else 32) + int(bool(is_causal))
            assert n >= want, f"need at least {want} reference frames for v2v generation"
            if "head" in cond_type:
                r = r[:, :want]
            elif "tail" in cond_type:
                r = r[:, -want:]
            else:
                raise NotImplementedError
            out.append([enc(r)])
        elif cond_type == "i2v_head":
            out.append([enc(read_from_path(parts[0], image_size, transform_name="resize_crop")[:, :1])])
        elif cond_type == "i2v_tail":
            out.append([enc(read_from_path(parts[-1], image_size, transform_name="resize_crop")[:, -1:])])
        elif cond_type == "i2v_loop":
            head = enc(read_from_path(parts[0], image_size, transform_name="resize_crop")[:, :1])
            tail = enc(read_from_path(parts[-1], image_size, transform_name="resize_crop")[:, -1:])
            out.append([head, tail])
        else:
            raise NotImplementedError(f"Unknown condition type {cond_type}")
    return out
