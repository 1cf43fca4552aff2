"""What the test world contains: coloured shapes at three positions on a noisy dark background.

A frame shows 0..n objects; an object is (colour, shape, position). A sentence names one object and the time it is
visible is its ground-truth moment. Frames are rendered with numpy only (uint8 RGB), so the same function serves
the video generator and the CLIP training script.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

FRAME_SIZE = 64  # pixels, square; even, as h264 with yuv420p needs
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (60, 90, 240),
    "yellow": (235, 220, 50),
    "purple": (160, 60, 210),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("left", "center", "right")
POSITION_X = {"left": 13, "center": 32, "right": 51}  # object centre column
OBJECT_RADIUS = 9

# Phrasings of one object. The first is the event sentence; the others only vary the CLIP training text.
TEMPLATES = (
    "a {color} {shape} appears on the {position}",
    "a {color} {shape} on the {position}",
    "{color} {shape} on the {position} side",
)
EMPTY_CAPTION = "an empty dark background"


@dataclass(frozen=True)
class WorldObject:
    color: str
    shape: str
    position: str

    def sentence(self, template: int = 0) -> str:
        return TEMPLATES[template].format(color=self.color, shape=self.shape, position=self.position)


ALL_OBJECTS: tuple[WorldObject, ...] = tuple(WorldObject(c, s, p) for c, s, p in itertools.product(COLORS, SHAPES, POSITIONS))


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean [size, size] mask of a shape centred at (cx, cy) with half-size r."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":  # apex up
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        arm = r * 0.35
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def render_frame(objects: list[WorldObject], rng: np.random.Generator, background: int = 40,
                 noise: float = 6.0, jitter: float = 2.0) -> np.ndarray:
    """One RGB frame showing ``objects`` (at most one per position).

    Returns: uint8 [FRAME_SIZE, FRAME_SIZE, 3].
    """
    size = FRAME_SIZE
    frame = np.full((size, size, 3), float(background), dtype=np.float32)
    for obj in objects:
        cx = POSITION_X[obj.position] + rng.uniform(-jitter, jitter)
        cy = size / 2 + rng.uniform(-jitter, jitter)
        r = OBJECT_RADIUS * rng.uniform(0.85, 1.1)
        frame[_shape_mask(obj.shape, cx, cy, r, size)] = COLORS[obj.color]
    frame += rng.normal(0.0, noise, frame.shape)
    return np.clip(frame, 0, 255).astype(np.uint8)


def random_state(rng: np.random.Generator, max_objects: int = 2, p_empty: float = 0.1) -> list[WorldObject]:
    """A random frame content: 0..max_objects objects at distinct positions."""
    if rng.random() < p_empty:
        return []
    n = int(rng.integers(1, max_objects + 1))
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    return [WorldObject(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)), POSITIONS[p]) for p in positions]
