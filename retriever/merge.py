"""Moments from candidate windows -> one ranked list: the final-score rule and NMS across overlapping windows.

The final score:

    final = confidence + COARSE_WEIGHT * coarse

``confidence`` is the reranker's foreground probability of the moment (softmax of its class logits). The model only
learned to compare moments WITHIN a window: every training window holds its moment, so a window of the wrong video
still gets a confident best moment. ``coarse`` is the mean CLIP cosine between the query and the clips of the
moment's span (exact, from the stored vectors), which IS comparable across videos. So the coarse term orders the
videos and the spans, and the confidence breaks near-ties (cosines within ~1/COARSE_WEIGHT of each other).

Measured on a decoded test world (23 videos, 66 sentences; bench/search.py decoded_world_study), VCMR R@1 at
IoU 0.5 / 0.7 by coarse weight: 0 (confidence alone) 31.8 / 31.8; 1 and 4: 95.5 / 90.9; 8: 97.0 / 93.9;
16 and 32: 98.5 / 95.5; 100: 98.5 / 98.5; 1e6 (span cosine alone): 98.5 / 97.0. Coarse alone (its best
pseudo-event, no reranker): 83.3 / 74.2. Without the reranker a coarse moment's score is its coarse score.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model.spans import covering_clips, temporal_nms

COARSE_WEIGHT = 100.0  # measured (module docstring); confidence then separates spans of near-equal cosine
NMS_IOU = 0.5  # moments of one video overlapping a better one by more than this are dropped


@dataclass
class Moment:
    video_id: int
    path: str
    start: float  # seconds, absolute in the video
    end: float
    confidence: float | None  # reranker foreground probability; None for coarse moments
    coarse: float  # mean query-clip cosine over the moment's clips
    saliency: list = field(default_factory=list)  # the window's per-clip saliency (reranker) or cosine (coarse)
    window: tuple[float, float] = (0.0, 0.0)  # the candidate window it came from (seconds)
    score: float = 0.0

    def to_dict(self, reranked: bool) -> dict:
        return {"path": self.path, "video_id": self.video_id, "start": round(float(self.start), 3),
                "end": round(float(self.end), 3), "score": round(float(self.score), 6),
                "coarse_score": round(float(self.coarse), 6),
                "confidence": None if self.confidence is None else round(float(self.confidence), 6),
                "saliency": [round(float(s), 4) for s in self.saliency],
                "window": [round(float(self.window[0]), 3), round(float(self.window[1]), 3)],
                "reranked": reranked}


def final_score(confidence: float | None, coarse: float, coarse_weight: float = COARSE_WEIGHT) -> float:
    """The ranking score of a moment (see the module docstring)."""
    if confidence is None:
        return float(coarse)
    return float(confidence) + coarse_weight * float(coarse)


def span_coarse_score(clip_scores: np.ndarray, first_clip: int, start: float, end: float,
                      clip_seconds: float) -> float:
    """Mean cosine of the window's clips that the span [start, end) s covers (at least the clip holding start).

    clip_scores [n] belong to clips first_clip .. first_clip + n - 1, on the index's grid of ``clip_seconds``.
    """
    n = len(clip_scores)
    a, b = covering_clips(start, end, clip_seconds)
    a, b = a - first_clip, b - first_clip
    a = min(max(a, 0), n - 1)
    b = min(max(b, a + 1), n)
    return float(np.mean(clip_scores[a:b]))


def nms_merge(moments: list[Moment], iou_threshold: float = NMS_IOU, top_k: int | None = None) -> list[Moment]:
    """Greedy NMS per video in final-score order; moments of different videos never suppress each other."""
    kept = temporal_nms([(m.start, m.end) for m in moments], [m.score for m in moments], iou_threshold, top_k,
                        groups=[m.video_id for m in moments])
    return [moments[i] for i in kept]
