"""opensora_fast.utils.sampling against ports of upstream (opensora/utils/sampling.py at 7ad6a96).
The pack/unpack port uses reshape/permute, independent of einops."""

import math
from dataclasses import replace

import pytest
import torch

from opensora_fast.utils import sampling as S
from opensora_fast.utils.inference import SamplingMethod

# ---------------------------------------------------------------- reference ports


def ref_pack(x, p=2):
    b, c, t, H, W = x.shape
    h, w = H // p, W // p
    return x.reshape(b, c, t, h, p, w, p).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, t * h * w, c * p * p)


def ref_unpack(x, h, w, t, p=2):
    b, n, cpp = x.shape
    c = cpp // (p * p)
    return x.reshape(b, t, h, w, c, p, p).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, t, h * p, w * p)


def ref_time_shift(alpha, t):
    return alpha * t / (1 + (alpha - 1) * t)


def ref_schedule(num_steps, seq_len, num_frames, shift_alpha=None, base_shift=1, max_shift=3, shift=True):
    ts = torch.linspace(1, 0, num_steps + 1)
    if shift:
        if shift_alpha is None:
            m = (max_shift - base_shift) / (4096 - 256)
            b = base_shift - m * 256
            shift_alpha = (m * seq_len + b) * math.sqrt(num_frames)
        ts = ref_time_shift(shift_alpha, ts)
    return ts.tolist()


def ref_osc(gs, i, force_num=10):
    if i < force_num or (i >= force_num and i % 2 == 0):
        return gs
    return 1.0


# ---------------------------------------------------------------- options


def test_sampling_option_defaults():
    o = S.SamplingOption()
    assert (o.width, o.height, o.num_frames, o.num_steps, o.guidance, o.shift) == (None, None, 1, 50, 4.0, True)
    assert o.method is SamplingMethod.I2V and o.temporal_reduction == 1 and o.flow_shift is None


def test_sanitize_sampling_option():
    o = S.sanitize_sampling_option(S.SamplingOption(resolution="256px", aspect_ratio="16:9", method="distill"))
    assert (o.height, o.width) == (192, 336) and o.method is SamplingMethod.DISTILLED
    o = S.sanitize_sampling_option(S.SamplingOption(height=100, width=96))
    assert (o.height, o.width) == (112, 96)  # rounded up to multiples of 16
    o = S.sanitize_sampling_option(S.SamplingOption(height=1, width=17))
    assert (o.height, o.width) == (16, 32)
    src = S.SamplingOption(height=100, width=100)
    assert S.sanitize_sampling_option(src) is not src and src.height == 100
    with pytest.raises(ValueError, match="aspect_ratio=None"):
        S.sanitize_sampling_option(S.SamplingOption(resolution="256px"))
    with pytest.raises(ValueError, match="width=None"):
        S.sanitize_sampling_option(S.SamplingOption(height=64))
    with pytest.raises(ValueError, match="'ddpm'"):
        S.sanitize_sampling_option(S.SamplingOption(height=64, width=64, method="ddpm"))


@pytest.mark.parametrize("force_num", [0, 1, 10])
def test_oscillation(force_num):
    for i in range(25):
        assert S.get_oscillation_gs(7.5, i, force_num) == ref_osc(7.5, i, force_num)
    assert [S.get_oscillation_gs(3.0, i) for i in (9, 10, 11, 12)] == [3.0, 3.0, 1.0, 3.0]


# ---------------------------------------------------------------- schedules


def test_time_shift_and_line():
    f = S.get_res_lin_function()
    assert f(256) == 1.0 and f(4096) == pytest.approx(3.0) and f(2176) == pytest.approx(2.0)
    t = torch.linspace(0, 1, 7)
    assert torch.equal(S.time_shift(3.0, t), ref_time_shift(3.0, t))
    assert S.time_shift(2.0, torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize(
    "args",
    [
        dict(num_steps=50, seq_len=8316 // 33, num_frames=33),
        dict(num_steps=1, seq_len=4096, num_frames=1),
        dict(num_steps=30, seq_len=1000, num_frames=1, shift_alpha=5.0),
        dict(num_steps=10, seq_len=1000, num_frames=9, shift=False),
        dict(num_steps=7, seq_len=256, num_frames=4, base_shift=0.5, max_shift=1.15),
    ],
)
def test_get_schedule(args):
    a = dict(args)
    seq_len = a.pop("seq_len")
    got = S.get_schedule(a.pop("num_steps"), seq_len, a.pop("num_frames"), **a)
    want = ref_schedule(
        args["num_steps"],
        seq_len,
        args["num_frames"],
        **{k: v for k, v in args.items() if k not in ("num_steps", "seq_len", "num_frames")},
    )
    assert got == want and len(got) == args["num_steps"] + 1 and got[0] == 1.0 and got[-1] == 0.0


def test_get_noise(monkeypatch):
    monkeypatch.delenv("AE_SPATIAL_COMPRESSION", raising=False)
    z = S.get_noise(2, 192, 336, 5, torch.device("cpu"), torch.float32, seed=3)
    assert z.shape == (2, 16, 5, 24, 42)  # 2 * ceil(192/16), 2 * ceil(336/16)
    want = torch.randn(2, 16, 5, 24, 42, generator=torch.Generator().manual_seed(3))
    assert torch.equal(z, want)
    z = S.get_noise(1, 100, 50, 1, torch.device("cpu"), torch.float64, seed=0, patch_size=1, channel=4)
    assert z.shape == (1, 4, 1, 7, 4) and z.dtype == torch.float64
    monkeypatch.setenv("AE_SPATIAL_COMPRESSION", "32")
    assert S.get_noise(1, 768, 768, 1, "cpu", torch.float32, seed=1).shape == (1, 16, 1, 48, 48)
    assert S.get_noise(1, 64, 64, 1, "cpu", torch.float32, seed=None).shape == (1, 16, 1, 4, 4)


# ---------------------------------------------------------------- pack / unpack


@pytest.mark.parametrize("p", [1, 2])
def test_pack_unpack(p, monkeypatch):
    monkeypatch.delenv("AE_SPATIAL_COMPRESSION", raising=False)
    x = torch.randn(2, 3, 4, 3 * p, 5 * p)
    packed = S.pack(x, patch_size=p)
    assert torch.equal(packed, ref_pack(x, p))
    assert packed.shape == (2, 4 * 3 * 5, 3 * p * p)
    back = S.unpack(packed, height=3 * 16, width=5 * 16, num_frames=4, patch_size=p)
    assert torch.equal(back, x) and torch.equal(back, ref_unpack(packed, 3, 5, 4, p))
    # height not a multiple of D: the latent grid is ceil(height / D)
    assert S.unpack(packed, height=3 * 16 - 5, width=5 * 16 - 1, num_frames=4, patch_size=p).shape == x.shape


# ---------------------------------------------------------------- prepare


def ref_img_ids(t, h, w, bs):
    ids = torch.zeros(t, h, w, 3)
    for i in range(t):
        for j in range(h):
            for k in range(w):
                ids[i, j, k] = torch.tensor([i, j, k], dtype=torch.float32)
    return ids.reshape(1, -1, 3).repeat(bs, 1, 1)


def test_prepare_with_callable_encoders():
    calls = {}

    def t5(prompts, added_tokens, seq_align):
        calls["t5"] = (list(prompts), added_tokens, seq_align)
        return torch.ones(1, 7, 12)

    def clip(prompts):
        calls["clip"] = list(prompts)
        return torch.full((1, 5), 2.0)

    img = torch.randn(1, 4, 2, 6, 4, dtype=torch.float64)
    out = S.prepare(t5, clip, img, ["a", "b", "c"], seq_align=4)
    assert calls == {"t5": (["a", "b", "c"], 2 * 3 * 2, 4), "clip": ["a", "b", "c"]}
    assert torch.equal(out["img"], ref_pack(img).repeat(3, 1, 1))
    assert torch.equal(out["img_ids"], ref_img_ids(2, 3, 2, 3).double())
    assert out["txt"].shape == (3, 7, 12) and out["txt"].dtype == torch.float64
    assert torch.equal(out["txt_ids"], torch.zeros(3, 7, 3, dtype=torch.float64))
    assert torch.equal(out["y_vec"], torch.full((3, 5), 2.0, dtype=torch.float64))
    one = S.prepare(t5, clip, img, "single")
    assert one["img"].shape[0] == 1 and calls["t5"][0] == ["single"]


def test_prepare_ids():
    img = torch.randn(2, 4, 1, 4, 6)
    out = S.prepare_ids(img, torch.ones(1, 3, 8), torch.ones(1, 5))
    assert torch.equal(out["img"], ref_pack(img))
    assert torch.equal(out["img_ids"], ref_img_ids(1, 2, 3, 2))
    assert out["txt"].shape == (2, 3, 8) and out["y_vec"].shape == (2, 5) and out["txt_ids"].shape == (2, 3, 3)


# ---------------------------------------------------------------- denoisers


class LinModel:
    """A deterministic 'model': pred = a * img + b * cond-ish term + t."""

    def __init__(self):
        self.calls = []

    def __call__(self, img, timesteps, guidance, **kw):
        self.calls.append(sorted(kw))
        extra = kw["cond"].mean() if "cond" in kw else 0.0
        rows = torch.arange(img.shape[0], dtype=img.dtype).view(-1, 1, 1)
        return 0.3 * img + 0.01 * rows + timesteps.view(-1, 1, 1) * 0.1 + extra + kw["txt"].mean()


def test_distilled_denoiser_matches_euler():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 6, 4, generator=g)
    ts = S.get_schedule(5, 256, 1)
    model = LinModel()
    txt = torch.randn(2, 3, 4, generator=g)
    out = S.DistilledDenoiser().denoise(model, img=img.clone(), timesteps=ts, guidance=3.5, txt=txt)
    want = img.clone()
    for tc, tp in zip(ts[:-1], ts[1:]):
        want = want + (tp - tc) * LinModel()(want, torch.full((2,), tc), torch.full((2,), 3.5), txt=txt)
    assert torch.equal(out, want)
    assert model.calls[0] == ["txt"]
    assert S.DistilledDenoiser().prepare_guidance(["a"], {}, "cpu", torch.float32) == (["a"], {})


def ref_i2v_denoise(
    model,
    img,
    timesteps,
    guidance,
    guidance_img,
    masks,
    masked_ref,
    text_osci,
    image_osci,
    scale_temporal_osci,
    patch_size,
    **kwargs,
):
    # upstream's I2VDenoiser.denoise, with its (b, c, t, w, h) naming
    guidance_vec = torch.full((img.shape[0],), guidance, dtype=img.dtype)
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_vec = torch.full((img.shape[0],), t_curr, dtype=img.dtype)
        b, c, t, w, h = masked_ref.size()
        cond = ref_pack(torch.cat((masks, masked_ref), dim=1), patch_size)
        kwargs["cond"] = torch.cat([cond, cond, torch.zeros_like(cond)], dim=0)
        cond_x = img[: len(img) // 3]
        img = torch.cat([cond_x, cond_x, cond_x], dim=0)
        pred = model(img=img, **kwargs, timesteps=t_vec, guidance=guidance_vec)
        text_gs = ref_osc(guidance, i) if text_osci else guidance
        image_gs = ref_osc(guidance_img, i) if image_osci else guidance_img
        cond, uncond, uncond_2 = pred.chunk(3, dim=0)
        if image_gs > 1.0 and scale_temporal_osci:
            upper = torch.linspace(image_gs, 1.0, len(timesteps))[i]
            image_gs = torch.linspace(1.0, upper, t)[None, None, :, None, None].repeat(b, c, 1, h, w)
            image_gs = ref_pack(image_gs, patch_size).to(cond.device, cond.dtype)
        pred = uncond_2 + image_gs * (uncond - uncond_2) + text_gs * (cond - uncond)
        pred = torch.cat([pred, pred, pred], dim=0)
        img = img + (t_prev - t_curr) * pred
    return img[: len(img) // 3]


@pytest.mark.parametrize("osci", [(False, False, False), (True, True, True), (False, True, True)])
def test_i2v_denoiser_matches_upstream(osci):
    text_osci, image_osci, temporal = osci
    g = torch.Generator().manual_seed(2)
    B, C, T, H, W = 1, 4, 3, 4, 6  # H != W: upstream's swapped names give the same values
    masked_ref = torch.randn(B, C, T, H, W, generator=g)
    masks = torch.zeros(B, 1, T, H, W)
    masks[:, :, 0] = 1
    n = T * (H // 2) * (W // 2)
    img = torch.randn(3 * B, n, C * 4, generator=g)
    txt = torch.randn(3 * B, 2, 4, generator=g)
    ts = S.get_schedule(12, n, T)
    common = dict(
        timesteps=ts,
        guidance=7.5,
        guidance_img=3.0,
        masks=masks,
        masked_ref=masked_ref,
        text_osci=text_osci,
        image_osci=image_osci,
        scale_temporal_osci=temporal,
        patch_size=2,
        txt=txt,
    )
    out = S.I2VDenoiser().denoise(LinModel(), img=img.clone(), sigma_min=1e-5, **common)
    want = ref_i2v_denoise(LinModel(), img.clone(), **common)
    assert out.shape == (B, n, C * 4)
    assert torch.equal(out, want)  # same operations in the same order


def test_i2v_prepare_guidance():
    text, extra = S.I2VDenoiser().prepare_guidance(["a", "b"], {}, "cpu", torch.float32, guidance_img=3.0)
    assert text == ["a", "b", "", "", "", ""] and extra == {"guidance_img": 3.0}
    text, _ = S.I2VDenoiser().prepare_guidance(["a"], {}, "cpu", torch.float32, neg=["bad"], guidance_img=1.0)
    assert text == ["a", "bad", "bad"]
    assert set(S.SamplingMethodDict) == {SamplingMethod.I2V, SamplingMethod.DISTILLED}


def test_prepare_api_distilled_end_to_end(monkeypatch):
    monkeypatch.delenv("AE_SPATIAL_COMPRESSION", raising=False)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, img, timesteps, guidance, **kw):
            return self.w * img

    class AE:
        def decode(self, x):
            return x[:, :3].repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)

    def t5(p, added_tokens, seq_align):
        return torch.zeros(len(p), 3, 8)

    def clip(p):
        return torch.zeros(len(p), 4)

    api = S.prepare_api(Model(), AE(), t5, clip, {})
    opt = S.sanitize_sampling_option(S.SamplingOption(height=64, width=32, num_steps=4, method="distill", seed=5))
    x = api(opt, text=["a", "b"], channel=64)
    assert x.shape == (2, 3, 1, 16, 8)
    # the same flow by hand: noise, Euler with pred = 0.5 * img, unpack, decode
    z = S.get_noise(2, 64, 32, 1, "cpu", torch.float32, 5, channel=16)
    ts = S.get_schedule(4, (z.shape[-1] * z.shape[-2]) // 4, 1)
    y = ref_pack(z)
    for tc, tp in zip(ts[:-1], ts[1:]):
        y = y + (tp - tc) * 0.5 * y
    want = AE().decode(ref_unpack(y, 4, 2, 1))
    torch.testing.assert_close(x, want)
    assert replace(opt, method=SamplingMethod.I2V).method is SamplingMethod.I2V
