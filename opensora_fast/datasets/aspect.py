"""Drop-in for ``opensora.datasets.aspect``: resolution names and aspect-ratio tables.

Pure Python, same tables and values as upstream. The spatial granularity ``D``
is read from ``AE_SPATIAL_COMPRESSION`` (default 16) at each call, as upstream.
Bad names raise ``ValueError`` naming the value and what is accepted (upstream:
``assert`` for a missing aspect ratio).
"""

from __future__ import annotations

import math
import os

__all__ = [
    "ASPECT_RATIO_LD_LIST",
    "get_ratio",
    "get_aspect_ratios_dict",
    "get_num_pexels",
    "get_num_tokens",
    "get_num_pexels_from_name",
    "get_resolution_with_aspect_ratio",
    "get_closest_ratio",
    "get_image_size",
    "bucket_to_shapes",
]

# width:height, the landscape half of the table (each also gets its transposed twin)
ASPECT_RATIO_LD_LIST = [
    "2.39:1",
    "2:1",
    "16:9",
    "1.85:1",
    "9:16",
    "5:8",
    "3:2",
    "4:3",
    "1:1",
]


def _spatial_unit() -> int:
    return int(os.environ.get("AE_SPATIAL_COMPRESSION", 16))


def get_ratio(name: str) -> float:
    """``"w:h"`` -> h / w."""
    w, h = (float(x) for x in name.split(":"))
    return h / w


def get_aspect_ratios_dict(total_pixels: int = 256 * 256, training: bool = True) -> dict[str, tuple[int, int]]:
    """``{"w:h": (height, width)}`` for every ratio of :data:`ASPECT_RATIO_LD_LIST` and its transpose,
    sizes multiples of ``D`` near ``total_pixels``.

    Each size starts at ``width = floor(sqrt(P * w/h) / D) * D``, ``height = floor(P / width / D) * D``;
    in training one step of ``D`` on either side is taken when it gets closer to ``P``,
    and a size already in the table is not added twice (its transpose neither).
    """
    D = _spatial_unit()
    table: dict[str, tuple[int, int]] = {}
    transposed: dict[str, tuple[int, int]] = {}
    for ratio in ASPECT_RATIO_LD_LIST:
        rw, rh = (float(x) for x in ratio.split(":"))
        width = int(math.sqrt(total_pixels * (rw / rh)) // D) * D
        height = int((total_pixels / width) // D) * D
        if training:
            best = abs(height * width - total_pixels)
            for h, w in ((height - D, width), (height + D, width), (height, width - D), (height, width + D)):
                d = abs(h * w - total_pixels)
                if d < best:
                    height, width, best = h, w, d
        if not training or (height, width) not in table.values():
            table[ratio] = (height, width)
            transposed[":".join(reversed(ratio.split(":")))] = (width, height)
    table.update(transposed)
    return table


def get_num_pexels(aspect_ratios_dict: dict[str, tuple[int, int]]) -> dict[str, int]:
    """``{ratio: h * w}``."""
    return {r: h * w for r, (h, w) in aspect_ratios_dict.items()}


def get_num_tokens(aspect_ratios_dict: dict[str, tuple[int, int]]) -> dict[str, int]:
    """``{ratio: h * w // D // D}``."""
    D = _spatial_unit()
    return {r: h * w // D // D for r, (h, w) in aspect_ratios_dict.items()}


def get_num_pexels_from_name(resolution: str) -> int:
    """Pixel count of a resolution name: ``"256px"`` -> 256*256, ``"720p"`` -> int(720*720/9*16);
    a ``_setting`` suffix is ignored."""
    name = resolution.split("_")[0]
    try:
        if name.endswith("px"):
            size = int(name[:-2])
            return size * size
        if name.endswith("p"):
            size = int(name[:-1])
            return int(size * size / 9 * 16)
    except ValueError:
        pass
    raise ValueError(
        f"Invalid resolution {resolution!r}; accepted: '<n>px' (square) or '<n>p' (16:9), e.g. '256px', '720p'"
    )


def get_resolution_with_aspect_ratio(resolution: str) -> tuple[int, dict[str, tuple[int, int]]]:
    """``(pixels, table)`` for ``"256px"``, ``"256px_max"`` (the largest entry only) or
    ``"256px_ar16:9"`` (that ratio only)."""
    keys = resolution.split("_")
    if len(keys) == 1:
        name, setting = keys[0], ""
    elif len(keys) == 2:
        name, setting = keys
        if setting != "max" and not setting.startswith("ar"):
            raise ValueError(f"Invalid setting {setting!r} in {resolution!r}; accepted: 'max' or 'ar<w>:<h>'")
    else:
        raise ValueError(f"Invalid resolution {resolution!r}; accepted: '<name>' or '<name>_max' or '<name>_ar<w>:<h>'")
    num = get_num_pexels_from_name(name)
    table = get_aspect_ratios_dict(num)
    if setting == "max":
        best = max(table, key=lambda r: table[r][0] * table[r][1])
        table = {best: table[best]}
    elif setting.startswith("ar"):
        ar = setting[2:]
        if ar not in table:
            raise ValueError(f"Aspect ratio {ar!r} not found; accepted: {', '.join(table)}")
        table = {ar: table[ar]}
    return num, table


def get_closest_ratio(height: float, width: float, ratios: dict) -> str:
    """The key of ``ratios`` whose h/w is closest to ``height / width`` (first one on ties)."""
    target = height / width
    return min(ratios.keys(), key=lambda r: abs(target - get_ratio(r)))


def get_image_size(resolution: str, ar_ratio: str, training: bool = True) -> tuple[int, int]:
    """``(height, width)`` of ``resolution`` at aspect ratio ``ar_ratio`` (``"w:h"``)."""
    table = get_aspect_ratios_dict(get_num_pexels_from_name(resolution), training)
    if ar_ratio not in table:
        raise ValueError(f"Aspect ratio {ar_ratio!r} not found for {resolution!r}; accepted: {', '.join(table)}")
    return table[ar_ratio]


def bucket_to_shapes(bucket_config: dict, batch_size: int | None = None) -> list[tuple[int, int, int, int, int]]:
    """Every ``(bs, 3, num_frames, height, width)`` of a bucket config
    ``{resolution: {num_frames: (prob, bs)}}`` over its aspect ratios (``batch_size`` overrides bs)."""
    shapes = []
    for resolution, infos in bucket_config.items():
        for num_frames, (_, bs) in infos.items():
            table = get_aspect_ratios_dict(get_num_pexels_from_name(resolution))
            for _ar, (height, width) in table.items():
                shapes.append((batch_size if batch_size is not None else bs, 3, num_frames, height, width))
    return shapes
