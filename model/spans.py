"""Spans on the clip grid: seconds <-> clips, clip bounds, tiling into windows, temporal IoU, NMS.

One implementation shared by training, prediction, indexing and search, so that they cannot disagree on a boundary.
A span is ``xx`` = (start, end) or ``cxw`` = (center, width); in seconds, in clips (half-open [first, end)) or
normalised to a window's length. The video is cut into clips of ``clip_len`` seconds (2 s for every public
dataset and for every index vmr writes, which records it in its meta ``clip_seconds``).

The array functions take numpy arrays or torch tensors alike (``_xp`` picks the library from the argument), so the
training losses (differentiable GIoU on tensors) and the official metrics (float64 numpy) run the same lines and
this module imports no torch.
"""
from __future__ import annotations

import math

import numpy as np

CLIP_SECONDS = 2.0  # the clip length of the public features and of the indexes vmr builds


def _xp(array):
    """The array library of ``array``: torch for tensors, numpy otherwise (torch is imported only if used)."""
    if type(array).__module__.startswith("torch"):
        import torch
        return torch
    return np


# ---------------------------------------------------------------------------------------------- the clip grid
def num_clips(duration: float, clip_seconds: float = CLIP_SECONDS) -> int:
    """Clips the public extractors give a video of ``duration`` seconds (ffmpeg ``fps=1/clip_seconds``).

    The fps filter emits a frame for every output tick t = 0, 2, 4, ... that the stream reaches, rounding to the
    nearest tick at the end, so a 150-s video gives 75 clips and the 30.7-s real video 15.
    """
    return max(1, int(math.floor(duration / clip_seconds + 0.5)))


def seconds_to_clip(t: float, clip_len: float = CLIP_SECONDS) -> int:
    """The clip whose grid point is nearest to ``t`` seconds (Python's round: half to even, as torch.round)."""
    return int(round(t / clip_len))


def clip_to_seconds(i: int, clip_len: float = CLIP_SECONDS) -> float:
    """Start (sample time) of clip ``i`` in seconds."""
    return i * clip_len


def clip_at(t: float, duration: float | None, clip_len: float = CLIP_SECONDS) -> int:
    """The clip holding time ``t`` seconds (clip i = [i, i + 1) x clip_len), clamped to the video's clips."""
    last = max(int(((duration or 0.0) - 1e-6) // clip_len), 0)
    return min(max(int(float(t) // clip_len), 0), last)


def covering_clips(start: float, end: float, clip_len: float = CLIP_SECONDS) -> tuple[int, int]:
    """Clips [a, b) that the span [start, end) seconds touches; 1e-6 s of slack so a span ending exactly on a
    grid point does not take the next clip because of rounding."""
    return int(np.floor(start / clip_len + 1e-6)), int(np.ceil(end / clip_len - 1e-6))


def clip_bounds(n_clips: int, clip_len: float, duration: float) -> np.ndarray:
    """float64 [n_clips, 2] seconds of each clip: clip i = [i * clip_len, (i + 1) * clip_len), the last one
    ending at the video's end (never before its start)."""
    starts = np.arange(n_clips, dtype=np.float64) * clip_len
    ends = starts + clip_len
    ends[-1] = max(duration, starts[-1])
    return np.stack([starts, ends], axis=1)


def tile_windows(n_clips: int, max_clips: int, stride: int | None = None) -> list[tuple[int, int]]:
    """Half-open clip windows [first, end) of at most ``max_clips`` covering a video of ``n_clips`` clips.

    Stride ``max_clips // 2`` by default (half-overlapping: any moment up to half a window long lies whole in one
    window); the last window is flush with the video's end. A video of <= max_clips clips is one window.
    """
    if n_clips <= max_clips:
        return [(0, n_clips)]
    stride = stride or max(1, max_clips // 2)
    starts = list(range(0, n_clips - max_clips + 1, stride))
    if starts[-1] + max_clips < n_clips:
        starts.append(n_clips - max_clips)
    return [(s, s + max_clips) for s in starts]


# ---------------------------------------------------------------------------------------------- conversions
def span_xx_to_cxw(xx):
    """[..., 2] (start, end) -> [..., 2] (center, width)."""
    return _xp(xx).stack([(xx[..., 0] + xx[..., 1]) / 2, xx[..., 1] - xx[..., 0]], axis=-1)


def span_cxw_to_xx(cxw):
    """[..., 2] (center, width) -> [..., 2] (start, end)."""
    return _xp(cxw).stack([cxw[..., 0] - cxw[..., 1] / 2, cxw[..., 0] + cxw[..., 1] / 2], axis=-1)


# ---------------------------------------------------------------------------------------------- IoU and NMS
def _intersection_and_hull(a, b):
    """Broadcast (start, end) spans a [..., 2], b [..., 2] -> (intersection length, enclosing length), both [...]."""
    xp = _xp(a)
    inter = (xp.minimum(a[..., 1], b[..., 1]) - xp.maximum(a[..., 0], b[..., 0])).clip(min=0)
    hull = xp.maximum(a[..., 1], b[..., 1]) - xp.minimum(a[..., 0], b[..., 0])
    return inter, hull


def _cross_overlap(spans1, spans2):
    """spans1 [N, 2], spans2 [M, 2] -> (intersection, union, enclosing length), each [N, M]."""
    inter, hull = _intersection_and_hull(spans1[:, None, :], spans2[None, :, :])
    union = (spans1[:, 1] - spans1[:, 0])[:, None] + (spans2[:, 1] - spans2[:, 0])[None, :] - inter
    return inter, union, hull


def cross_iou(spans1, spans2):
    """IoU of every pair: spans1 [N, 2], spans2 [M, 2] -> [N, M] (union = sum of lengths - intersection;
    0/0 = nan for two empty spans at one point, as the official evaluation)."""
    inter, union, _ = _cross_overlap(spans1, spans2)
    return inter / union


def paired_iou(spans1, spans2):
    """IoU of row i with row i: [..., 2] each (broadcast) -> [...].

    The denominator is the enclosing span, as the official evaluation: it equals the union whenever the spans
    overlap, the IoU is 0 anyway when they do not, and two empty spans at one point get 0 instead of nan.
    """
    inter, hull = _intersection_and_hull(spans1, spans2)
    if _xp(inter) is np:
        return np.divide(inter, hull, out=np.zeros_like(inter, dtype=np.float64), where=hull != 0)
    return (inter / hull).nan_to_num(0.0)


def temporal_iou(a, b) -> float:
    """IoU of two (start, end) spans (0 when they do not overlap or both are empty)."""
    return float(paired_iou(np.asarray(a[:2], dtype=np.float64), np.asarray(b[:2], dtype=np.float64)))


def generalized_temporal_iou(spans1, spans2):
    """Generalized IoU (DETR's GIoU in 1-D) of every pair: [N, 2], [M, 2] -> [N, M]; differentiable on tensors."""
    inter, union, hull = _cross_overlap(spans1, spans2)
    hull = hull.clip(min=0)
    return inter / union - (hull - union) / hull


def temporal_nms(spans, scores, iou_threshold: float, max_keep: int | None = None, groups=None) -> list[int]:
    """Greedy NMS: indices of the kept spans, best score first (ties in input order).

    A span is dropped when its IoU (``paired_iou``) with a kept, better span of the same group exceeds
    ``iou_threshold``. Args: spans [N, 2]; scores [N]; groups [N] (e.g. video ids; None = one group): spans of
    different groups never suppress each other. At most ``max_keep`` indices (None = all kept ones).
    """
    spans = np.asarray(spans, dtype=np.float64).reshape(-1, 2)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    groups = [None] * len(spans) if groups is None else list(groups)
    kept: list[int] = []
    kept_of_group: dict = {}  # group -> kept indices (compared lazily: N can be large, N x N must not be built)
    for i in order.tolist():
        same = kept_of_group.setdefault(groups[i], [])
        if not same or (paired_iou(spans[i], spans[same]) <= iou_threshold).all():
            same.append(i)
            kept.append(i)
            if max_keep is not None and len(kept) >= max_keep:
                break
    return kept
