"""Pseudo-events: cut a video into segments where its clip features change (LLMEPET's event regulation).

Self-similarity of the L2-normalised clip features, a 5x5 checkerboard kernel slid along the diagonal gives a
novelty score per clip; boundaries are the clips whose novelty is a local maximum and at least the video's mean
novelty, plus the first and last clip. Consecutive boundaries delimit the events.

The authors compute this on a padded batch; the mean then includes padding, and their boundary pairing rolls
across batch elements (an odd batch size yields a negative-width span in another video). Here it is computed per
video on its valid clips only. Training (event-head targets) and indexing (stored segments) both call this.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# +1 within the past block and within the future block, -1 across them, 0 on the centre row/column.
CHECKERBOARD_KERNEL = torch.tensor([[1., 1., 0., -1., -1.],
                                    [1., 1., 0., -1., -1.],
                                    [0., 0., 0., 0., 0.],
                                    [-1., -1., 0., 1., 1.],
                                    [-1., -1., 0., 1., 1.]])


def novelty_scores(clip_features: torch.Tensor) -> torch.Tensor:
    """Checkerboard novelty along the diagonal of the cosine self-similarity matrix.

    Args: clip_features [T, D] (any scale; normalised here). Returns: [T].
    """
    feats = clip_features.float()
    feats = feats / (feats.norm(dim=1, keepdim=True) + 1e-8)
    self_similarity = feats @ feats.T  # [T, T]
    kernel = CHECKERBOARD_KERNEL.to(feats.device)
    half = kernel.shape[0] // 2
    padded = F.pad(self_similarity, (half, half, half, half))  # zeros outside the video, as the authors
    response = F.conv2d(padded[None, None], kernel[None, None])[0, 0]  # [T, T]
    return torch.diagonal(response)


def pseudo_event_boundaries(clip_features: torch.Tensor) -> list[int]:
    """Boundary clip indices, sorted, always including 0 and T-1.

    Args: clip_features [T, D] of ONE video, valid clips only.
    """
    n = clip_features.shape[0]
    if n == 1:
        return [0]
    score = novelty_scores(clip_features)
    threshold = score.mean()
    score[0] = score[-1] = float("inf")  # the ends are always boundaries
    left = torch.cat([score[:1], score[:-1]])  # neighbour values; the ends compare with themselves
    right = torch.cat([score[1:], score[-1:]])
    is_boundary = (score >= left) & (score >= right) & (score >= threshold)
    return [int(i) for i in torch.nonzero(is_boundary).flatten()]


def pseudo_event_clip_spans(clip_features: torch.Tensor) -> list[tuple[int, int]]:
    """Events as (start_boundary, end_boundary) clip indices between consecutive boundaries.

    A video of T clips with boundaries b_0=0 < ... < b_k=T-1 gives [(b_0, b_1), ..., (b_{k-1}, b_k)];
    a 1-clip video gives [(0, 0)].
    """
    bounds = pseudo_event_boundaries(clip_features)
    if len(bounds) == 1:
        return [(0, 0)]
    return list(zip(bounds[:-1], bounds[1:]))


def pseudo_event_spans_cxw(clip_features: torch.Tensor) -> torch.Tensor:
    """Events as the model's targets: normalised (center, width) = ((b_i + b_{i+1}) / 2T, (b_{i+1} - b_i) / T).

    Returns: Tensor [n_events, 2].
    """
    n = clip_features.shape[0]
    spans = torch.tensor(pseudo_event_clip_spans(clip_features), dtype=torch.float32, device=clip_features.device)
    return torch.stack([(spans[:, 0] + spans[:, 1]) / 2, spans[:, 1] - spans[:, 0]], dim=1) / n
