"""The test world's on-screen text: captions drawn over scene videos (world.videos) at known times and sizes.

    make_text_video(path, duration, captions, size=(320, 240)) -> TextVideo

A caption is (start s, end s, text, px): ``text`` drawn from ``start`` to ``end`` (exclusive) with Pillow's built-in
scalable font at ``px`` pixels, white on a dark band (as broadcast captions and slide titles are), one band per
caption stacked from the top. Where it is actually visible is what a test expects the OCR channel to find.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from world.videos import make_video

MIN_PX, MAX_PX = 14, 64  # the caption sizes the world draws
MARGIN = 4  # pixels between a band's edge and its text


@dataclass
class Caption:
    text: str
    start: float
    end: float
    px: int


@dataclass
class TextVideo:
    path: Path
    duration: float
    captions: list[Caption] = field(default_factory=list)


@functools.lru_cache(maxsize=64)
def _font(px: int):
    return ImageFont.load_default(size=px)  # Pillow's bundled scalable font: no font file of the machine's


def draw_captions(rgb: np.ndarray, captions: list[Caption], t: float) -> np.ndarray:
    """``rgb`` uint8 [H, W, 3] with the captions shown at ``t`` drawn over it, each in its band (module)."""
    shown = [(i, c) for i, c in enumerate(captions) if c.start <= t < c.end]
    if not shown:
        return rgb
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    y = MARGIN
    for i, caption in enumerate(captions):
        band = caption.px + 2 * MARGIN
        if (i, caption) in shown:
            draw.rectangle([0, y, image.width, y + band], fill=(16, 16, 24))
            draw.text((MARGIN * 2, y + MARGIN), caption.text, fill=(250, 250, 250), font=_font(caption.px))
        y += band + MARGIN
    return np.asarray(image)


def make_text_video(path, duration: float, captions: list[tuple[float, float, str, int]],
                    size: tuple[int, int] = (320, 240), fps: float = 5) -> TextVideo:
    """A scene video with ``captions`` [(start, end, text, px)] drawn over it; px in [MIN_PX, MAX_PX]."""
    shown = [Caption(text, float(a), float(b), int(px)) for a, b, text, px in captions]
    for c in shown:
        if not MIN_PX <= c.px <= MAX_PX:
            raise ValueError(f"caption {c.text!r}: {c.px} px, the world draws {MIN_PX}-{MAX_PX}")
        if _font(c.px).getlength(c.text) + 4 * MARGIN > size[0]:  # cut at the frame's edge: not all shown
            raise ValueError(f"caption {c.text!r} at {c.px} px is wider than the {size[0]}-px frame")
    spec = make_video(path, duration=duration, fps=fps, size=size,
                      overlay=lambda t, rgb: draw_captions(rgb, shown, t))
    return TextVideo(spec.path, spec.duration, shown)


__all__ = ["MIN_PX", "MAX_PX", "Caption", "TextVideo", "draw_captions", "make_text_video"]
