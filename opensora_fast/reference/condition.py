"""Conditioning: the pure-PyTorch reference of the native ops
``opensora_fast::condition`` / ``condition_cat_`` (same checks, same messages),
and step-by-step ports of upstream's ``prepare_inference_condition``,
``prepare_visual_condition_causal`` / ``_uncausal``, ``collect_references_batch``
and ``add_noise_to_ref`` (hpcaitech/Open-Sora ``opensora/utils/inference.py`` and
``train.py``), the oracle for the drop-ins in :mod:`opensora_fast.utils._condition`.

The plan
--------
A flat ``int[]`` of rows of 5: ``(sample, frame, count, source, source_frame)``.
Row ``r`` says: latent frames ``[frame, frame + count)`` of sample ``sample`` are
conditioned (mask 1) and take their values from frames
``[source_frame, source_frame + count)`` of ``sources[source]`` (``[C, Ts, H, W]``,
any strides; float32, bfloat16, float16 or float64), converted to the output
dtype as torch's ``copy_`` converts (c10's casts), every NaN written as one
canonical quiet NaN (torch's own conversions give different NaN bits in their
vector and scalar paths). Every frame no row names gets mask 0 and value
0. Rows of one sample must not overlap.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence

import torch

from ._checks import check_int64, find_overlap, is_dense, tensor_span

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SRC_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ROW = 5


def check_condition_arguments(op: str, out: torch.Tensor, sources: Sequence[torch.Tensor], plan: Sequence[int]) -> None:
    """What the native schema takes: tensors, and plan values within int64 (the
    wrappers raise these where the schema parser would)."""
    arg = "cond" if op == "condition_cat_" else "z"
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: {arg} must be a tensor, got {type(out).__name__}")
    for i, s in enumerate(sources):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{op}: sources[{i}] must be a tensor, got {type(s).__name__}")
    check_int64(op, "plan", plan)


def check_source_grad(op: str, sources: Sequence[torch.Tensor]) -> None:
    """The ops are not differentiable: in grad mode a source that requires grad
    is refused (the native Autograd kernel's check, before the others)."""
    if torch.is_grad_enabled():
        for i, s in enumerate(sources):
            if s.requires_grad:
                raise ValueError(
                    f"{op}: sources[{i}] requires grad and grad mode is on; {op} is not differentiable: "
                    "detach the sources or call it under torch.no_grad()"
                )


def check_condition_inputs(op: str, out: torch.Tensor, sources: Sequence[torch.Tensor], plan: Sequence[int]) -> None:
    """The native op's checks in the same order with the same messages.
    ``op`` is "condition" (``out`` is z, ``[B, C, T, H, W]``) or "condition_cat_"
    (``out`` is cond, ``[B, 1 + C, T, H, W]``, written in place)."""
    cat = op == "condition_cat_"
    arg = "cond" if cat else "z"
    want = "[B, 1 + C, T, H, W]" if cat else "[B, C, T, H, W]"
    check_condition_arguments(op, out, sources, plan)
    if not is_dense(out):  # first: a nested tensor has no shape to read
        raise ValueError(f"{op}: {arg} must be a dense (strided) tensor")
    if out.dim() != 5 or (cat and out.shape[1] < 1):
        raise ValueError(f"{op}: {arg} must be {want}, got shape {list(out.shape)}")
    if out.dtype not in OUT_DTYPES:
        raise TypeError(f"{op}: {arg} must be float32, bfloat16, float16 or float64")
    if cat and not out.is_contiguous():
        raise ValueError(f"{op}: cond must be contiguous")
    if cat and out.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{op}: cond is an inference tensor; it can only be written in place inside torch.inference_mode()"
        )
    B, C, T, H, W = out.shape
    if cat:
        C -= 1
    for i, s in enumerate(sources):
        if not is_dense(s):
            raise ValueError(f"{op}: sources[{i}] must be a dense (strided) tensor")
        if s.dim() != 4:
            raise ValueError(f"{op}: sources[{i}] must be [C, T, H, W], got shape {list(s.shape)}")
        if s.dtype not in SRC_DTYPES:
            raise TypeError(f"{op}: sources[{i}] must be float32, bfloat16, float16 or float64")
        if s.device != out.device:
            raise ValueError(f"{op}: sources[{i}] is on {s.device} but {arg} is on {out.device}")
        if s.shape[0] != C or s.shape[2] != H or s.shape[3] != W:
            raise ValueError(
                f"{op}: sources[{i}] has shape {list(s.shape)}; expected [C, *, H, W] = [{C}, *, {H}, {W}]"
            )
    if cat and out.device.type != "meta":
        # address ranges, as ema_update_ and unpad_ (csrc/condition/condition.cpp)
        storages: dict = {}
        spans = [tensor_span(out, True, "cond", -1, storages, strided=True)]
        spans += [tensor_span(s, False, "sources", i, storages, strided=True) for i, s in enumerate(sources)]
        hit = find_overlap(spans)
        if hit is not None:
            src = hit[1] if hit[0].written else hit[0]
            raise ValueError(f"{op}: sources[{src.index}] shares memory with cond")
    if len(plan) % ROW != 0:
        raise ValueError(
            f"{op}: plan must hold rows of 5 ints (sample, frame, count, source, source_frame), got {len(plan)} ints"
        )
    rows = [tuple(int(v) for v in plan[k : k + ROW]) for k in range(0, len(plan), ROW)]
    for r, (b, t0, n, s, f0) in enumerate(rows):
        if not 0 <= b < B:
            raise ValueError(f"{op}: plan row {r}: sample {b} is outside [0, {B})")
        if not (n >= 1 and 0 <= t0 <= T and n <= T - t0):
            raise ValueError(f"{op}: plan row {r}: frame {t0}, count {n} do not fit in T={T}")
        if not 0 <= s < len(sources):
            raise ValueError(f"{op}: plan row {r}: source {s} is outside [0, {len(sources)})")
        Ts = sources[s].shape[1]
        if not (0 <= f0 <= Ts and n <= Ts - f0):
            raise ValueError(
                f"{op}: plan row {r}: source_frame {f0}, count {n} do not fit in sources[{s}] with {Ts} frames"
            )
    order = sorted(range(len(rows)), key=lambda r: (rows[r][0], rows[r][1], r))
    for p, q in zip(order, order[1:]):
        if rows[p][0] == rows[q][0] and rows[p][1] + rows[p][2] > rows[q][1]:
            raise ValueError(f"{op}: plan rows {min(p, q)} and {max(p, q)} overlap (sample {rows[p][0]})")


_NAN_BITS = {
    torch.float32: (torch.int32, 0x7FC00000),
    torch.float64: (torch.int64, 0x7FF8000000000000),
    torch.bfloat16: (torch.int16, 0x7FC0),
    torch.float16: (torch.int16, 0x7E00),
}


def canonical_nan(dtype: torch.dtype, device) -> torch.Tensor:
    """The one quiet NaN the op writes for ``dtype`` (0-dim)."""
    int_dtype, value = _NAN_BITS[dtype]
    return torch.tensor(value, dtype=int_dtype, device=device).view(dtype)


def _fill(masks: torch.Tensor, masked: torch.Tensor, sources, plan) -> None:
    for k in range(0, len(plan), ROW):
        b, t0, n, s, f0 = (int(v) for v in plan[k : k + ROW])
        masks[b, :, t0 : t0 + n] = 1
        masked[b, :, t0 : t0 + n] = sources[s][:, f0 : f0 + n]  # torch's conversion (copy_)
        part = masked[b, :, t0 : t0 + n]
        part.copy_(torch.where(part.isnan(), canonical_nan(part.dtype, part.device), part))  # one NaN


def condition(z: torch.Tensor, sources: Sequence[torch.Tensor], plan: Sequence[int]):
    """Reference of ``opensora_fast::condition``: ``(masks [B,1,T,H,W], masked [B,C,T,H,W])``
    in z's dtype on z's device (z's values are not read)."""
    check_condition_arguments("condition", z, sources, plan)
    check_source_grad("condition", sources)
    check_condition_inputs("condition", z, sources, plan)
    B, C, T, H, W = z.shape
    masks = torch.zeros((B, 1, T, H, W), dtype=z.dtype, device=z.device)
    masked = torch.zeros((B, C, T, H, W), dtype=z.dtype, device=z.device)
    _fill(masks, masked, sources, plan)
    return masks, masked


def condition_cat_(cond: torch.Tensor, sources: Sequence[torch.Tensor], plan: Sequence[int]) -> None:
    """Reference of ``opensora_fast::condition_cat_``: writes all of
    ``cond = cat(masks, masks * latent)`` ``[B, 1 + C, T, H, W]`` in place."""
    check_condition_arguments("condition_cat_", cond, sources, plan)
    if torch.is_grad_enabled() and cond.requires_grad:
        raise RuntimeError(
            "condition_cat_: cond requires grad and grad mode is on; condition_cat_ is not differentiable: "
            "call it under torch.no_grad()"
        )
    check_source_grad("condition_cat_", sources)
    check_condition_inputs("condition_cat_", cond, sources, plan)
    cond.zero_()
    _fill(cond[:, :1], cond[:, 1:], sources, plan)


# ---------------------------------------------------------------------------
# Upstream ports (step by step; upstream's quirks kept: CPU fp32 buffers, a print
# for the t2v fallback, per-sample encodes, condition_config mutated in place).


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
    :func:`opensora_fast.utils._media.read_from_path`)."""
    from ..utils._media import read_from_path

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
