"""collect_references_batch and the media helpers it needs, on small image and
video files the tests write (the video cases skip only when PyAV is absent)."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from opensora_fast import reference
from opensora_fast.utils import _condition as dropin
from opensora_fast.utils import _media

from condition_helpers import ToyVAE
from helpers import assert_bitwise_equal


def write_image(path, w, h, seed=0, solid=None):
    if solid is not None:
        arr = np.empty((h, w, 3), np.uint8)
        arr[:] = solid
    else:
        arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def write_video(path, frames, w=32, h=24):
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"qscale": "1"}
        for k in range(frames):
            arr = np.empty((h, w, 3), np.uint8)
            arr[:] = ((k * 7) % 256, 128, 255 - (k * 7) % 256)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_image_resize_crop_values_and_shape(tmp_path):
    p = tmp_path / "a.png"
    write_image(p, 30, 20, solid=(10, 200, 90))
    x = _media.read_from_path(str(p), (16, 12), transform_name="resize_crop")
    assert x.shape == (3, 1, 16, 12) and x.dtype == torch.float32
    want = torch.tensor([10, 200, 90]).float().div(255).sub(0.5).div(0.5)
    torch.testing.assert_close(x[:, 0, 5, 5], want, rtol=0, atol=0)
    # crop is centred: a horizontal ramp keeps its middle
    arr = np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (10, 1, 3))
    Image.fromarray(arr).save(tmp_path / "r.png")
    y = _media.read_from_path(str(tmp_path / "r.png"), (10, 20), transform_name="resize_crop")
    assert y.shape == (3, 1, 10, 20)
    mid = (y[0, 0, 5] * 0.5 + 0.5) * 255 / 6
    assert 9 <= mid[0].item() <= 11 and 28 <= mid[-1].item() <= 30  # columns 10..29 of 40


def test_center_transform_and_rescale(tmp_path):
    p = tmp_path / "b.jpg"
    write_image(p, 50, 30, seed=1)
    assert _media.read_from_path(str(p), (16, 16)).shape == (3, 1, 16, 16)
    _media.rescale_image_by_path(str(p), 8, 6)  # upstream's order: PIL size (8, 6)
    assert Image.open(p).size == (8, 6)


def test_video_read(tmp_path):
    p = tmp_path / "v.mp4"
    write_video(p, 10)
    v = _media.read_from_path(str(p), (12, 16), transform_name="resize_crop")
    assert v.shape == (3, 10, 12, 16)
    red = (v[0, :, 6, 8] * 0.5 + 0.5) * 255
    torch.testing.assert_close(red, torch.arange(10).float() * 7, atol=6, rtol=0)  # lossy codec


def test_video_without_pyav_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"opensora_fast\[video\]"):
        _media.read_from_path(str(tmp_path / "x.mp4"), (8, 8))


@pytest.mark.parametrize("cond_type", ["i2v_head", "i2v_tail", "i2v_loop"])
def test_collect_references_images_parity_and_batching(tmp_path, cond_type):
    paths = []
    for k in range(4):
        write_image(tmp_path / f"{k}.png", 20 + 3 * k, 16, seed=k)
        paths.append(str(tmp_path / f"{k}.png"))
    refs = [paths[0], "", f"{paths[1]};{paths[2]}", paths[3]]
    ours_vae, ref_vae = ToyVAE(), ToyVAE()
    got = dropin.collect_references_batch(refs, cond_type, ours_vae, (8, 12))
    want = reference.collect_references_batch(refs, cond_type, ref_vae, (8, 12))
    assert got[1] is None and want[1] is None
    for g, w in zip(got, want):
        if w is None:
            continue
        assert len(g) == len(w)
        for a, b in zip(g, w):
            assert_bitwise_equal(a, b, cond_type)
    assert len(ours_vae.calls) == 1 and len(ref_vae.calls) == (6 if cond_type == "i2v_loop" else 3)


@pytest.mark.parametrize("cond_type, causal", [("v2v_head", True), ("v2v_tail", False), ("v2v_tail_easy", True)])
def test_collect_references_video_parity(tmp_path, cond_type, causal):
    write_video(tmp_path / "a.mp4", 34, 16, 16)
    write_video(tmp_path / "b.mp4", 40, 16, 16)
    refs = [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")]
    ours_vae, ref_vae = ToyVAE(), ToyVAE()
    got = dropin.collect_references_batch(refs, cond_type, ours_vae, (8, 8), is_causal=causal)
    want = reference.collect_references_batch(refs, cond_type, ref_vae, (8, 8), is_causal=causal)
    for g, w in zip(got, want):
        assert_bitwise_equal(g[0], w[0], cond_type)
    assert len(ours_vae.calls) == 1 and len(ref_vae.calls) == 2


def test_collect_references_bad_files(tmp_path):
    write_image(tmp_path / "ok.png", 8, 8)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    ok, junk, missing = (str(tmp_path / n) for n in ("ok.png", "junk.png", "missing.png"))
    vae = ToyVAE()
    with pytest.raises(FileNotFoundError, match=r"reference_paths\[1\]: no such file"):
        dropin.collect_references_batch([ok, missing], "i2v_head", vae, (8, 8))
    with pytest.raises(ValueError, match=r"reference_paths\[2\]: cannot read"):
        dropin.collect_references_batch([ok, "", junk], "i2v_head", vae, (8, 8))
    with pytest.raises(ValueError, match=r"reference_paths\[0\] has 1 frames; need at least 33"):
        dropin.collect_references_batch([ok], "v2v_head", vae, (8, 8), is_causal=True)
    with pytest.raises(ValueError, match="unknown cond_type 't2i'"):
        dropin.collect_references_batch([ok], "t2i", vae, (8, 8))
    assert vae.calls == []  # nothing encoded before the inputs were all read
