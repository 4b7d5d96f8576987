"""Drop-in for parts of ``opensora.datasets.utils``: saving generated samples.

``save_sample`` writes a png through Pillow and an mp4 (h264, yuv420p) through
PyAV — ``pip install opensora_fast[video]`` — with upstream's pixel values
(upstream goes through torchvision's ``save_image`` / ``write_video``; torchvision
is not needed here). Unlike upstream, the caller's tensor is never modified
(upstream normalises a video sample in place).
"""

from __future__ import annotations

import torch

# media reading for conditioning references (Pillow / PyAV, imported lazily)
from ._media import read_from_path, rescale_image_by_path

__all__ = ["save_sample", "read_from_path", "rescale_image_by_path"]


def _need(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs {module.split('.')[0]}: pip install opensora_fast[video]") from e


def _normalize(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    low, high = value_range
    return x.clamp(min=low, max=high).sub_(low).div_(max(high - low, 1e-5))


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``round(x * 255)`` clamped, in x's own dtype (as torchvision), then uint8 on the CPU."""
    return x.mul(255).add_(0.5).clamp_(0, 255).to("cpu", torch.uint8)


def save_sample(
    x: torch.Tensor,
    save_path: str | None = None,
    fps: int = 8,
    normalize: bool = True,
    value_range: tuple[float, float] = (-1, 1),
    force_video: bool = False,
    verbose: bool = True,
    crf: int = 23,
) -> str:
    """Save a ``[C, T, H, W]`` sample as ``save_path + ".png"`` (T == 1, unless ``force_video``)
    or ``save_path + ".mp4"`` (h264 at ``fps`` with quality ``crf``). Returns the written path.

    With ``normalize`` the values are clamped to ``value_range`` and mapped to [0, 1] first.
    A 1-channel image is saved as gray RGB (as torchvision's ``make_grid``).
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"save_sample: x must be a [C, T, H, W] tensor, got {getattr(x, 'shape', type(x))}")
    if save_path is None:
        raise ValueError("save_sample: save_path is required (the path without extension)")
    x = x.detach()
    if not force_video and x.shape[1] == 1:
        Image = _need("PIL.Image", "save_sample (png)")
        save_path += ".png"
        img = x[:, 0]
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        img = _normalize(img, value_range) if normalize else img
        arr = _to_uint8(img).permute(1, 2, 0).contiguous().numpy()
        Image.fromarray(arr).save(save_path)
    else:
        if x.shape[0] != 3:  # before the import: a wrong shape is the caller's first problem
            raise ValueError(f"save_sample: a video needs 3 channels (RGB), got C={x.shape[0]}")
        av = _need("av", "save_sample (mp4)")
        save_path += ".mp4"
        vid = _normalize(x, value_range) if normalize else x
        frames = _to_uint8(vid).permute(1, 2, 3, 0).contiguous().numpy()  # [T, H, W, C]
        rate = int(round(fps)) if isinstance(fps, float) else fps
        with av.open(save_path, mode="w") as container:
            stream = container.add_stream("h264", rate=rate)
            stream.width = frames.shape[2]
            stream.height = frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    if verbose:
        print(f"Saved to {save_path}")
    return save_path
