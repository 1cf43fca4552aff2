"""Moments from candidate windows -> one ranked list: the ranking score and NMS across overlapping windows.

A reranked moment's ranking score (``ScoreRule``, stored in the checkpoint by the training that fit it):

    score = model_score + coarse_weight * coarse

``model_score`` is the reranker's own measure of "this span is the query's moment", in [0, 1]:
    "confidence"  the foreground probability of the span (softmax of its decoder query's class logits);
    "saliency"    the mean sigmoid saliency over the span's clips;
    "both"        their geometric mean;
    "relevance"   the mean relevance over the span's clips (a model trained with the relevance head,
                  model.net.llmepet.RelevanceHead: how well each clip matches the sentence, trained against negatives);
    "relevance_confidence"  the geometric mean of relevance and confidence.
These are comparable across windows and videos only for a model trained with negative windows (model.data.negatives):
one that never saw a window without its moment finds a confident moment in every window. ``coarse`` is the mean
CLIP cosine between the query and the span's clips (exact, from the stored vectors). ``coarse_weight`` is fit on
validation queries after training (retriever.fit_score), never set by hand; a checkpoint without a fitted rule
ranks by its confidence alone. A coarse (not reranked) moment's score is its coarse score.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from model.spans import covering_clips, temporal_nms

NMS_IOU = 0.5  # moments of one video overlapping a better one by more than this are dropped
MODEL_SCORES = ("confidence", "saliency", "both", "relevance", "relevance_confidence")
RELEVANCE_SCORES = ("relevance", "relevance_confidence")  # need a model with the relevance head


@dataclass(frozen=True)
class ScoreRule:
    """How a reranked moment is scored (module docstring). Stored as a dict in the checkpoint's model config
    (``extra["score_rule"]``) with the validation figures it was fit on."""
    model: str = "confidence"
    coarse_weight: float = 0.0

    def __post_init__(self):
        if self.model not in MODEL_SCORES:
            raise ValueError(f"model score must be one of {', '.join(MODEL_SCORES)}, not {self.model!r}")

    def model_score(self, m: "Moment") -> float:
        if self.model == "confidence":
            return float(m.confidence)
        if self.model == "saliency":
            return float(m.span_saliency)
        if self.model == "both":
            return math.sqrt(max(float(m.confidence), 0.0) * max(float(m.span_saliency), 0.0))
        if m.span_relevance is None:
            raise ValueError(f"the rule {self.model!r} needs a reranker with the relevance head")
        if self.model == "relevance":
            return float(m.span_relevance)
        return math.sqrt(max(float(m.confidence), 0.0) * max(float(m.span_relevance), 0.0))

    def score(self, m: "Moment") -> float:
        if m.confidence is None:  # a coarse moment
            return float(m.coarse)
        return self.model_score(m) + self.coarse_weight * float(m.coarse)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ScoreRule":
        d = d or {}
        return cls(model=d.get("model", "confidence"), coarse_weight=float(d.get("coarse_weight", 0.0)))


@dataclass
class Moment:
    video_id: int
    path: str
    start: float  # seconds, absolute in the video
    end: float
    confidence: float | None  # reranker foreground probability in [0, 1]; None for coarse moments
    coarse: float  # mean query-clip cosine over the moment's clips, in [-1, 1]
    # the window's per-clip saliency: sigmoid of the reranker's saliency in [0, 1], or the cosine (coarse moments)
    saliency: list = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)  # the candidate window it came from (seconds)
    score: float = 0.0
    span_saliency: float | None = None  # mean sigmoid saliency over the span's clips (reranked moments)
    span_relevance: float | None = None  # mean relevance over the span's clips (a reranker with the relevance head)

    def to_dict(self, reranked: bool) -> dict:
        return {"path": self.path, "video_id": self.video_id, "start": round(float(self.start), 3),
                "end": round(float(self.end), 3), "score": round(float(self.score), 6),
                "coarse_score": round(float(self.coarse), 6),
                "confidence": None if self.confidence is None else round(float(self.confidence), 6),
                "saliency": [round(float(s), 4) for s in self.saliency],
                "span_saliency": None if self.span_saliency is None else round(float(self.span_saliency), 6),
                "relevance": None if self.span_relevance is None else round(float(self.span_relevance), 6),
                "window": [round(float(self.window[0]), 3), round(float(self.window[1]), 3)],
                "reranked": reranked}


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
    """Greedy NMS per video in ranking-score order; moments of different videos never suppress each other."""
    kept = temporal_nms([(m.start, m.end) for m in moments], [m.score for m in moments], iou_threshold, top_k,
                        groups=[m.video_id for m in moments])
    return [moments[i] for i in kept]
