"""Conditioning: upstream-faithful ports (opensora_fast.reference) vs a plain-PyTorch
on-device version vs ours (opensora_fast.utils._condition on the fused op).

Inference: prepare_inference_condition at B=4 on 256px/129f latents [4,16,33,24,42]
bf16, modes v2v_head and i2v_loop (causal) with one sample without a reference
(which the call logs, as upstream prints it), and both with every sample
referenced. Bytes:
masks + masked_z written, conditioned reference frames read.

Training: prepare_visual_condition_causal with the tests' toy causal VAE (tcr 4,
/8 spatial, C=16) at B=8, 65 frames, 64x96 pixels, Open-Sora's stage-1 i2v
condition_config plus v2v; the encoder is part of the time. Bytes: x read, x_0
and cond written (nominal)."""

import os
import random
import sys

import pytest
import torch

from benchmarks.common import ROUNDS, bench_device, copy_roofline, run
from opensora_fast import reference
from opensora_fast.utils import _condition as ours

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from condition_helpers import ToyVAE  # noqa: E402

B, C, T, H, W = 4, 16, 33, 24, 42
INF_ROUNDS = max(ROUNDS, 31)  # sub-millisecond calls on a shared VM: more rounds


def on_device_slices(z, mode, refs, causal=True):
    """The obvious plain-PyTorch improvement: buffers on z's device, per-sample slice copies."""
    masks = torch.zeros(B, 1, T, H, W, dtype=z.dtype, device=z.device)
    masked = torch.zeros_like(z)
    for i, ref in enumerate(refs):
        if ref is None:
            continue
        if mode == "i2v_loop":
            masks[i, :, 0] = 1
            masks[i, :, -1] = 1
            masked[i, :, 0] = ref[0][:, 0]
            masked[i, :, -1] = ref[-1][:, -1]
        else:
            k = 8 + int(causal)
            masks[i, :, :k] = 1
            masked[i, :, :k] = ref[0][:, :k]
    return masks, masked


@pytest.fixture(
    scope="module",
    params=[("v2v_head", True), ("i2v_loop", True), ("v2v_head", False), ("i2v_loop", False)],
    ids=["v2v_head-missing", "i2v_loop-missing", "v2v_head-all", "i2v_loop-all"],
)
def inference_case(request):
    """missing: sample 2 has no reference (it falls back to t2v, and the call logs
    that once, as upstream prints it); all: every sample has one."""
    mode, missing = request.param
    dev = bench_device()
    g = torch.Generator(device=dev).manual_seed(0)
    z = torch.randn(B, C, T, H, W, generator=g, device=dev).bfloat16()
    refs = []
    for i in range(B):
        if i == 2 and missing:
            refs.append(None)
        elif mode == "v2v_head":
            refs.append([torch.randn(C, T, H, W, generator=g, device=dev).bfloat16()])
        else:
            refs.append(
                [
                    torch.randn(C, 1, H, W, generator=g, device=dev).bfloat16(),
                    torch.randn(C, 1, H, W, generator=g, device=dev).bfloat16(),
                ]
            )
    frames = (9 if mode == "v2v_head" else 2) * (B - int(missing))
    nbytes = (B * (1 + C) * T * H * W + frames * C * H * W) * 2
    who = "sample 2 without a reference (logged)" if missing else "every sample with a reference"
    group = f"prepare_inference_condition {mode}, [{B},{C},{T},{H},{W}] bf16, {who}, {dev.type}"
    # the results agree bit for bit (tests/test_condition_dropins.py); check once more here
    a, b = (
        ours.prepare_inference_condition(z, mode, refs),
        reference.upstream.condition.prepare_inference_condition(z, mode, refs),
    )
    assert all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))
    return group, mode, z, refs, nbytes, dev


def test_inference_copy(benchmark, inference_case):
    group, mode, z, refs, nbytes, dev = inference_case
    copy_roofline(benchmark, group, nbytes, dev)


def test_inference_upstream(benchmark, inference_case):
    group, mode, z, refs, nbytes, dev = inference_case
    run(
        benchmark,
        lambda: reference.upstream.condition.prepare_inference_condition(z, mode, refs),
        group=group,
        impl="upstream (CPU fp32 buffers)",
        role="baseline",
        nbytes=nbytes,
        rounds=INF_ROUNDS,
    )


def test_inference_on_device_slices(benchmark, inference_case):
    group, mode, z, refs, nbytes, dev = inference_case
    run(
        benchmark,
        lambda: on_device_slices(z, mode, refs),
        group=group,
        impl="plain PyTorch on device",
        role="alternative",
        nbytes=nbytes,
        rounds=INF_ROUNDS,
    )


def test_inference_ours(benchmark, inference_case):
    group, mode, z, refs, nbytes, dev = inference_case
    run(
        benchmark,
        lambda: ours.prepare_inference_condition(z, mode, refs),
        group=group,
        impl="opensora_fast (fused op)",
        role="ours",
        nbytes=nbytes,
        rounds=INF_ROUNDS,
    )


# ---- training -------------------------------------------------------------------------

TRAIN_CONFIG = {"t2v": 1, "i2v_head": 5, "i2v_loop": 1, "i2v_tail": 1, "v2v_head": 1, "v2v_tail": 1}
TB, TF, TH, TW = 8, 65, 64, 96


@pytest.fixture(scope="module")
def train_case():
    dev = bench_device()
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(TB, 3, TF, TH, TW, generator=g, device=dev).bfloat16()
    vae = ToyVAE(C=16, tcr=4, s=8, causal=True).to(dev)
    lt = (TF - 1) // 4 + 1
    nbytes = x.numel() * 2 + TB * (2 * 16 + 1) * lt * (TH // 8) * (TW // 8) * 2
    group = f"prepare_visual_condition_causal, toy VAE, x [{TB},3,{TF},{TH},{TW}] bf16, {dev.type}"
    return group, x, vae, nbytes


def _train_step(fn, x, vae, **kw):
    counter = [0]

    def step():
        random.seed(counter[0] % 5)  # the same 5 draws for both sides
        counter[0] += 1
        fn(x, dict(TRAIN_CONFIG), vae, **kw)

    return step


def test_train_upstream(benchmark, train_case):
    group, x, vae, nbytes = train_case
    run(
        benchmark,
        _train_step(reference.upstream.condition.prepare_visual_condition_causal, x, vae),
        group=group,
        impl="upstream (per-sample encodes)",
        role="baseline",
        nbytes=nbytes,
    )


def test_train_ours(benchmark, train_case):
    """The default: the whole batch per encode on a GPU, ~8 MiB chunks on the CPU."""
    group, x, vae, nbytes = train_case
    run(
        benchmark,
        _train_step(ours.prepare_visual_condition_causal, x, vae),
        group=group,
        impl="opensora_fast (default encodes)",
        role="ours",
        nbytes=nbytes,
    )


def test_train_ours_whole_batch(benchmark, train_case):
    """x_0 in one encode everywhere (max_encode_batch=0): on a CPU the toy
    encoder's passes over the whole batch fall out of cache."""
    group, x, vae, nbytes = train_case
    run(
        benchmark,
        _train_step(ours.prepare_visual_condition_causal, x, vae, max_encode_batch=0),
        group=group,
        impl="opensora_fast (max_encode_batch=0)",
        role="ours+",
        nbytes=nbytes,
    )


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_train_ours_chunks(benchmark, train_case, chunk):
    """The chunk-size sweep behind CPU_ENCODE_CHUNK_BYTES (6 MiB: 2 samples here)."""
    group, x, vae, nbytes = train_case
    run(
        benchmark,
        _train_step(ours.prepare_visual_condition_causal, x, vae, max_encode_batch=chunk),
        group=group,
        impl=f"opensora_fast (max_encode_batch={chunk})",
        role="ours+",
        nbytes=nbytes,
    )


# ---- training, cheap encoder ----------------------------------------------------------


class CheapVAE(torch.nn.Module):
    """An encoder that costs about what its input does: every tcr-th frame
    (causal: frame 0, then one per group), an 8x8 average pool and a 1x1 conv
    to C channels. Here copies of the encoder's inputs show, where a real VAE
    hides them."""

    def __init__(self, C: int = 16, tcr: int = 4, s: int = 8):
        super().__init__()
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(latent_channels=C)
        self.time_compression_ratio, self.s = tcr, s
        self.proj = torch.nn.Conv3d(3, C, 1).requires_grad_(False)

    def get_latent_size(self, size):
        F, H, W = size
        return (F - 1) // self.time_compression_ratio + 1, H // self.s, W // self.s

    @torch.no_grad()
    def encode(self, x):
        y = x[:, :, :: self.time_compression_ratio].to(self.proj.weight.dtype)
        return self.proj(torch.nn.functional.avg_pool3d(y, (1, self.s, self.s)))


CHEAP_CONFIGS = {
    "mixed modes": TRAIN_CONFIG,
    "v2v_tail only": {"v2v_tail": 1},
    # scattered v2v samples: the groups upstream encodes from views, run by run
    "v2v_head/v2v_tail/t2v": {"v2v_head": 1, "v2v_tail": 1, "t2v": 1},
    "i2v_head only": {"i2v_head": 1},
    "t2v only": {"t2v": 1},
}


@pytest.fixture(scope="module", params=list(CHEAP_CONFIGS))
def cheap_case(request):
    dev = bench_device()
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(TB, 3, TF, TH, TW, generator=g, device=dev).bfloat16()
    vae = CheapVAE().to(dev)
    lt = (TF - 1) // 4 + 1
    nbytes = x.numel() * 2 + TB * (2 * 16 + 1) * lt * (TH // 8) * (TW // 8) * 2
    config = CHEAP_CONFIGS[request.param]
    group = (
        f"prepare_visual_condition_causal, cheap encoder, {request.param}, x [{TB},3,{TF},{TH},{TW}] bf16, {dev.type}"
    )
    return group, x, vae, nbytes, config


def _cheap_step(fn, x, vae, config):
    counter = [0]

    def step():
        random.seed(counter[0] % 5)  # the same 5 draws for both sides
        counter[0] += 1
        fn(x, dict(config), vae)

    return step


def test_train_cheap_upstream(benchmark, cheap_case):
    group, x, vae, nbytes, config = cheap_case
    step = _cheap_step(reference.upstream.condition.prepare_visual_condition_causal, x, vae, config)
    run(benchmark, step, group=group, impl="upstream (per-sample encodes)", role="baseline", nbytes=nbytes)


def test_train_cheap_ours(benchmark, cheap_case):
    group, x, vae, nbytes, config = cheap_case
    step = _cheap_step(ours.prepare_visual_condition_causal, x, vae, config)
    run(benchmark, step, group=group, impl="opensora_fast (default encodes)", role="ours", nbytes=nbytes)
