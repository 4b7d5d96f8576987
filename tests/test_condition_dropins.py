"""Conditioning drop-ins vs the step-by-step upstream ports (opensora_fast.reference):
prepare_inference_condition, prepare_visual_condition_causal / _uncausal,
collect_references_batch, add_noise_to_ref."""

import copy
import importlib
import logging
import random
import zlib

import pytest
import torch
from condition_helpers import ToyVAE, videos
from helpers import assert_bitwise_equal

from opensora_fast import reference
from opensora_fast.utils import _condition as dropin

# the upstream port module (reference.upstream.condition)
ref_condition = importlib.import_module("opensora_fast.reference.upstream.condition")

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
    # crc32, not hash(): the same seed in every process (hash() varies with PYTHONHASHSEED)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{mode}/{dtype}/{causal}".encode()))
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
            want = reference.upstream.condition.prepare_inference_condition(z, mode, refs, causal)
        except RuntimeError:
            # upstream crashes when the v2v window k exceeds T < T'; ours takes the
            # first (head) / last (tail) T frames: what upstream does with them trimmed
            k = (16 if mode.endswith("_easy") else 8) + int(causal)
            assert mode.startswith("v2v") and T < k < Tr + 1
            cut = [None if r is None else [x[:, :T] if "head" in mode else x[:, -T:] for x in r] for r in refs]
            want = reference.upstream.condition.prepare_inference_condition(z, mode, cut, causal)
        assert_same(got, want, f"{mode} T={T}")
        if T > 1 and mode != "t2v" and len(none_at) < B:
            assert got[0].any(), "some frame must be conditioned"


def test_inference_b1_and_t2v_without_refs():
    z = torch.randn(1, 4, 9, 3, 3).bfloat16()
    refs = [[torch.randn(4, 9, 3, 3)]]
    for mode in MODES:
        assert_same(
            dropin.prepare_inference_condition(z, mode, refs),
            reference.upstream.condition.prepare_inference_condition(z, mode, refs),
            mode,
        )
    m, mz = dropin.prepare_inference_condition(z, "t2v", None)  # upstream: TypeError here
    assert m.dtype == torch.bfloat16 and not m.any() and not mz.any() and mz.shape == z.shape
    with pytest.raises(TypeError):
        reference.upstream.condition.prepare_inference_condition(z, "t2v", None)


def test_inference_ref_views_and_strides():
    z = torch.randn(2, 4, 20, 5, 6)
    big = torch.randn(6, 20, 5, 8)[:4, 3:, :, 1:7]  # [4, 17, 5, 6], offset and strided
    refs = [[big], [big.transpose(2, 3).contiguous().transpose(2, 3)]]
    for mode in MODES[1:]:
        assert_same(
            dropin.prepare_inference_condition(z, mode, refs, True),
            reference.upstream.condition.prepare_inference_condition(z, mode, refs, True),
            mode,
        )


def test_inference_missing_reference_falls_back_and_logs(caplog, capsys):
    z = torch.randn(3, 4, 6, 2, 2)
    refs = [[torch.randn(4, 6, 2, 2)], None, None]
    with caplog.at_level(logging.WARNING, logger="opensora_fast"):
        got = dropin.prepare_inference_condition(z, "i2v_head", refs)
    assert sum("no reference for sample(s) [1, 2]" in r.getMessage() for r in caplog.records) == 1
    assert_same(got, reference.upstream.condition.prepare_inference_condition(z, "i2v_head", refs), "fallback")
    with pytest.raises(ValueError, match=r"sample\(s\) \[1, 2\]"):
        dropin.prepare_inference_condition(z, "i2v_head", refs, strict=True)


@pytest.mark.parametrize(
    "mode, refs, match",
    [
        ("i2v_sideways", None, "unknown mask_cond 'i2v_sideways'"),
        ("i2v_head", None, "needs ref_list"),
        ("t2v", [None], r"len\(ref_list\) is 1 but z has B=2"),
        (
            "v2v_head",
            [[torch.randn(4, 9, 3, 3)], [torch.randn(4, 8, 3, 3)]],
            r"ref_list\[1\]\[0\] \(sample 1\) has 8 frames; v2v_head needs at least 9",
        ),
        ("v2v_tail_easy", [[torch.randn(4, 17, 3, 3)], [torch.randn(4, 16, 3, 3)]], r"sample 1\) has 16 frames"),
        (
            "i2v_head",
            [[torch.randn(4, 1, 3, 3)], [torch.randn(3, 1, 3, 3)]],
            r"ref_list\[1\]\[0\] \(sample 1\) has shape \[3, 1, 3, 3\]",
        ),
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
    b = reference.upstream.condition.add_noise_to_ref(x, m, 0.3)
    assert_bitwise_equal(a, b)
    assert not torch.equal(a, m * x)


ADD_NOISE_IMPLS = [
    pytest.param(dropin.add_noise_to_ref, id="dropin"),
    pytest.param(reference.upstream.condition.add_noise_to_ref, id="reference"),
]


@pytest.mark.parametrize("add_noise", ADD_NOISE_IMPLS)
@pytest.mark.parametrize(
    "t, sigma_min, want",
    [
        # masks * ((1 - (1 - sigma_min) t) ref + t noise), worked out by hand
        (0.5, 0.0, [0.75, 0.0, -1.0, 2.25]),
        (0.25, 1e-5, [0.8750025, 0.0, -2.50001, 1.37500125]),
        (1.0, 1e-5, [0.50001, 0.0, 1.99996, 4.000005]),
        (0.0, 1e-5, [1.0, 0.0, -4.0, 0.5]),
    ],
)
def test_add_noise_to_ref_formula_written_out(add_noise, t, sigma_min, want, monkeypatch):
    ref = torch.tensor([1.0, 2.0, -4.0, 0.5], dtype=torch.float64)
    noise = torch.tensor([0.5, -1.0, 2.0, 4.0], dtype=torch.float64)
    masks = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    seen = []

    def fixed_noise(like):
        seen.append(like)
        return noise.clone()

    monkeypatch.setattr(torch, "randn_like", fixed_noise)
    got = add_noise(ref, masks, t, sigma_min)
    assert len(seen) == 1 and seen[0] is ref  # noise shaped (and drawn) like masked_ref
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)


def test_add_noise_to_ref_default_sigma_min():
    x, m = torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for fn in (dropin.add_noise_to_ref, reference.upstream.condition.add_noise_to_ref):
        torch.manual_seed(0)
        noise = torch.randn_like(x)
        torch.manual_seed(0)
        torch.testing.assert_close(fn(x, m, 1.0), 1e-5 + noise, rtol=0, atol=1e-12)  # sigma_min = 1e-5


# ---- training -----------------------------------------------------------------------

CONFIG = {
    "t2v": 1,
    "i2v_head": 3,
    "i2v_tail": 2,
    "i2v_loop": 2,
    "v2v_head": 1,
    "v2v_tail": 1,
    "v2v_head_easy": 1,
    "v2v_tail_easy": 1,
}


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
            dropin.prepare_visual_condition_causal,
            reference.upstream.condition.prepare_visual_condition_causal,
            x,
            CONFIG,
            lambda: ToyVAE(causal=True),
            seed,
        )
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
    for budget, chunk_arg, want in (
        (3 * per_sample + 1, None, [3, 3, 2]),
        (per_sample - 1, None, [1] * 8),
        (per_sample - 1, 0, [8]),
        (1 << 40, None, [8]),
    ):
        monkeypatch.setattr(_condition, "CPU_ENCODE_CHUNK_BYTES", budget)
        vae = ToyVAE()
        random.seed(1)
        outs[(budget, chunk_arg)] = dropin.prepare_visual_condition_causal(
            x, dict(CONFIG), vae, max_encode_batch=chunk_arg
        )
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
            dropin.prepare_visual_condition_uncausal,
            reference.upstream.condition.prepare_visual_condition_uncausal,
            x,
            CONFIG,
            lambda: ToyVAE(causal=False),
            seed,
            pad=pad,
        )
        assert_bitwise_equal(x0, x0_r, f"x_0 F={F}")
        assert_bitwise_equal(cond, cond_r, f"cond F={F}")
        if F > 1:
            assert len(calls) <= 4 + 3 and len(calls) < len(calls_r)


def test_uncausal_bf16_model_fp16_video():
    x = videos(5, 40, 4, 4, torch.float16, seed=1)
    (x0, cond), (x0_r, cond_r), *_ = run_both(
        dropin.prepare_visual_condition_uncausal,
        reference.upstream.condition.prepare_visual_condition_uncausal,
        x,
        CONFIG,
        lambda: ToyVAE(causal=False, dtype=torch.bfloat16),
        5,
        pad=True,
    )
    assert_bitwise_equal(x0, x0_r)
    assert_bitwise_equal(cond, cond_r)


def test_training_bad_config():
    x = videos(2, 9, 4, 4)
    with pytest.raises(ValueError, match="no mode left for T=3"):
        dropin.prepare_visual_condition_causal(x, {"v2v_head": 1}, ToyVAE())
    with pytest.raises(ValueError, match="unknown mask condition 'i2v_middle' drawn for sample 0"):
        dropin.prepare_visual_condition_causal(x, {"i2v_middle": 1}, ToyVAE())


# ---- v2v thresholds, B = 0, fp64: expectations written out, not computed ------------

FULL = ["t2v", "i2v_head", "i2v_tail", "i2v_loop", "v2v_head", "v2v_tail", "v2v_head_easy", "v2v_tail_easy"]
NO_V2V = FULL[:4]
NO_EASY = FULL[:6]


@pytest.mark.parametrize(
    "T, want",
    # short = 9, long = 17: every v2v mode goes at T <= short, the easy ones at T <= long
    [(1, NO_V2V), (9, NO_V2V), (10, NO_EASY), (16, NO_EASY), (17, NO_EASY), (18, FULL)],
)
def test_v2v_drop_rule_at_the_boundaries(T, want):
    ours = dropin._modes_for_length(dict(CONFIG), T, 9, 17)
    assert list(ours) == want and all(ours[k] == CONFIG[k] for k in ours)
    cfg = dict(CONFIG)
    ref_condition._drop_v2v(cfg, T, 9, 17)
    assert list(cfg) == want
    # keys that merely contain "v2v" are not upstream's to drop
    assert "v2v_head_x" in dropin._modes_for_length({"v2v_head_x": 1}, 1, 9, 17)


# (causal, F frames, T latent frames at tcr 4, modes left): causal drops at T <= 32//4+1 = 9
# and T <= 64//4+1 = 17; uncausal at T <= 32//4 = 8 and T <= 64//4 = 16
BOUNDARIES = [
    (True, 33, 9, NO_V2V),
    (True, 37, 10, NO_EASY),
    (True, 65, 17, NO_EASY),
    (True, 69, 18, FULL),
    (False, 32, 8, NO_V2V),
    (False, 36, 9, NO_EASY),
    (False, 64, 16, NO_EASY),
    (False, 68, 17, FULL),
]


@pytest.mark.parametrize("causal, F, T, want", BOUNDARIES)
def test_v2v_thresholds_reference(causal, F, T, want):
    vae = ToyVAE(causal=causal)
    assert vae.get_latent_size((F, 4, 4))[0] == T
    fn = (
        reference.upstream.condition.prepare_visual_condition_causal
        if causal
        else reference.upstream.condition.prepare_visual_condition_uncausal
    )
    cfg = dict(CONFIG)
    random.seed(0)
    fn(videos(1, F, 4, 4), cfg, vae)
    assert list(cfg) == want  # upstream pops from the caller's dict


@pytest.mark.parametrize("causal, F, T, want", BOUNDARIES)
def test_v2v_thresholds_dropin(causal, F, T, want):
    fn = dropin.prepare_visual_condition_causal if causal else dropin.prepare_visual_condition_uncausal
    x = videos(1, F, 4, 4)
    # the mode removed at this T, alone in the config: no mode left; one that stays: drawn
    for mode in ("v2v_head", "v2v_tail_easy"):
        if mode in want:
            random.seed(0)
            _, cond = fn(x, {mode: 1}, ToyVAE(causal=causal))
            assert cond[0, 0].any(), (mode, T)
        else:
            with pytest.raises(ValueError, match=f"no mode left for T={T} latent frames"):
                fn(x, {mode: 1}, ToyVAE(causal=causal))


@pytest.mark.parametrize("impl", ["dropin", "reference"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("F", [1, 9])
def test_training_empty_batch(impl, causal, F):
    """B = 0, as upstream: empty tensors (an image batch still goes through one
    encode, whose dtype x_0 keeps; a video's x_0 is in x's dtype)."""
    mod = dropin if impl == "dropin" else reference.upstream.condition
    fn = mod.prepare_visual_condition_causal if causal else mod.prepare_visual_condition_uncausal
    vae = ToyVAE(causal=causal, dtype=torch.bfloat16)
    x = videos(0, F, 8, 8)
    random.seed(0)
    x_0, cond = fn(x, dict(CONFIG), vae)
    T = 1 if F == 1 else 3
    assert x_0.shape == (0, 4, T, 4, 4) and cond.shape == (0, 5, T, 4, 4)
    assert x_0.dtype == (torch.bfloat16 if F == 1 else torch.float32) and cond.dtype == torch.float32
    assert vae.calls == ([(0, 3, 1, 8, 8)] if F == 1 else [])


# fp64 values and what fp32 makes of them: 1/3 -> 0x1.555556p-2, 1 + 2^-40 -> 1,
# 1e-50 -> 0 (underflow), 1e39 -> inf (overflow)
F64_VALUES = [1 / 3, 1 + 2**-40, 1e-50, 1e39]
F64_THROUGH_F32 = [0.3333333432674408, 1.0, 0.0, float("inf")]


@pytest.mark.parametrize("impl", ["dropin", "reference"])
@pytest.mark.parametrize("zdtype", [torch.float64, torch.float32])
def test_inference_fp64_refs_go_through_fp32(impl, zdtype):
    """Upstream copies references into fp32 buffers, then casts to z's dtype: an
    fp64 reference is rounded to fp32 even for an fp64 z."""
    fn = (dropin if impl == "dropin" else reference.upstream.condition).prepare_inference_condition
    z = torch.zeros(1, 1, 3, 1, 4, dtype=zdtype)
    ref = torch.tensor(F64_VALUES, dtype=torch.float64).view(1, 1, 1, 4)
    masks, masked = fn(z, "i2v_head", [[ref]])
    assert masked.dtype == zdtype and masks.dtype == zdtype
    want = torch.tensor(F64_THROUGH_F32, dtype=zdtype)
    assert torch.equal(masked[0, 0, 0, 0], want), masked[0, 0, 0, 0].tolist()
    assert not masked[0, :, 1:].any() and masks[0, 0, 0].all() and not masks[0, 0, 1:].any()


class PassVAE(torch.nn.Module):
    """Keeps every tcr-th frame of its input, nothing else: the latents are the
    pixels themselves, so no arithmetic hides a rounding."""

    def __init__(self, causal=True, tcr=4):
        super().__init__()
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(latent_channels=3)
        self.time_compression_ratio, self.causal = tcr, causal

    def get_latent_size(self, size):
        F, H, W = size
        tcr = self.time_compression_ratio
        return ((F - 1) // tcr + 1 if self.causal else -(-F // tcr)), H, W

    def encode(self, x):
        return x[:, :, :: self.time_compression_ratio].clone()


@pytest.mark.parametrize("impl", ["dropin", "reference"])
@pytest.mark.parametrize("causal", [True, False])
def test_training_fp64_latents_not_rounded(impl, causal):
    """Training keeps the encoder's fp64 latents as they are (upstream assigns them
    into x.dtype buffers: no fp32 on the way)."""
    mod = dropin if impl == "dropin" else reference.upstream.condition
    fn = mod.prepare_visual_condition_causal if causal else mod.prepare_visual_condition_uncausal
    x = torch.zeros(2, 3, 9, 1, 4, dtype=torch.float64)
    x[:, 1, 0, 0] = torch.tensor(F64_VALUES, dtype=torch.float64)
    random.seed(0)
    x_0, cond = fn(x, {"i2v_head": 1}, PassVAE(causal))
    want = torch.tensor(F64_VALUES, dtype=torch.float64)
    assert cond.dtype == torch.float64 and x_0.dtype == torch.float64
    for b in range(2):
        assert torch.equal(cond[b, 2, 0, 0], want), cond[b, 2, 0, 0].tolist()  # channel 1 of the latent
        assert torch.equal(x_0[b, 1, 0, 0], want)
        assert cond[b, 0, 0].all() and not cond[b, 0, 1:].any()


# ---- sources that require grad (an encoder that is not frozen) --------------------


def test_inference_refs_that_require_grad_give_upstreams_gradients():
    """The op refuses sources that require grad; the drop-in then takes an
    autograd-tracked path, with upstream's values and gradients."""
    ref_impl = importlib.import_module("opensora_fast.reference.upstream.condition")
    from opensora_fast.utils.inference import prepare_inference_condition

    g = torch.Generator().manual_seed(7)
    z = torch.randn(2, 3, 12, 4, 6, generator=g)
    for mode in ("i2v_loop", "v2v_head", "i2v_tail"):
        refs_a = [[torch.randn(3, 12, 4, 6, generator=g).requires_grad_()] for _ in range(2)]
        refs_b = [[r[0].detach().clone().requires_grad_()] for r in refs_a]
        w = torch.randn(2, 3, 12, 4, 6, generator=g)
        ma, za = prepare_inference_condition(z, mode, refs_a)
        mb, zb = ref_impl.prepare_inference_condition(z, mode, refs_b)
        assert torch.equal(ma, mb.to(ma.device)) and torch.equal(za, zb.to(za.device))
        (za * w).sum().backward()
        (zb * w).sum().backward()
        for a, b in zip(refs_a, refs_b):
            assert a[0].grad is not None and torch.equal(a[0].grad, b[0].grad), mode


def test_training_encoder_that_requires_grad_gives_gradients():
    ref_impl = importlib.import_module("opensora_fast.reference.upstream.condition")
    from opensora_fast.utils.train import prepare_visual_condition_causal

    cfg = {"i2v_head": 0.5, "i2v_loop": 0.5}
    x = videos(3, 9)
    grads = []
    for fn in (prepare_visual_condition_causal, ref_impl.prepare_visual_condition_causal):
        vae = ToyVAE()
        vae.w.requires_grad_(True)  # an encoder that is not frozen
        vae.encode = ToyVAE.encode.__wrapped__.__get__(vae)  # and tracks its graph
        random.seed(0)
        x0, cond = fn(x, dict(cfg), vae)
        (x0.sum() + cond.sum()).backward()
        assert vae.w.grad is not None and vae.w.grad.abs().sum() > 0
        grads.append((x0.detach(), cond.detach(), vae.w.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert torch.allclose(grads[0][2], grads[1][2], rtol=1e-6)


class _ViewSpy(ToyVAE):
    """Records, per encode, whether its input is a view of the batch ``x``."""

    def __init__(self, x, **kw):
        super().__init__(**kw)
        self.x_ptr, self.views = x.untyped_storage().data_ptr(), []

    def encode(self, inp):
        self.views.append(inp.untyped_storage().data_ptr() == self.x_ptr)
        return super().encode(inp)


@pytest.mark.parametrize("mode", ["v2v_tail_easy", "v2v_head", "i2v_loop"])
def test_consecutive_samples_are_encoded_from_views(mode):
    # upstream encodes views of x; a group of consecutive samples is one slice, not a gathered copy
    x = videos(4, 69, 4, 4)
    vae = _ViewSpy(x)
    x0, cond = dropin.prepare_visual_condition_causal(x, {mode: 1}, vae)
    assert len(vae.views) >= 2 and all(vae.views), vae.views
    random.seed(0)
    x0_r, cond_r = reference.upstream.condition.prepare_visual_condition_causal(x, {mode: 1}, ToyVAE())
    assert_bitwise_equal(x0, x0_r, "x_0")
    assert_bitwise_equal(cond, cond_r, "cond")


def _runs_of(idx):
    runs = []
    for i in idx:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


@pytest.mark.parametrize("mode", ["v2v_head", "v2v_tail"])
def test_cpu_scattered_groups_encode_runs_from_views(monkeypatch, mode):
    """A non-consecutive group on the CPU (default chunks): runs of consecutive
    samples from views when a sample's input exceeds CPU_GATHER_MAX_BYTES, one
    gathered batch at or below it (and with an explicit max_encode_batch).
    Results the same every way, and upstream's."""
    from opensora_fast.utils import _condition

    B, F = 8, 69
    x = videos(B, F, 4, 4)
    config = {mode: 1, "t2v": 1}
    seed = next(s for s in range(100) if len(_runs_of(_drawn(config, B, s, mode))) >= 3)
    idx = _drawn(config, B, seed, mode)
    per_sample = 3 * 33 * 4 * 4 * x.element_size()  # the 33-frame reference input of one sample
    random.seed(seed)
    want = reference.upstream.condition.prepare_visual_condition_causal(x, dict(config), ToyVAE())
    for limit, kw, expect in (
        (per_sample - 1, {}, [(len(r), True) for r in _runs_of(idx)]),
        (per_sample, {}, [(len(idx), False)]),
        (per_sample - 1, {"max_encode_batch": 0}, [(len(idx), False)]),
    ):
        monkeypatch.setattr(_condition, "CPU_GATHER_MAX_BYTES", limit)
        vae = _ViewSpy(x)
        random.seed(seed)
        got = dropin.prepare_visual_condition_causal(x, dict(config), vae, **kw)
        refs = [(c[0], v) for c, v in zip(vae.calls, vae.views) if c[2] == 33]
        assert refs == expect, (limit, kw, idx, vae.calls)
        assert_bitwise_equal(got[0], want[0], "x_0")
        assert_bitwise_equal(got[1], want[1], "cond")


def _drawn(config, B, seed, mode):
    random.seed(seed)
    return [i for i, m in enumerate(random.choices(list(config), weights=list(config.values()), k=B)) if m == mode]


def test_run_splitting_respects_chunks(monkeypatch):
    """Runs longer than a chunk are chunked; chunk and run boundaries both cut."""
    from opensora_fast.utils import _condition

    x = videos(8, 9, 4, 4)
    per_sample = x[0].numel() * x.element_size()
    monkeypatch.setattr(_condition, "CPU_GATHER_MAX_BYTES", 0)
    monkeypatch.setattr(_condition, "CPU_ENCODE_CHUNK_BYTES", 2 * per_sample)
    calls = _condition._calls([0, 1, 2, 4, 6, 7], lambda sel: x[sel], None)
    assert calls == [([0, 1], slice(0, 2)), ([2], slice(2, 3)), ([4], slice(4, 5)), ([6, 7], slice(6, 8))]
    monkeypatch.setattr(_condition, "CPU_GATHER_MAX_BYTES", per_sample)
    calls = _condition._calls([0, 1, 2, 4, 6, 7], lambda sel: x[sel], None)
    assert calls == [([0, 1], slice(0, 2)), ([2, 4], [2, 4]), ([6, 7], slice(6, 8))]  # gathered only where needed
