"""Drop-ins for upstream's conditioning helpers (``opensora.utils.inference``:
``prepare_inference_condition``, ``collect_references_batch``, ``add_noise_to_ref``;
``opensora.utils.train``: ``prepare_visual_condition_causal`` / ``_uncausal``).
Same signatures and results; masks and masked latents are written on the target
device in one pass by :func:`opensora_fast.ops.condition` from a per-sample plan,
and encoder calls are batched (one per group of samples that needs the same kind
of encode, never one per sample)."""

from __future__ import annotations

import logging
import os
import random
from typing import Optional, Sequence

import torch

from .. import ops
from ..datasets._media import read_from_path
from ..ops.condition import OUT_DTYPES, SRC_DTYPES, condition_lists

logger = logging.getLogger("opensora_fast")

INFERENCE_MODES = (
    "t2v",
    "i2v_head",
    "i2v_tail",
    "i2v_loop",
    "v2v_head",
    "v2v_tail",
    "v2v_head_easy",
    "v2v_tail_easy",
)
TRAIN_MODES = INFERENCE_MODES

__all__ = [
    "prepare_inference_condition",
    "prepare_visual_condition_causal",
    "prepare_visual_condition_uncausal",
    "collect_references_batch",
    "add_noise_to_ref",
]


def add_noise_to_ref(masked_ref: torch.Tensor, masks: torch.Tensor, t: float, sigma_min: float = 1e-5) -> torch.Tensor:
    """``masks * ((1 - (1 - sigma_min) t) masked_ref + t noise)``, noise from
    ``torch.randn_like(masked_ref)`` (same draws as upstream). Bit-identical to
    upstream: the keep factor is a Python float, then two scalar products and
    one add, unfused (a fused ``add(alpha=t)`` would round differently)."""
    keep = 1 - (1 - sigma_min) * t
    noise = torch.randn_like(masked_ref)
    return masks * (masked_ref * keep + noise * t)


def _needs_grad(sources: list) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in sources)


def _condition_with_grad(shape, dtype: torch.dtype, device, sources: list, plan: list, via=None):
    """Upstream's differentiable result where a source requires grad in grad mode
    (an encoder that is not frozen): the op is not differentiable and refuses
    such sources, so the frames are copied with autograd-tracked slice writes.
    ``via``: the buffer dtype upstream copies through first (inference: fp32)."""
    B, C, T, H, W = shape
    masks = torch.zeros((B, 1, T, H, W), dtype=dtype, device=device)
    masked = torch.zeros((B, C, T, H, W), dtype=dtype, device=device)
    for k in range(0, len(plan), 5):
        b, t0, n, s, f0 = plan[k : k + 5]
        masks[b, :, t0 : t0 + n] = 1
        frames = sources[s][:, f0 : f0 + n]
        masked[b, :, t0 : t0 + n] = (frames if via is None else frames.to(via)).to(dtype)
    return masks, masked


class _Sources:
    """The op's source list: each distinct tensor once, on the output device, in a
    dtype the kernel reads (others go through fp32, upstream's own path)."""

    def __init__(self, device: torch.device, keep=SRC_DTYPES, odd_dtype: torch.dtype = torch.float32):
        self.device, self.keep, self.odd_dtype = device, keep, odd_dtype
        self.tensors: list[torch.Tensor] = []
        self._index: dict[int, int] = {}

    def add(self, t: torch.Tensor) -> int:
        key = id(t)
        if key not in self._index:
            if t.dtype not in self.keep:
                t = t.to(self.odd_dtype)
            if t.device != self.device:
                t = t.to(self.device)  # once per tensor, not per frame
            self._index[key] = len(self.tensors)
            self.tensors.append(t)
        return self._index[key]


def _check_ref(ref, i: int, k: int, shape, need: int, mode: str) -> int:
    """Checks that ref_list[i][k] is a [C, T', H, W] tensor with at least ``need``
    frames; returns T'."""
    C, H, W = shape
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"prepare_inference_condition: ref_list[{i}][{k}] must be a tensor, got {type(ref).__name__}")
    shp = ref.shape  # once: each .shape builds a torch.Size (host time counts here)
    if len(shp) != 4 or shp[0] != C or shp[2] != H or shp[3] != W:
        raise ValueError(
            f"prepare_inference_condition: ref_list[{i}][{k}] (sample {i}) has shape {list(ref.shape)}; "
            f"expected [C, T', H, W] = [{C}, T', {H}, {W}]"
        )
    if shp[1] < need:
        raise ValueError(
            f"prepare_inference_condition: ref_list[{i}][{k}] (sample {i}) has {shp[1]} frames; "
            f"{mode} needs at least {need}"
        )
    return shp[1]


def prepare_inference_condition(
    z: torch.Tensor,
    mask_cond: str,
    ref_list: Optional[Sequence[Optional[Sequence[torch.Tensor]]]] = None,
    causal: bool = True,
    *,
    strict: bool = False,
):
    """Drop-in for upstream's ``prepare_inference_condition``: ``(masks [B,1,T,H,W],
    masked_z [B,C,T,H,W])`` in z's dtype on z's device, bit-identical to upstream's.

    Differences: ``ref_list=None`` works for ``t2v`` (upstream raises TypeError);
    unknown ``mask_cond``, a wrong ``len(ref_list)``, references of the wrong
    shape or with too few frames raise ValueError naming the sample (upstream
    asserts, broadcasts or crashes); a missing (None) reference for a mode that
    needs one falls back to t2v for that sample, as upstream, logged once per call
    (``strict=True`` raises ValueError instead). References may live on any device;
    each is copied to z's device once.
    """
    if mask_cond not in INFERENCE_MODES:
        raise ValueError(
            f"prepare_inference_condition: unknown mask_cond {mask_cond!r}; expected one of {INFERENCE_MODES}"
        )
    if z.dim() != 5:
        raise ValueError(f"prepare_inference_condition: z must be [B, C, T, H, W], got shape {list(z.shape)}")
    B, C, T, H, W = z.shape
    if ref_list is None:
        if mask_cond != "t2v":
            raise ValueError(f"prepare_inference_condition: mask_cond {mask_cond!r} needs ref_list (got None)")
        ref_list = [None] * B
    if len(ref_list) != B:
        raise ValueError(f"prepare_inference_condition: len(ref_list) is {len(ref_list)} but z has B={B}")
    out_dtype = z.dtype if z.dtype in OUT_DTYPES else torch.float32
    # upstream copies every reference into an fp32 buffer first: fp64 (or any
    # other) references are rounded to fp32 here, 16/32-bit ones convert exactly
    srcs = _Sources(z.device, keep=(torch.float32, torch.bfloat16, torch.float16))
    plan: list[int] = []
    missing = []
    if mask_cond != "t2v" and T > 1:
        # the mode's shape, decided once (host time: this loop is most of a call's)
        head_end = mask_cond in ("i2v_head", "i2v_loop")
        tail_end = mask_cond in ("i2v_tail", "i2v_loop")
        k = min((16 if mask_cond.endswith("_easy") else 8) + int(causal), T) if mask_cond.startswith("v2v") else 0
        v2v_at_head = "head" in mask_cond
        shape = (C, H, W)
        add = srcs.add
        for i, ref in enumerate(ref_list):
            if ref is None:
                missing.append(i)
                continue
            if len(ref) == 0:
                raise ValueError(
                    f"prepare_inference_condition: ref_list[{i}] (sample {i}) is empty; {mask_cond} needs a reference"
                )
            if head_end:
                head = ref[0]
                head_frames = _check_ref(head, i, 0, shape, 1, mask_cond)
                head_src = add(head)
                plan += [i, 0, 1, head_src, 0]
            if tail_end:
                r = ref[-1]
                if head_end and r is head:  # one reference for both ends of a loop: checked once
                    s, frames = head_src, head_frames
                else:
                    frames = _check_ref(r, i, len(ref) - 1, shape, 1, mask_cond)
                    s = add(r)
                plan += [i, T - 1, 1, s, frames - 1]
            if k:
                r = ref[0]
                frames = _check_ref(r, i, 0, shape, k, mask_cond)
                plan += [i, 0, k, add(r), 0] if v2v_at_head else [i, T - k, k, add(r), frames - k]
    elif mask_cond != "t2v":  # T = 1: nothing is conditioned, as upstream; missing references still noted
        missing = [i for i, ref in enumerate(ref_list) if ref is None]
    if missing:
        msg = "prepare_inference_condition: no reference for sample(s) %s; using t2v for them (mask_cond %r)"
        if strict:
            raise ValueError(msg % (missing, mask_cond))
        logger.warning(msg, missing, mask_cond)  # formatted only where a handler takes it
    zz = z if out_dtype == z.dtype else z.new_empty((1,) * 5, dtype=out_dtype).expand(B, C, T, H, W)
    if _needs_grad(srcs.tensors):
        masks, masked = _condition_with_grad(zz.shape, out_dtype, z.device, srcs.tensors, plan, torch.float32)
    else:
        masks, masked = condition_lists(zz, srcs.tensors, plan)
    if out_dtype != z.dtype:  # integer/complex z: upstream's fp32 buffers, then .to(z.dtype)
        masks, masked = masks.to(z.dtype), masked.to(z.dtype)
    return masks, masked


# ---------------------------------------------------------------------------
# Training


# On the CPU, encodes go in chunks of about this much input (max_encode_batch=None).
# A batch adds no parallelism there (the encoder's ops already spread over the
# cores within one sample), while a whole batch's activations fall out of the
# caches: at B=8, 65x64x96 bf16 (2.4 MB a sample), 2 cores, chunks of 2 samples
# were the fastest both for the tests' toy VAE (whole batch 0.83x upstream,
# chunks of 1/2/3/4 samples 1.03/1.54/1.47/1.39x) and for a cheap encoder
# (avg-pool + 1x1 conv: chunks of 3 lost to upstream's per-sample calls in
# mixed modes). benchmarks/bench_condition.py. On a GPU the whole batch wins.
CPU_ENCODE_CHUNK_BYTES = 6 << 20

# On the CPU by default, a non-consecutive group of samples whose inputs are
# larger than this each is encoded run by run from views of x rather than
# gathered: copying a sample of this size costs about what a cheap encoder's
# fixed per-call cost is (benchmarks/bench_condition.py's cheap-encoder rows),
# and a copy reads every frame where an encoder may read few.
CPU_GATHER_MAX_BYTES = 256 << 10


def _chunk(n: int, sample_bytes: int, on_cpu: bool, max_batch: Optional[int]) -> int:
    """Samples per encode for n inputs of ``sample_bytes`` each: ``max_batch``
    (0: all); None: all off the CPU, about ``CPU_ENCODE_CHUNK_BYTES`` of input on it."""
    if max_batch is None:
        if not on_cpu:
            return max(n, 1)
        return max(1, CPU_ENCODE_CHUNK_BYTES // max(sample_bytes, 1))
    return max(n, 1) if max_batch <= 0 else int(max_batch)


def _encode_batched(model_ae, inputs: torch.Tensor, max_batch: Optional[int]) -> list[torch.Tensor]:
    """model_ae.encode over ``inputs`` in chunks (see :func:`_chunk`); an empty
    batch is encoded once as is (upstream's empty result, in the encoder's dtype)."""
    n = inputs.shape[0]
    if n == 0:
        return [model_ae.encode(inputs)]
    step = _chunk(n, inputs[0].numel() * inputs.element_size(), inputs.device.type == "cpu", max_batch)
    return [model_ae.encode(inputs[lo : lo + step]) for lo in range(0, n, max(step, 1))]


def _latent_config(model_ae, x):
    C = model_ae.cfg.latent_channels
    T, H, W = model_ae.get_latent_size(x.shape[-3:])
    return C, T, H, W


_V2V_SHORT = ("v2v_head", "v2v_tail")
_V2V_EASY = ("v2v_head_easy", "v2v_tail_easy")


def _modes_for_length(condition_config: dict, T: int, short: int, long: int) -> dict:
    """A copy of ``condition_config`` without the v2v modes upstream removes for
    T latent frames: all four at ``T <= short``, the two easy ones at
    ``T <= long`` (exact key names only, as upstream's pops)."""
    out = {}
    for mode, weight in condition_config.items():
        if mode in _V2V_SHORT and not T > short:
            continue
        if mode in _V2V_EASY and not (T > short and T > long):
            continue
        out[mode] = weight
    return out


def _draw_modes(condition_config: dict, B: int, short: int, long: int, T: int, who: str) -> list[str]:
    config = _modes_for_length(condition_config, T, short, long)  # never the caller's dict
    if B == 0:
        return []
    if not config:
        raise ValueError(f"{who}: condition_config has no mode left for T={T} latent frames")
    # One call for the batch consumes Python's `random` exactly as upstream's B
    # calls with k=1 (one random() per draw, same cumulative weights).
    modes = random.choices(list(config.keys()), weights=list(config.values()), k=B)
    for i, m in enumerate(modes):
        if m not in TRAIN_MODES and not ("v2v_head" in m or "v2v_tail" in m):
            raise ValueError(f"{who}: unknown mask condition {m!r} drawn for sample {i}")
    return modes


def _selector(idx: list):
    """How to take samples ``idx`` (ascending) of a batch for one encode: a
    slice when they are consecutive, so the input is a view of ``x`` as
    upstream's per-sample inputs are, not a gathered copy; otherwise the index
    list (a gathered batch)."""
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return slice(idx[0], idx[0] + len(idx))
    return list(idx)


def _runs(idx: list) -> list[list]:
    """``idx`` (ascending) split into maximal runs of consecutive samples."""
    runs = [[idx[0]]]
    for i in idx[1:]:
        if i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _calls(idx: list, build, max_batch: Optional[int]) -> list[tuple[list, object]]:
    """The encoder calls for a group: (samples, selector for ``build``) each, in
    sample order, at most :func:`_chunk` samples a call. Consecutive samples are
    slices (views). A non-consecutive group is one gathered batch, except on the
    CPU by default (``max_batch`` None) when a sample's input exceeds
    ``CPU_GATHER_MAX_BYTES``: then each run of consecutive samples is its own
    view, so no call copies more than upstream's per-sample views do and the
    encoder is called at most as often as upstream calls it."""
    probe = build(slice(idx[0], idx[0]))  # zero samples: the input's shape, nothing copied
    nbytes = probe.element_size()
    for d in probe.shape[1:]:
        nbytes *= d
    on_cpu = probe.device.type == "cpu"
    step = _chunk(len(idx), nbytes, on_cpu, max_batch)
    runs = _runs(idx)
    if len(runs) > 1 and not (max_batch is None and on_cpu and nbytes > CPU_GATHER_MAX_BYTES):
        runs = [idx]
    return [(run[c : c + step], _selector(run[c : c + step])) for run in runs for c in range(0, len(run), step)]


def _group_encode(model_ae, groups: dict, max_batch, srcs: _Sources):
    """For each group key -> (sample indices, input builder): its encoder calls
    (:func:`_calls`); returns {key: {sample: (source index, latent frames)}}.
    Each sample's latent is a row of its call's output (no concatenation)."""
    out = {}
    for key, (idx, build) in groups.items():
        if not idx:
            continue
        out[key] = {}
        for part, sel in _calls(idx, build, max_batch):
            lat = model_ae.encode(build(sel))
            for j, i in enumerate(part):
                out[key][i] = (srcs.add(lat[j]), lat.shape[2])
    return out


def _assemble(x, model_ae, B, C, T, H, W, x0_groups, ref_groups, segments, max_batch, who):
    """x_0 from its (batched) encodes, cond written by the op from the segments:
    (sample, latent frame, count, ref group key, frame in the encoded ref or None=tail)."""
    x_0 = torch.empty((B, C, T, H, W), dtype=x.dtype, device=x.device)
    for idx, build in x0_groups:
        if not idx:
            continue
        for part, sel in _calls(idx, build, max_batch):
            enc = model_ae.encode(build(sel))
            if enc.shape[1:] != (C, T, H, W):
                raise ValueError(
                    f"{who}: model_ae.encode returned shape {list(enc.shape)}; expected [n, {C}, {T}, {H}, {W}]"
                )
            if part == list(range(part[0], part[0] + len(part))):
                x_0[part[0] : part[0] + len(part)] = enc  # copy_ casts as upstream's x_0[i] = ...
            else:
                x_0[torch.tensor(part, device=x.device)] = enc.to(x.dtype)
    # upstream assigns encodes into x.dtype buffers (copy_): the op's cast is that cast
    srcs = _Sources(x.device, odd_dtype=x.dtype if x.dtype in SRC_DTYPES else torch.float32)
    encoded = _group_encode(model_ae, ref_groups, max_batch, srcs)
    plan: list[int] = []
    x0_src = {}
    for i, t0, n, key, f0 in segments:
        if key == "x_0":  # uncausal v2v: the condition is x_0's own frames
            if i not in x0_src:
                x0_src[i] = srcs.add(x_0[i])
            s, frames = x0_src[i], T
        else:
            s, frames = encoded[key][i]
        if f0 is None:
            f0 = frames - n
        if frames < f0 + n or f0 < 0:
            raise ValueError(
                f"{who}: the {key} encode of sample {i} has {frames} latent frames; the condition needs {n}"
            )
        plan += [i, t0, n, s, f0]
    if _needs_grad(srcs.tensors):
        masks, masked = _condition_with_grad((B, C, T, H, W), x.dtype, x.device, srcs.tensors, plan)
        return x_0, torch.cat([masks, masked], dim=1)
    cond = torch.empty((B, 1 + C, T, H, W), dtype=x.dtype, device=x.device)
    if x.dtype in OUT_DTYPES:
        ops.condition_cat_(cond, srcs.tensors, plan)
    else:  # pragma: no cover - non-float videos: upstream's path in fp32
        tmp = torch.empty((B, 1 + C, T, H, W), dtype=torch.float32, device=x.device)
        ops.condition_cat_(tmp, [s.float() for s in srcs.tensors], plan)
        cond.copy_(tmp)
    return x_0, cond


def _image_case(x, model_ae, B, C, T, H, W, max_batch):
    chunks = _encode_batched(model_ae, x, max_batch)
    x_0 = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return x_0, torch.zeros((B, 1 + C, T, H, W), dtype=x.dtype, device=x.device)


def prepare_visual_condition_causal(
    x: torch.Tensor, condition_config: dict, model_ae: torch.nn.Module, *, max_encode_batch: Optional[int] = None
):
    """Drop-in for upstream's ``prepare_visual_condition_causal``: ``(x_0, cond)``
    with ``cond = cat(masks, masks * latent)`` ``[B, 1 + C, T, H, W]`` in x's dtype
    on x's device; the same draws from Python's ``random`` in the same order, hence
    the same modes per sample.

    Unlike upstream, ``condition_config`` is left untouched (upstream pops the v2v
    modes from the caller's dict for short videos, for every later step), the
    encoder runs once for the whole batch's ``x_0`` (chunks of at most
    ``max_encode_batch`` samples; 0: the whole batch; None, the default: the
    whole batch on a GPU, chunks of about ``CPU_ENCODE_CHUNK_BYTES`` = 6 MiB of
    input on the CPU, where that is faster) and once per kind of reference (first frame, last
    frame, first/last 33 or 65 frames) for all samples that need it, and no
    intermediate ``latent`` tensor is made. Results equal upstream's where the
    encoder is batch-invariant.
    """
    who = "prepare_visual_condition_causal"
    B = x.shape[0]
    C, T, H, W = _latent_config(model_ae, x)
    if T <= 1:
        return _image_case(x, model_ae, B, C, T, H, W, max_encode_batch)
    tcr = model_ae.time_compression_ratio
    modes = _draw_modes(condition_config, B, 32 // tcr + 1, 64 // tcr + 1, T, who)
    refs = {k: [] for k in ("first", "last", "head33", "tail33", "head65", "tail65")}
    segments = []
    for i, m in enumerate(modes):
        if m in ("i2v_head", "i2v_loop"):
            refs["first"].append(i)
            segments.append((i, 0, 1, "first", 0))
        if m in ("i2v_tail", "i2v_loop"):
            refs["last"].append(i)
            segments.append((i, T - 1, 1, "last", 0))
        if "v2v_head" in m or "v2v_tail" in m:
            ref_t = 65 if "easy" in m else 33
            if (ref_t - 1) % tcr != 0:
                raise ValueError(
                    f"{who}: {m} needs (ref_t - 1) % time_compression_ratio == 0 (ref_t={ref_t}, tcr={tcr})"
                )
            ct = (ref_t - 1) // tcr + 1
            key = ("head" if "v2v_head" in m else "tail") + str(ref_t)
            refs[key].append(i)
            segments.append((i, 0 if key.startswith("head") else T - ct, ct, key, 0))
    ref_groups = {
        "first": (refs["first"], lambda idx: x[idx, :, :1]),
        "last": (refs["last"], lambda idx: x[idx, :, -1:]),
        "head33": (refs["head33"], lambda idx: x[idx, :, :33]),
        "tail33": (refs["tail33"], lambda idx: x[idx, :, -33:]),
        "head65": (refs["head65"], lambda idx: x[idx, :, :65]),
        "tail65": (refs["tail65"], lambda idx: x[idx, :, -65:]),
    }
    everyone = list(range(B))
    x0_groups = [(everyone, lambda sel: x[sel])]
    return _assemble(x, model_ae, B, C, T, H, W, x0_groups, ref_groups, segments, max_encode_batch, who)


def prepare_visual_condition_uncausal(
    x: torch.Tensor,
    condition_config: dict,
    model_ae: torch.nn.Module,
    pad: bool = False,
    *,
    max_encode_batch: Optional[int] = None,
):
    """Drop-in for upstream's ``prepare_visual_condition_uncausal`` (same results,
    same draws; see :func:`prepare_visual_condition_causal` for what differs:
    ``condition_config`` untouched, batched encodes, one-pass ``cond``). With
    ``pad=True`` the i2v samples' ``x_0`` come from upstream's padded videos, one
    batched encode per i2v mode."""
    who = "prepare_visual_condition_uncausal"
    B = x.shape[0]
    C, T, H, W = _latent_config(model_ae, x)
    if T <= 1:
        return _image_case(x, model_ae, B, C, T, H, W, max_encode_batch)
    tcr = model_ae.time_compression_ratio
    modes = _draw_modes(condition_config, B, 32 // tcr, 64 // tcr, T, who)
    p = tcr - 1
    first, last, last_pad = [], [], []
    plain, pad_head, pad_loop, pad_tail = [], [], [], []
    segments = []
    for i, m in enumerate(modes):
        if m in ("i2v_head", "i2v_loop"):
            first.append(i)
            segments.append((i, 0, 1, "first", 0))
        if m in ("i2v_tail", "i2v_loop"):
            (last_pad if pad else last).append(i)
            segments.append((i, T - 1, 1, "last_pad" if pad else "last", 0))
        if pad and m == "i2v_head":
            pad_head.append(i)
        elif pad and m == "i2v_loop":
            pad_loop.append(i)
        elif pad and m == "i2v_tail":
            pad_tail.append(i)
        else:
            plain.append(i)
        if m.startswith("v2v"):
            ct = (64 if "easy" in m else 32) // tcr
            if not T > ct:
                raise ValueError(f"{who}: {m} needs more than {ct} latent frames, got T={T}")
            segments.append((i, 0, ct, "x_0", 0) if "head" in m else (i, T - ct, ct, "x_0", T - ct))
    ref_groups = {
        "first": (first, lambda idx: x[idx, :, :1]),
        "last": (last, lambda idx: x[idx, :, -1:]),
        "last_pad": (last_pad, lambda idx: x[idx, :, -p * 2 - 1].unsqueeze(2)),
    }

    def rows(sel):
        return x[sel]

    x0_groups = [
        (plain, rows),
        (pad_head, lambda idx: torch.cat([x[idx, :, :1]] * p + [x[idx, :, :-p]], dim=2)),
        (
            pad_loop,
            lambda idx: torch.cat(
                [x[idx, :, :1]] * p + [x[idx, :, : -p * 2]] + [x[idx, :, -p * 2 - 1].unsqueeze(2)] * p, dim=2
            ),
        ),
        (pad_tail, lambda idx: torch.cat([x[idx, :, p:]] + [x[idx, :, -1:]] * p, dim=2)),
    ]
    return _assemble(x, model_ae, B, C, T, H, W, x0_groups, ref_groups, segments, max_encode_batch, who)


# ---------------------------------------------------------------------------
# References from media files


def collect_references_batch(
    reference_paths: Sequence[str],
    cond_type: str,
    model_ae: torch.nn.Module,
    image_size,
    is_causal: bool = False,
    *,
    max_encode_batch: Optional[int] = None,
):
    """Drop-in for upstream's ``collect_references_batch``: per sample ``None`` (for
    ``""``) or a list of encoded references ``[C, T', H, W]`` (two for i2v_loop).
    Images through Pillow, videos through PyAV (extra ``[video]``), "resize_crop"
    as upstream; each file read once; the encoder called once per group of
    references with the same frame count (chunks of ``max_encode_batch``) instead
    of once per reference. A missing or unreadable file, or a video with too few
    frames, raises naming ``reference_paths[i]``."""
    who = "collect_references_batch"
    kinds = ("v2v", "i2v_head", "i2v_tail", "i2v_loop")
    if not ("v2v" in cond_type or cond_type in kinds):
        raise ValueError(f"{who}: unknown cond_type {cond_type!r}")
    if "v2v" in cond_type and not ("head" in cond_type or "tail" in cond_type):
        raise ValueError(f"{who}: unknown cond_type {cond_type!r} (v2v needs head or tail)")
    param = next(model_ae.parameters())
    device, dtype = param.device, param.dtype
    cache: dict[str, torch.Tensor] = {}

    def read(i: int, path: str) -> torch.Tensor:
        if path not in cache:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{who}: reference_paths[{i}]: no such file {path!r}")
            try:
                cache[path] = read_from_path(path, image_size, transform_name="resize_crop")
            except ImportError:
                raise
            except Exception as e:
                raise ValueError(f"{who}: reference_paths[{i}]: cannot read {path!r}: {e}") from e
        return cache[path]

    wanted: list[tuple[int, int, torch.Tensor]] = []  # (sample, slot, pixels [C, t, H, W])
    slots: list[Optional[list]] = []
    for i, path in enumerate(reference_paths):
        if path == "":
            slots.append(None)
            continue
        parts = path.split(";")
        if "v2v" in cond_type:
            r = read(i, parts[0])
            n = r.shape[1]
            want = (64 if (n >= 64 and "easy" in cond_type) else 32) + int(bool(is_causal))
            if n < want:
                raise ValueError(f"{who}: reference_paths[{i}] has {n} frames; need at least {want} for {cond_type}")
            wanted.append((i, 0, r[:, :want] if "head" in cond_type else r[:, -want:]))
            slots.append([None])
        elif cond_type == "i2v_head":
            wanted.append((i, 0, read(i, parts[0])[:, :1]))
            slots.append([None])
        elif cond_type == "i2v_tail":
            wanted.append((i, 0, read(i, parts[-1])[:, -1:]))
            slots.append([None])
        else:  # i2v_loop
            wanted.append((i, 0, read(i, parts[0])[:, :1]))
            wanted.append((i, 1, read(i, parts[-1])[:, -1:]))
            slots.append([None, None])
    by_shape: dict[tuple, list] = {}
    for item in wanted:
        by_shape.setdefault(tuple(item[2].shape), []).append(item)
    for items in by_shape.values():
        batch = torch.stack([r for _, _, r in items]).to(device, dtype)
        enc = torch.cat(_encode_batched(model_ae, batch, max_encode_batch))
        for j, (i, k, _) in enumerate(items):
            slots[i][k] = enc[j]
    return slots
