"""Media helpers that the conditioning drop-ins need, written fresh from upstream's
semantics (``opensora/datasets/utils.py`` and ``video_transforms.py``): images via
Pillow, videos via PyAV (the optional extra ``opensora_fast[video]``). No
torchvision. Re-exported by the lead from ``opensora_fast.datasets.utils``.

``read_from_path`` returns ``[C, T, H, W]`` float32 in ``[-1, 1]`` (an image is
one frame), like upstream.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger("opensora_fast")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VID_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")
TRANSFORMS = ("center", "resize_crop")


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow is a dependency
        raise ImportError("reading images needs Pillow: pip install Pillow") from e
    return Image


def _av():
    try:
        import av
    except ImportError as e:
        raise ImportError("reading videos needs PyAV: pip install 'opensora_fast[video]' (or pip install av)") from e
    return av


def is_img(path: str) -> bool:
    return os.path.splitext(path)[-1].lower() in IMG_EXTENSIONS


def is_vid(path: str) -> bool:
    return os.path.splitext(path)[-1].lower() in VID_EXTENSIONS


# ---- image transforms (PIL in, PIL out) ---------------------------------------------


def resize_crop_to_fill_image(img, image_size):
    """Scale (bicubic) so the image covers ``image_size`` = (h, w), then crop the
    middle: upstream's image "resize_crop"."""
    Image = _pil()
    w, h = img.size
    th, tw = image_size
    rh, rw = th / h, tw / w
    if rh > rw:
        sh, sw = th, round(w * rh)
        top, left = 0, int(round((sw - tw) / 2.0))
    else:
        sh, sw = round(h * rw), tw
        top, left = int(round((sh - th) / 2.0)), 0
    arr = np.asarray(img.resize((sw, sh), Image.BICUBIC))
    assert top + th <= arr.shape[0] and left + tw <= arr.shape[1]
    return Image.fromarray(arr[top : top + th, left : left + tw])


def center_crop_image(img, size: int):
    """Halve (box filter) while the short side is >= 2*size, scale (bicubic) the
    short side to ``size``, crop the middle square: upstream's image "center"."""
    Image = _pil()
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(v // 2 for v in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(v * scale) for v in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[y : y + size, x : x + size])


def _to_unit(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [-1, 1] (ToTensor, then Normalize(0.5, 0.5))."""
    t = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).float().div_(255.0)
    return t.sub_(0.5).div_(0.5)


def _crop(name: str, image_size, center, fill):
    """Upstream's transform names: "center" (square) or "resize_crop"."""
    if name == "center":
        assert image_size[0] == image_size[1], "Image size must be square for center crop"
        return lambda x: center(x, image_size[0])
    if name == "resize_crop":
        return lambda x: fill(x, image_size)
    raise NotImplementedError(f"Transform {name} not implemented")


def image_transform(name: str, image_size):
    crop = _crop(name, image_size, center_crop_image, resize_crop_to_fill_image)
    return lambda img: _to_unit(np.asarray(crop(img)))


# ---- video transforms (uint8 TCHW tensor in, float TCHW out) -------------------------


def resize_crop_to_fill_video(clip: torch.Tensor, image_size) -> torch.Tensor:
    """Bilinear scale so the clip covers ``image_size``, crop: upstream's video
    "resize_crop" (its offset is ``int(round(excess) / 2)``, kept)."""
    h, w = clip.shape[-2:]
    th, tw = image_size
    rh, rw = th / h, tw / w
    if rh > rw:
        sh, sw = th, round(w * rh)
        top, left = 0, int(round(sw - tw) / 2.0)
    else:
        sh, sw = round(h * rw), tw
        top, left = int(round(sh - th) / 2.0), 0
    clip = F.interpolate(clip, size=(sh, sw), mode="bilinear", align_corners=False)
    return clip[..., top : top + th, left : left + tw]


def center_crop_video(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Short side to ``size`` (bilinear), middle square: upstream's video "center"."""
    h, w = clip.shape[-2:]
    s = size / min(h, w)
    clip = F.interpolate(clip, size=(int(round(h * s)), int(round(w * s))), mode="bilinear", align_corners=False)
    h, w = clip.shape[-2:]
    i, j = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return clip[..., i : i + size, j : j + size]


def video_transform(name: str, image_size):
    crop = _crop(name, image_size, center_crop_video, resize_crop_to_fill_video)
    return lambda clip: crop(clip.float() / 255.0).sub(0.5).div(0.5)


# ---- readers --------------------------------------------------------------------------


def read_image_from_path(path, transform=None, transform_name="center", num_frames=1, image_size=(256, 256)):
    """``[C, num_frames, H, W]`` float32 in [-1, 1]."""
    Image = _pil()
    with open(path, "rb") as f:
        img = Image.open(f).convert("RGB")
    transform = transform or image_transform(transform_name, image_size)
    return transform(img).unsqueeze(1).repeat(1, num_frames, 1, 1)


def read_video_frames(path: str) -> torch.Tensor:
    """The frames of the first video stream as uint8 ``[T, 3, H, W]``, by the
    rules of upstream's decoder (``torchvision.io.read_video``, ``pts_unit="sec"``):
    metadata that does not decode is ignored; one frame per timestamp (the last
    decoded wins), in timestamp order; frames with a negative timestamp are
    dropped; a decode error keeps the frames decoded before it. Frames without a
    timestamp are dropped too (upstream raises TypeError on them).

    Where these rules leave nothing (upstream's empty clip: every frame has a
    negative or no timestamp), every decoded frame is returned in decode order
    instead, and a warning says so. A file with no video frames at all raises
    ValueError."""
    av = _av()
    kept: dict[int, np.ndarray] = {}  # pts >= 0 -> the last frame decoded at it
    untimed: list[np.ndarray] = []  # the others, in decode order, needed only while kept is empty
    decoded, error = 0, None
    with av.open(path, metadata_errors="ignore") as container:
        if not container.streams.video:
            raise ValueError(f"{path!r} holds no video stream")
        try:
            for frame in container.decode(video=0):
                decoded += 1
                pts = frame.pts
                if pts is not None and pts >= 0:
                    kept[pts] = frame.to_ndarray(format="rgb24")
                    untimed.clear()
                elif not kept:
                    untimed.append(frame.to_ndarray(format="rgb24"))
        except av.error.FFmpegError as e:  # as upstream: keep what decoded before the error
            error = e
    if error is not None:
        logger.warning(
            "%r: decoding stopped after %d frames: %s; using the frames decoded so far", path, decoded, error
        )
    if kept:
        frames = [kept[pts] for pts in sorted(kept)]
        if len(frames) != decoded:
            logger.info(
                "%r: %d of %d decoded frames dropped (repeated, negative or missing timestamps), as upstream",
                path,
                decoded - len(frames),
                decoded,
            )
    else:
        frames = untimed
        if frames:
            logger.warning(
                "%r: no frame has a timestamp >= 0, where upstream returns an empty clip; "
                "using all %d decoded frames in decode order",
                path,
                len(frames),
            )
    if not frames:
        raise ValueError(f"{path!r} holds no video frames" + (f" ({error})" if error is not None else ""))
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)


def read_video_from_path(path, transform=None, transform_name="center", image_size=(256, 256)):
    """``[C, T, H, W]`` float32 in [-1, 1]."""
    transform = transform or video_transform(transform_name, image_size)
    return transform(read_video_frames(path)).permute(1, 0, 2, 3)


def read_from_path(path: str, image_size, transform_name: str = "center") -> torch.Tensor:
    """An image or a video file as ``[C, T, H, W]`` float32 in [-1, 1] (upstream
    also downloads URLs; this does not)."""
    ext = os.path.splitext(path)[-1].lower()
    if ext in VID_EXTENSIONS:
        return read_video_from_path(path, image_size=image_size, transform_name=transform_name)
    if ext not in IMG_EXTENSIONS:
        raise ValueError(f"Unsupported file format: {ext!r} ({path!r})")
    return read_image_from_path(path, image_size=image_size, transform_name=transform_name)


def rescale_image_by_path(path: str, height: int, width: int) -> None:
    """Resize the image at ``path`` in place. Upstream's argument order is kept: it
    resizes to PIL size ``(height, width)`` (i.e. width=height, height=width as the
    names read), which its caller compensates by passing ``(path, width, height)``.
    Errors are logged, not raised, as upstream prints them."""
    Image = _pil()
    try:
        with Image.open(path) as img:
            img.load()
            out = img.resize((int(height), int(width)), Image.BILINEAR)
        out.save(path)
    except Exception as e:  # noqa: BLE001 - upstream swallows every error here
        logger.error("Error rescaling image: %s", e)
