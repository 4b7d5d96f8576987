"""opensora_fast.utils.inference, opensora_fast.datasets (aspect tables, save_sample) and
opensora_fast.utils.prompt_refine, against ports of upstream (opensora/utils/inference.py,
opensora/datasets/aspect.py, opensora/utils/prompt_refine.py at 7ad6a96)."""

import csv
import math
import os
import re
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from opensora_fast.datasets import aspect as A
from opensora_fast.datasets import save_sample
from opensora_fast.utils import inference as I
from opensora_fast.utils import prompt_refine as P
from opensora_fast.utils.sampling import SamplingOption

EDGE = [
    "",
    "   ",
    "a cat",
    "a cat.",
    "a cat. ",
    "  a cat  ",
    "done..",
    "ünïcødé 猫",
    "24 FPS.",
    "a 24 FPS.",
    "a 24 FPS",
    "a 24 fps.",
    "x FPS.",
    "line\nbreak",
    "tab\t",
    "ends with ?",
]


# ---------------------------------------------------------------- text helpers (ports of upstream)


def ref_check_fps_added(s):
    return bool(re.search(r"\d+ FPS\.$", s))


def ref_ensure_period(s):
    s = s.strip()
    return s if s.endswith(".") else s + "."


def ref_add_fps(text, fps=16):
    out = []
    for t in text:
        t = ref_ensure_period(t)
        if not ref_check_fps_added(t):
            t = t + f" {fps} FPS."
        out.append(t)
    return out


@pytest.mark.parametrize("s", EDGE)
def test_text_helpers_edge_strings(s):
    assert I.check_fps_added(s) == ref_check_fps_added(s)
    assert I.ensure_sentence_ends_with_period(s) == ref_ensure_period(s)


def test_text_helpers_exact_values():
    assert I.ensure_sentence_ends_with_period("  a cat ") == "a cat."
    assert I.ensure_sentence_ends_with_period("") == "."
    assert I.add_fps_info_to_text(["a cat", "b 24 FPS.", "c. "], fps=30) == [
        "a cat. 30 FPS.",
        "b 24 FPS.",
        "c. 30 FPS.",
    ]
    assert I.add_fps_info_to_text(EDGE, fps=8) == ref_add_fps(EDGE, fps=8)
    assert I.add_fps_info_to_text([]) == []
    assert I.add_motion_score_to_text(["a.", ""], 4) == ["a. 4 motion score.", " 4 motion score."]
    assert I.add_motion_score_to_text(["a"], "7") == ["a 7 motion score."]


def test_motion_score_dynamic(monkeypatch):
    assert I.add_motion_score_to_text(
        ["a", "b"], "dynamic", scorer=lambda t: [f"{len(x)} motion score" for x in t]
    ) == [
        "a 1 motion score.",
        "b 1 motion score.",
    ]
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="scorer"):
        I.add_motion_score_to_text(["a"], "dynamic")
    with pytest.raises(ValueError, match="2 prompts"):
        I.add_motion_score_to_text(["a", "b"], "dynamic", scorer=lambda t: ["1"])


def test_get_names_from_path():
    assert I.get_names_from_path("/a/b/c.mp4") == "c"
    assert I.get_names_from_path("c.tar.gz") == "c.tar"
    assert I.get_names_from_path("dir/") == ""
    assert I.get_names_from_path("noext") == "noext"


def test_get_save_path_name():
    j = os.path.join
    assert I.get_save_path_name("s", "video", name="n", num_sample_pos=0) == j("s", "video", "n")
    assert I.get_save_path_name("s", "video", save_prefix="p_", name="n", num_sample_pos=2) == j("s", "video", "p_n_2")
    assert I.get_save_path_name("s", "v", fallback_name="prompts", index=7, num_sample_pos=0) == j(
        "s", "v", "prompts_0007"
    )
    assert I.get_save_path_name("s", "v", save_prefix="x", fallback_name="f", index=12345, num_sample_pos=1) == j(
        "s", "v", "xf_12345_1"
    )
    # prompt_as_path (vbench): leading/trailing dots stripped, position always appended
    assert I.get_save_path_name("s", "v", prompt_as_path=True, prompt="..a cat.", num_sample_pos=0) == j(
        "s", "v", "a cat-0"
    )
    assert I.get_save_path_name("s", "v", name="n") == j("s", "v", "n")  # None position = 0
    with pytest.raises(ValueError, match="fallback_name"):
        I.get_save_path_name("s", "v", name=None, index=None, fallback_name="f", num_sample_pos=0)


# ---------------------------------------------------------------- create_tmp_csv


def upstream_csv(prompt, ref=None):
    # upstream's bytes: f'text\n"{prompt}"' / f'text,ref\n"{prompt}","{ref}"'
    return f'text,ref\n"{prompt}","{ref}"' if ref is not None else f'text\n"{prompt}"'


@pytest.mark.parametrize("prompt", ["a cat", "", "ünïcødé, 猫", "  spaces  "])
def test_create_tmp_csv_same_bytes_as_upstream(tmp_path, prompt):
    path = I.create_tmp_csv(str(tmp_path), prompt)
    assert path == os.path.join(str(tmp_path), "prompt.csv")
    assert open(path, encoding="utf-8", newline="").read() == upstream_csv(prompt)
    path = I.create_tmp_csv(str(tmp_path), prompt, ref="r.png")
    assert open(path, encoding="utf-8", newline="").read() == upstream_csv(prompt, "r.png")


@pytest.mark.parametrize(
    "prompt,ref",
    [('she said "hi", then left', None), ("two\nlines\r\nand, commas", 'r"1.png;b.mp4'), ('"', '""'), ("\n", ",")],
)
def test_create_tmp_csv_round_trip(tmp_path, prompt, ref):
    path = I.create_tmp_csv(str(tmp_path), prompt, ref=ref)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    want = {"text": prompt} if ref is None else {"text": prompt, "ref": ref}
    assert rows == [want]


def test_create_tmp_csv_no_create(tmp_path):
    path = I.create_tmp_csv(str(tmp_path), "x", create=False)
    assert path.endswith("prompt.csv") and not os.path.exists(path)


# ---------------------------------------------------------------- aspect tables (port of upstream)


def ref_aspect_dict(total_pixels=256 * 256, training=True, D=16):
    table, vert = {}, {}
    for ratio in A.ASPECT_RATIO_LD_LIST:
        wr, hr = map(float, ratio.split(":"))
        width = int(math.sqrt(total_pixels * (wr / hr)) // D) * D
        height = int((total_pixels / width) // D) * D
        if training:
            diff = abs(height * width - total_pixels)
            for h, w in [(height - D, width), (height + D, width), (height, width - D), (height, width + D)]:
                if abs(h * w - total_pixels) < diff:
                    height, width = h, w
                    diff = abs(h * w - total_pixels)
        if (height, width) not in table.values() or not training:
            table[ratio] = (height, width)
            vert[":".join(ratio.split(":")[::-1])] = (width, height)
    table.update(vert)
    return table


@pytest.mark.parametrize("res", ["256px", "360p", "480p", "720p", "768px", "1080p", "1080px", "2048px", "144p"])
@pytest.mark.parametrize("training", [True, False])
def test_aspect_tables_match_upstream(res, training):
    n = A.get_num_pexels_from_name(res)
    got = A.get_aspect_ratios_dict(n, training)
    want = ref_aspect_dict(n, training)
    assert got == want and list(got) == list(want)  # same order too


def test_aspect_env_unit(monkeypatch):
    monkeypatch.setenv("AE_SPATIAL_COMPRESSION", "32")
    assert A.get_aspect_ratios_dict(768 * 768) == ref_aspect_dict(768 * 768, D=32)
    assert A.get_num_tokens({"a": (64, 96)}) == {"a": 6}


def test_image_sizes_exact():
    # Open-Sora 2.0's documented inference sizes
    assert A.get_image_size("256px", "16:9", training=False) == (192, 336)
    assert A.get_image_size("768px", "16:9", training=False) == (576, 1024)
    assert A.get_image_size("256px", "1:1") == (256, 256)
    assert A.get_num_pexels_from_name("720p") == int(720 * 720 / 9 * 16)
    assert A.get_num_pexels_from_name("256px_max") == 65536
    with pytest.raises(ValueError) as e:
        A.get_image_size("256px", "7:5")
    assert "'7:5'" in str(e.value) and "16:9" in str(e.value)
    for bad in ["256", "abcpx", "px", ""]:
        with pytest.raises(ValueError, match="px"):
            A.get_num_pexels_from_name(bad)


def test_resolution_settings_and_closest():
    n, t = A.get_resolution_with_aspect_ratio("256px")
    assert n == 65536 and t == A.get_aspect_ratios_dict(65536)
    _, t = A.get_resolution_with_aspect_ratio("256px_max")
    full = A.get_aspect_ratios_dict(65536)
    best = max(full, key=lambda r: full[r][0] * full[r][1])
    assert t == {best: full[best]}
    assert A.get_resolution_with_aspect_ratio("256px_ar16:9")[1] == {"16:9": (192, 336)}
    with pytest.raises(ValueError, match="'xx'"):
        A.get_resolution_with_aspect_ratio("256px_xx")
    with pytest.raises(ValueError, match="'7:5'"):
        A.get_resolution_with_aspect_ratio("256px_ar7:5")
    assert A.get_ratio("16:9") == 9 / 16
    assert A.get_closest_ratio(1080, 1920, full) == "16:9"
    assert A.get_closest_ratio(100, 100, full) == "1:1"
    shapes = A.bucket_to_shapes({"256px": {1: (1.0, 40), 33: (0.5, 4)}}, batch_size=None)
    assert len(shapes) == 2 * len(full) and shapes[0] == (40, 3, 1) + full[next(iter(full))]
    assert {s[0] for s in A.bucket_to_shapes({"256px": {1: (1.0, 40)}}, batch_size=2)} == {2}


# ---------------------------------------------------------------- modify_option_to_t2i


def test_modify_option_to_t2i():
    opt = SamplingOption(resolution="256px", aspect_ratio="16:9", num_frames=129, guidance=7.5, height=192, width=336)
    t2i = I.modify_option_to_t2i(opt, distilled=True, img_resolution="768px")
    assert t2i is not opt and opt.num_frames == 129 and opt.method is I.SamplingMethod.I2V
    assert t2i.method is I.SamplingMethod.DISTILLED and t2i.num_frames == 1 and t2i.guidance == 4.0
    assert (t2i.height, t2i.width) == A.get_image_size("768px", "16:9")  # training table, as upstream
    assert t2i.resized_resolution == "256px"
    assert I.modify_option_to_t2i(opt).method is I.SamplingMethod.I2V


def test_sampling_method_enum():
    assert I.SamplingMethod("i2v") is I.SamplingMethod.I2V and I.SamplingMethod("distill") is I.SamplingMethod.DISTILLED
    with pytest.raises(ValueError) as e:
        I.SamplingMethod("ddim")
    assert "'ddim'" in str(e.value) and "'i2v'" in str(e.value) and "'distill'" in str(e.value)


# ---------------------------------------------------------------- save_sample and process_and_save


def expected_uint8(x, value_range=(-1, 1)):
    # torchvision's save_image / upstream's video path: clamp, shift, scale, *255 + 0.5, clamp, uint8
    lo, hi = value_range
    y = x.clamp(lo, hi).sub(lo).div(max(hi - lo, 1e-5))
    return y.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


def test_save_sample_png_values(tmp_path, capsys):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 6, 10, generator=g) * 2.4 - 1.2  # values outside the range get clamped
    keep = x.clone()
    path = save_sample(x, save_path=str(tmp_path / "img"))
    assert path == str(tmp_path / "img") + ".png" and capsys.readouterr().out == f"Saved to {path}\n"
    assert torch.equal(x, keep)
    got = np.asarray(Image.open(path))
    assert got.shape == (6, 10, 3)
    assert np.array_equal(got, expected_uint8(x[:, 0]).permute(1, 2, 0).numpy())
    gray = save_sample(x[:1], save_path=str(tmp_path / "gray"), verbose=False, value_range=(0, 1))
    got = np.asarray(Image.open(gray))
    want = expected_uint8(x[0, 0], (0, 1)).numpy()
    assert got.shape == (6, 10, 3) and all(np.array_equal(got[..., c], want) for c in range(3))


def test_save_sample_mp4(tmp_path):
    av = pytest.importorskip("av")  # the [video] extra; `make test` installs it

    t = torch.linspace(-1, 1, 16)
    # a smooth gradient video (h264 is lossy; smooth content decodes close to the input)
    x = (t[None, None, :, None] * 0.5 + torch.linspace(-0.4, 0.4, 5)[None, :, None, None]).expand(3, 5, 16, 32).clone()
    keep = x.clone()
    path = save_sample(x, save_path=str(tmp_path / "vid"), fps=12, verbose=False)
    assert path.endswith("vid.mp4") and torch.equal(x, keep)  # upstream normalises the caller's tensor in place
    with av.open(path) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.average_rate == 12
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (16, 32, 3)
    want = expected_uint8(x).permute(1, 2, 3, 0).numpy().astype(np.float64)
    assert np.abs(np.stack(frames).astype(np.float64) - want).mean() < 4.0
    one = save_sample(x[:, :1], save_path=str(tmp_path / "one"), force_video=True, verbose=False)
    assert one.endswith(".mp4")


def test_save_sample_bad_input(tmp_path):
    with pytest.raises(ValueError, match="C, T, H, W"):
        save_sample(torch.zeros(3, 8, 8), save_path=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="3 channels"):
        save_sample(torch.zeros(2, 4, 8, 8), save_path=str(tmp_path / "x"))


def test_save_sample_missing_pyav(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"opensora_fast\[video\]"):
        save_sample(torch.zeros(3, 2, 8, 8), save_path=str(tmp_path / "x"))


@dataclass
class _Opt:
    num_frames: int = 1
    resolution: str = "256px"
    resized_resolution: str = "256px"
    aspect_ratio: str = "1:1"


def test_process_and_save(tmp_path):
    from opensora_fast.utils.config import Config

    cfg = Config(dict(save_dir=str(tmp_path), fps_save=8, dataset=dict(data_path="/d/prompts.v2.csv"), save_prefix="p"))
    (tmp_path / "sub").mkdir()
    x = torch.zeros(2, 3, 1, 8, 8)
    batch = {"text": ["first prompt", "second"], "index": [0, 1]}
    names = I.process_and_save(x, batch, cfg, "sub", _Opt(), epoch=0, start_index=10)
    assert names == ["pprompts_0010", "pprompts_0011"]
    assert (tmp_path / "sub" / "pprompts_0010.txt").read_text() == "first prompt"
    assert (tmp_path / "sub" / "pprompts_0011.png").exists()
    names = I.process_and_save(x, {"text": ["a", "b"], "name": ["n1", "n2"]}, cfg, "sub", _Opt(), 3, 0, saving=False)
    assert names == ["pn1_3", "pn2_3"] and not (tmp_path / "sub" / "pn1_3.txt").exists()


# ---------------------------------------------------------------- prompt_refine with a fake client


class FakeClient:
    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = []
        self.chat = types.SimpleNamespace(completions=types.SimpleNamespace(create=self._create))

    def _create(self, **kw):
        self.calls.append(kw)
        a = self.answers.pop(0)
        if isinstance(a, Exception):
            raise a
        if a is None:
            return types.SimpleNamespace(choices=[])
        return types.SimpleNamespace(choices=[types.SimpleNamespace(message=types.SimpleNamespace(content=a))])


def test_refine_prompt_requests_like_upstream():
    c = FakeClient(["refined"])
    assert P.refine_prompt("  a cat  ", type="t2v", client=c) == "refined"
    kw = c.calls[0]
    assert (kw["model"], kw["temperature"], kw["top_p"], kw["stream"], kw["max_tokens"]) == (
        "gpt-4o",
        0.01,
        0.7,
        False,
        250,
    )
    msgs = kw["messages"]
    assert msgs[0] == {"role": "system", "content": P.sys_prompt_t2v} and len(msgs) == 8
    assert [m["role"] for m in msgs[1:7]] == ["user", "assistant"] * 3
    assert msgs[-1]["content"].endswith('in ENGLISH for the user input: " a cat "')  # stripped, as upstream
    c = FakeClient(["4 motion score"])
    assert P.refine_prompt("x", type="motion_score", client=c) == "4 motion score"
    assert c.calls[0]["max_tokens"] == 100 and c.calls[0]["messages"][1] == {"role": "user", "content": "x"}
    c = FakeClient(["img"])
    P.refine_prompt("x", type="t2i", client=c)
    assert c.calls[0]["messages"][0]["content"] == P.sys_prompt_t2i and len(c.calls[0]["messages"]) == 6


def test_refine_prompt_failures_give_the_prompt_back(monkeypatch):
    c = FakeClient([RuntimeError("network"), None, "ok"])
    assert P.refine_prompt("p", retry_times=3, client=c) == "ok" and len(c.calls) == 3
    c = FakeClient([RuntimeError("x"), None])
    assert P.refine_prompt("p", retry_times=2, client=c) == "p"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert P.default_client() is None
    assert P.refine_prompt("no client") == "no client"
    with pytest.raises(ValueError) as e:
        P.refine_prompt("p", type="v2v", client=c)
    assert "'v2v'" in str(e.value) and "motion_score" in str(e.value)
    with pytest.raises(ValueError, match="image_path"):
        P.refine_prompt("p", type="i2v", client=c)


def test_refine_prompts_and_image_url(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"\x89PNG-bytes")
    assert P.image_to_url(str(img)) == "data:image/png;base64,iVBORy1ieXRlcw=="
    other = tmp_path / "blob.unknownext"
    other.write_bytes(b"")
    assert P.image_to_url(str(other)) == "data:application/octet-stream;base64,"
    c = FakeClient(["r1", "r2"])
    out = P.refine_prompts(["a", "b"], type="i2v", image_paths=[str(img), str(img)], client=c)
    assert out == ["r1", "r2"]
    last = c.calls[0]["messages"][-1]["content"][0]
    assert last == {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORy1ieXRlcw=="}}


def test_motion_score_through_default_client(monkeypatch):
    c = FakeClient(["3 motion score", "9 motion score"])
    monkeypatch.setattr(P, "default_client", lambda: c)
    assert I.add_motion_score_to_text(["a", "b"], "dynamic") == ["a 3 motion score.", "b 9 motion score."]


def test_process_and_save_t2i2v_rescales(tmp_path, monkeypatch):
    from opensora_fast.datasets import utils as DU
    from opensora_fast.utils.config import Config

    calls = []
    monkeypatch.setattr(DU, "rescale_image_by_path", lambda p, w, h: calls.append((p, w, h)), raising=False)
    cfg = Config(dict(save_dir=str(tmp_path), use_t2i2v=True))
    (tmp_path / "s").mkdir()
    opt = _Opt(num_frames=1, resolution="768px", resized_resolution="256px", aspect_ratio="16:9")
    I.process_and_save(torch.zeros(1, 3, 1, 8, 8), {"text": ["p"], "name": ["n"]}, cfg, "s", opt, 0, 0)
    # resized to the 256px training-table size of 16:9, (width, height) order as upstream
    h, w = A.get_image_size("256px", "16:9")
    assert calls == [(os.path.join(str(tmp_path), "s", "n") + ".png", w, h)]
    calls.clear()
    I.process_and_save(torch.zeros(1, 3, 1, 8, 8), {"text": ["p"], "name": ["n"]}, cfg, "s", _Opt(), 0, 0)
    assert calls == []  # same resolution: nothing to rescale
