"""The 2-second clip grid, the temporal endpoint feature (TEF) and span conversions.

One implementation shared by training, indexing and search (STYLE.md: one implementation of each idea).
Spans are either ``xx`` = (start, end) or ``cxw`` = (center, width); normalised spans are fractions of the
window length, clip spans are clip indices.
"""
from __future__ import annotations

import math

import torch

CLIP_SECONDS = 2.0


def num_clips(duration: float, clip_seconds: float = CLIP_SECONDS) -> int:
    """Clips the public extractors give a video of ``duration`` seconds (ffmpeg ``fps=1/clip_seconds``).

    The fps filter emits a frame for every output tick t = 0, 2, 4, ... that the stream reaches, rounding to the
    nearest tick at the end, so a 150-s video gives 75 clips and the 30.7-s real video 15.
    """
    return max(1, int(math.floor(duration / clip_seconds + 0.5)))


def clip_start_times(n_clips: int, clip_seconds: float = CLIP_SECONDS) -> list[float]:
    """Sample time (= start) of each clip: 0, 2, 4, ... seconds."""
    return [i * clip_seconds for i in range(n_clips)]


def temporal_endpoint_feature(n_clips: int, device=None) -> torch.Tensor:
    """TEF as the authors' dataset computes it: row i = (i / n, (i + 1) / n).

    Returns: Tensor [n_clips, 2].
    """
    start = torch.arange(n_clips, dtype=torch.float32, device=device) / n_clips
    return torch.stack([start, start + 1.0 / n_clips], dim=1)


def span_xx_to_cxw(xx: torch.Tensor) -> torch.Tensor:
    """[..., 2] (start, end) -> [..., 2] (center, width)."""
    return torch.stack([(xx[..., 0] + xx[..., 1]) / 2, xx[..., 1] - xx[..., 0]], dim=-1)


def span_cxw_to_xx(cxw: torch.Tensor) -> torch.Tensor:
    """[..., 2] (center, width) -> [..., 2] (start, end)."""
    return torch.stack([cxw[..., 0] - cxw[..., 1] / 2, cxw[..., 0] + cxw[..., 1] / 2], dim=-1)


def temporal_iou(spans1: torch.Tensor, spans2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU and union of xx spans.

    Args: spans1 [N, 2], spans2 [M, 2] (start, end).
    Returns: (iou [N, M], union [N, M]).
    """
    area1 = spans1[:, 1] - spans1[:, 0]
    area2 = spans2[:, 1] - spans2[:, 0]
    left = torch.max(spans1[:, None, 0], spans2[None, :, 0])
    right = torch.min(spans1[:, None, 1], spans2[None, :, 1])
    inter = (right - left).clamp(min=0)
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_temporal_iou(spans1: torch.Tensor, spans2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU (DETR's GIoU in 1-D) of xx spans. Returns [N, M]."""
    iou, union = temporal_iou(spans1, spans2)
    left = torch.min(spans1[:, None, 0], spans2[None, :, 0])
    right = torch.max(spans1[:, None, 1], spans2[None, :, 1])
    enclosing = (right - left).clamp(min=0)
    return iou - (enclosing - union) / enclosing
