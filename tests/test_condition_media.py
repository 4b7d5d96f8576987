"""collect_references_batch and the media helpers it needs, on small image and
video files the tests write (the video cases skip only when PyAV is absent)."""

import logging
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from condition_helpers import ToyVAE
from helpers import assert_bitwise_equal
from PIL import Image

from opensora_fast import reference
from opensora_fast.datasets import _media
from opensora_fast.utils import _condition as dropin


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


def write_timed_video(path, pts, options=None, metadata=None, fmt="matroska"):
    """An intra-only video (Matroska unless ``fmt``) whose k-th packet is frame k (grey level 20 k)
    with timestamp ``pts[k]`` in units of 1/8 s: repeated, negative timestamps as
    given (``avoid_negative_ts`` off keeps them negative in the file)."""
    av = pytest.importorskip("av")
    tb = Fraction(1, 8)
    kw = {"metadata_encoding": "latin-1"} if metadata else {}
    with av.open(str(path), mode="w", format=fmt, options=options or {}, **kw) as c:
        c.metadata.update(metadata or {})
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 16, 16, "yuv420p"
        s.codec_context.gop_size = 1  # every frame a key frame: decode order = packet order
        s.options = {"qscale": "1"}
        packets = []
        for k in range(len(pts)):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 20 * k, np.uint8), format="rgb24")
            frame.pts = k
            packets += s.encode(frame)
        packets += s.encode()
        assert len(packets) == len(pts)
        for packet, t in zip(packets, pts):
            packet.time_base = tb
            packet.pts = packet.dts = t
            c.mux(packet)


def frame_numbers(frames):
    """Which written frame each decoded one is (by its grey level)."""
    return [round(v / 20) for v in frames[:, 0, 8, 8].tolist()]


# (timestamps written, frames upstream keeps, by written index): one per timestamp,
# the last decoded; timestamps < 0 dropped
TIMED_CASES = {
    "plain": ([0, 1, 2, 3], [0, 1, 2, 3]),
    "repeated": ([0, 1, 1, 2, 3, 3, 3, 4], [0, 2, 3, 6, 7]),
    "negative_head": ([-3, -2, -1, 0, 1, 2], [3, 4, 5]),
    "repeated_and_negative": ([-2, -1, -1, 0, 0, 1], [4, 5]),
}


@pytest.mark.parametrize("case", list(TIMED_CASES))
def test_video_timestamps_follow_upstream(tmp_path, case, caplog):
    pts, want = TIMED_CASES[case]
    p = tmp_path / f"{case}.mkv"
    write_timed_video(p, pts, options={"avoid_negative_ts": "disabled"})
    with caplog.at_level(logging.INFO, logger="opensora_fast"):
        frames = _media.read_video_frames(str(p))
    assert frames.dtype == torch.uint8 and frames.shape == (len(want), 3, 16, 16)
    assert frame_numbers(frames) == want
    dropped = [r for r in caplog.records if "decoded frames dropped" in r.getMessage()]
    assert len(dropped) == (0 if case == "plain" else 1)
    clip = _media.read_from_path(str(p), (8, 8), transform_name="resize_crop")
    assert clip.shape == (3, len(want), 8, 8)


def test_video_all_negative_timestamps_decodes_the_file_and_logs(tmp_path, caplog):
    """Upstream returns an empty clip here; the file's frames are used instead, in
    decode order, and a warning says so."""
    p = tmp_path / "neg.ts"  # MPEG-TS: Matroska shifts a wholly negative file to start at 0
    write_timed_video(p, [-5, -4, -3, -2, -1], options={"avoid_negative_ts": "disabled"}, fmt="mpegts")
    with caplog.at_level(logging.WARNING, logger="opensora_fast"):
        frames = _media.read_video_frames(str(p))
    assert frame_numbers(frames) == [0, 1, 2, 3, 4]
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and "where upstream returns an empty clip" in msgs[0] and "all 5 decoded frames" in msgs[0]


def test_video_metadata_errors_ignored(tmp_path):
    """A title that is not UTF-8 (PyAV's default decoding raises on it): upstream
    opens with metadata_errors="ignore" and reads the frames."""
    p = tmp_path / "meta.mkv"
    write_timed_video(p, [0, 1, 2], metadata={"title": "caf\xe9"})
    assert frame_numbers(_media.read_video_frames(str(p))) == [0, 1, 2]


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
    want = reference.upstream.condition.collect_references_batch(refs, cond_type, ref_vae, (8, 12))
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
    want = reference.upstream.condition.collect_references_batch(refs, cond_type, ref_vae, (8, 8), is_causal=causal)
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
