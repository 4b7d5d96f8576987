"""Conditioning drop-ins vs the step-by-step upstream ports (opensora_fast.reference):
prepare_inference_condition, prepare_visual_condition_causal / _uncausal,
collect_references_batch, add_noise_to_ref."""
import copy
import logging
import random

import pytest
import torch

from opensora_fast import reference
from opensora_fast.utils import _condition as dropin

from condition_helpers import ToyVAE, videos
from helpers import assert_bitwise_equal

MODES = ["t2v", "i2v_head", "i2v_tail", "i2v_loop", "v2v_head", "v2v_tail", "v2v_head_easy", "v2v_tail_easy"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_refs(B, C, H, W, Tr, gen, none_at=(), dtype=torch.float32, two=False):
    refs = []
    for i in range(B):
        if i in none_at:
            refs.append(None)
            continue
        a = torch.randn(C, Tr, H, W, generator=gen).to(dtype)
        refs.append([a, torch.randn(C, Tr + 1, H, W, generator=gen).to(dtype)] if two else [a])
    return refs


def assert_same(got, want, what):
    for g, w, name in zip(got, want, ("masks", "masked_z")):
        assert g.device == w.device, f"{what}: {name} device"
        assert_bitwise_equal(g, w, f"{what}: {name}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_inference_parity_every_mode(mode, dtype, causal):
    gen = torch.Generator().manual_seed(hash((mode, str(dtype), causal)) % 2**31)
    B, C, H, W = 3, 4, 5, 6
    for T, Tr, none_at, two, rdt in [
        (20, 20, (), False, torch.float32),  # T > 17: every v2v window fits
        (12, 20, (1,), True, torch.bfloat16),  # None mixed in; two refs (i2v_loop uses the last one)
        (1, 20, (), False, torch.float32),  # T = 1: nothing is conditioned
        (5, 5, (0, 2), False, torch.float64),  # v2v window clipped to T; fp64 refs go through fp32
        (30, 17 + int(causal), (), True, torch.float16),  # the exact minimum for the easy modes
    ]:
        z = torch.randn(B, C, T, H, W, generator=gen).to(dtype)
        refs = make_refs(B, C, H, W, Tr, gen, none_at, rdt, two)
        got = dropin.prepare_inference_condition(z, mode, refs, causal)
        try:
            want = reference.prepare_inference_condition(z, mode, refs, causal)
        except RuntimeError:
            # upstream crashes when the v2v window k exceeds T < T'; ours takes the
            # first (head) / last (tail) T frames: what upstream does with them trimmed
            k = (16 if mode.endswith("_easy") else 8) + int(causal)
            assert mode.startswith("v2v") and T < k < Tr + 1
            cut = [None if r is None else [x[:, :T] if "head" in mode else x[:, -T:] for x in r] for r in refs]
            want = reference.prepare_inference_condition(z, mode, cut, causal)
        assert_same(got, want, f"{mode} T={T}")
        if T > 1 and mode != "t2v" and len(none_at) < B:
            assert got[0].any(), "some frame must be conditioned"


def test_inference_b1_and_t2v_without_refs():
    z = torch.randn(1, 4, 9, 3, 3).bfloat16()
    refs = [[torch.randn(4, 9, 3, 3)]]
    for mode in MODES:
        assert_same(dropin.prepare_inference_condition(z, mode, refs),
                    reference.prepare_inference_condition(z, mode, refs), mode)
    m, mz = dropin.prepare_inference_condition(z, "t2v", None)  # upstream: TypeError here
    assert m.dtype == torch.bfloat16 and not m.any() and not mz.any() and mz.shape == z.shape
    with pytest.raises(TypeError):
        reference.prepare_inference_condition(z, "t2v", None)


def test_inference_ref_views_and_strides():
    z = torch.randn(2, 4, 20, 5, 6)
    big = torch.randn(6, 20, 5, 8)[:4, 3:, :, 1:7]  # [4, 17, 5, 6], offset and strided
    refs = [[big], [big.transpose(2, 3).contiguous().transpose(2, 3)]]
    for mode in MODES[1:]:
        assert_same(dropin.prepare_inference_condition(z, mode, refs, True),
                    reference.prepare_inference_condition(z, mode, refs, True), mode)


def test_inference_missing_reference_falls_back_and_logs(caplog, capsys):
    z = torch.randn(3, 4, 6, 2, 2)
    refs = [[torch.randn(4, 6, 2, 2)], None, None]
    with caplog.at_level(logging.WARNING, logger="opensora_fast"):
        got = dropin.prepare_inference_condition(z, "i2v_head", refs)
    assert sum("no reference for sample(s) [1, 2]" in r.getMessage() for r in caplog.records) == 1
    assert_same(got, reference.prepare_inference_condition(z, "i2v_head", refs), "fallback")
    with pytest.raises(ValueError, match=r"sample\(s\) \[1, 2\]"):
        dropin.prepare_inference_condition(z, "i2v_head", refs, strict=True)


@pytest.mark.parametrize(
    "mode, refs, match",
    [
        ("i2v_sideways", None, "unknown mask_cond 'i2v_sideways'"),
        ("i2v_head", None, "needs ref_list"),
        ("t2v", [None], r"len\(ref_list\) is 1 but z has B=2"),
        ("v2v_head", [[torch.randn(4, 9, 3, 3)], [torch.randn(4, 8, 3, 3)]], r"ref_list\[1\]\[0\] \(sample 1\) has 8 frames; v2v_head needs at least 9"),
        ("v2v_tail_easy", [[torch.randn(4, 17, 3, 3)], [torch.randn(4, 16, 3, 3)]], r"sample 1\) has 16 frames"),
        ("i2v_head", [[torch.randn(4, 1, 3, 3)], [torch.randn(3, 1, 3, 3)]], r"ref_list\[1\]\[0\] \(sample 1\) has shape \[3, 1, 3, 3\]"),
        ("i2v_tail", [[torch.randn(4, 1, 3, 3)], [torch.randn(4, 1, 3, 4)]], r"\(sample 1\) has shape \[4, 1, 3, 4\]"),
        ("i2v_loop", [[torch.randn(4, 2, 3, 3)], []], r"ref_list\[1\] \(sample 1\) is empty"),
        ("i2v_head", [[torch.randn(4, 0, 3, 3)], None], r"\(sample 0\) has 0 frames"),
    ],
)
def test_inference_bad_input(mode, refs, match):
    z = torch.randn(2, 4, 20, 3, 3)
    with pytest.raises(ValueError, match=match):
        dropin.prepare_inference_condition(z, mode, refs)


def test_add_noise_to_ref_same_draws():
    x, m = torch.randn(2, 4, 3, 5, 5), (torch.rand(2, 1, 3, 5, 5) > 0.5).float()
    torch.manual_seed(3)
    a = dropin.add_noise_to_ref(x, m, 0.3)
    torch.manual_seed(3)
    b = reference.add_noise_to_ref(x, m, 0.3)
    assert_bitwise_equal(a, b)
    assert not torch.equal(a, m * x)


# ---- training -----------------------------------------------------------------------

CONFIG = {"t2v": 1, "i2v_head": 3, "i2v_tail": 2, "i2v_loop": 2, "v2v_head": 1, "v2v_tail": 1,
          "v2v_head_easy": 1, "v2v_tail_easy": 1}


def run_both(fn_ours, fn_ref, x, config, vae_factory, seed, **kw):
    """Same seed for both; returns (ours, ref, ours' encoder calls, ref's calls)."""
    ours_vae, ref_vae = vae_factory(), vae_factory()
    cfg_ours, cfg_ref = copy.deepcopy(config), copy.deepcopy(config)
    random.seed(seed)
    got = fn_ours(x, cfg_ours, ours_vae, **kw)
    after_ours = random.random()
    random.seed(seed)
    want = fn_ref(x, cfg_ref, ref_vae, **{k: v for k, v in kw.items() if k == "pad"})
    assert random.random() == after_ours, "the drop-in must consume Python's random exactly as upstream"
    assert cfg_ours == config, "condition_config must be left untouched"
    return got, want, ours_vae.calls, ref_vae.calls, cfg_ref


def test_random_choices_k_equals_k1_calls():
    opts, w = list(CONFIG), list(CONFIG.values())
    random.seed(11)
    one = random.choices(opts, weights=w, k=37)
    random.seed(11)
    many = [random.choices(opts, weights=w, k=1)[0] for _ in range(37)]
    assert one == many and len(set(one)) > 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("F", [69, 65, 33, 9, 1])  # T = 18 (all modes), 17 (no easy), 9 (no v2v), 3, image
def test_causal_parity(dtype, F):
    B = 6
    x = videos(B, F, 8, 6, dtype, seed=F)
    for seed in range(3):
        (x0, cond), (x0_r, cond_r), calls, calls_r, cfg_r = run_both(
            dropin.prepare_visual_condition_causal, reference.prepare_visual_condition_causal,
            x, CONFIG, lambda: ToyVAE(causal=True), seed)
        assert x0.dtype == x0_r.dtype and x0.device == x0_r.device
        assert_bitwise_equal(x0, x0_r, f"x_0 F={F}")
        assert_bitwise_equal(cond, cond_r, f"cond F={F}")
        assert len(calls) <= 1 + 6 and len(calls) < len(calls_r) or F == 1
        if F == 1:
            assert len(calls) == 1 and not cond.any()
        else:
            assert cond[:, 0].any() and cond[:, 1:].any()
        if F <= 65 and F > 1:
            assert "v2v_head_easy" not in cfg_r  # upstream mutated its copy; ours did not


def test_causal_encoder_calls_are_batched():
    B = 8
    x = videos(B, 69, 4, 4)
    for seed in range(4):
        random.seed(seed)
        modes = random.choices(list(CONFIG), weights=list(CONFIG.values()), k=B)
        vae = ToyVAE()
        random.seed(seed)
        dropin.prepare_visual_condition_causal(x, dict(CONFIG), vae)
        kinds = set()
        for m in modes:
            if m in ("i2v_head", "i2v_loop"):
                kinds.add("first")
            if m in ("i2v_tail", "i2v_loop"):
                kinds.add("last")
            if m.startswith("v2v"):
                kinds.add(m.replace("_easy", "65"))
        assert len(vae.calls) == 1 + len(kinds), (modes, vae.calls)
        assert vae.calls[0] == (B, 3, 69, 4, 4)  # the whole batch's x_0 in one encode
    vae = ToyVAE()
    random.seed(0)
    dropin.prepare_visual_condition_causal(x, dict(CONFIG), vae, max_encode_batch=3)
    assert [c[0] for c in vae.calls[:3]] == [3, 3, 2] and all(c[0] <= 3 for c in vae.calls)


def test_cpu_default_chunks_by_bytes(monkeypatch):
    """max_encode_batch=None on the CPU: chunks of CPU_ENCODE_CHUNK_BYTES of input
    (at least one sample); 0 forces the whole batch. Same results either way."""
    from opensora_fast.utils import _condition

    B = 8
    x = videos(B, 69, 4, 4)
    per_sample = x[0].numel() * x.element_size()
    outs = {}
    for budget, chunk_arg, want in ((3 * per_sample + 1, None, [3, 3, 2]), (per_sample - 1, None, [1] * 8),
                                    (per_sample - 1, 0, [8]), (1 << 40, None, [8])):
        monkeypatch.setattr(_condition, "CPU_ENCODE_CHUNK_BYTES", budget)
        vae = ToyVAE()
        random.seed(1)
        outs[(budget, chunk_arg)] = dropin.prepare_visual_condition_causal(x, dict(CONFIG), vae,
                                                                           max_encode_batch=chunk_arg)
        assert [c[0] for c in vae.calls[: len(want)]] == want, (budget, chunk_arg, vae.calls)
    first = next(iter(outs.values()))
    for got in outs.values():
        for a, b in zip(got, first):
            assert torch.equal(a, b)


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("F", [72, 64, 20, 1])  # T = 18, 16 (no easy), 5 (no v2v), image
def test_uncausal_parity(pad, F):
    B = 7
    x = videos(B, F, 6, 8, torch.float32, seed=F)
    for seed in range(3):
        (x0, cond), (x0_r, cond_r), calls, calls_r, _ = run_both(
            dropin.prepare_visual_condition_uncausal, reference.prepare_visual_condition_uncausal,
            x, CONFIG, lambda: ToyVAE(causal=False), seed, pad=pad)
        assert_bitwise_equal(x0, x0_r, f"x_0 F={F}")
        assert_bitwise_equal(cond, cond_r, f"cond F={F}")
        if F > 1:
            assert len(calls) <= 4 + 3 and len(calls) < len(calls_r)


def test_uncausal_bf16_model_fp16_video():
    x = videos(5, 40, 4, 4, torch.float16, seed=1)
    (x0, cond), (x0_r, cond_r), *_ = run_both(
        dropin.prepare_visual_condition_uncausal, reference.prepare_visual_condition_uncausal,
        x, CONFIG, lambda: ToyVAE(causal=False, dtype=torch.bfloat16), 5, pad=True)
    assert_bitwise_equal(x0, x0_r)
    assert_bitwise_equal(cond, cond_r)


def test_training_bad_config():
    x = videos(2, 9, 4, 4)
    with pytest.raises(ValueError, match="no mode left for T=3"):
        dropin.prepare_visual_condition_causal(x, {"v2v_head": 1}, ToyVAE())
    with pytest.raises(ValueError, match="unknown mask condition 'i2v_middle' drawn for sample 0"):
        dropin.prepare_visual_condition_causal(x, {"i2v_middle": 1}, ToyVAE())
