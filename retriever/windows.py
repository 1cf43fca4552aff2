"""Candidate windows: the ≤75-clip stretches of a video that the reranker reads.

The reranker was trained on 150-s videos (75 clips of 2 s), so a longer video is covered by several windows. A
window is placed around the evidence the coarse index found (hit clips), centred on the pseudo-event that holds the
hit and, where the event still fits, its start snapped back to an event boundary so that the reranker sees whole
events rather than a cut through one. A video of ≤75 clips is one window, the whole video.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model.spans import CLIP_SECONDS, clip_to_seconds, seconds_to_clip

MAX_WINDOW_CLIPS = 75  # the reranker's input length (QVHighlights: 150 s / 2 s)


def index_clip_seconds(meta: dict) -> float:
    """The clip length an index was built with (its meta ``clip_seconds``; indexes that predate the field: 2 s)."""
    return float(meta.get("clip_seconds") or CLIP_SECONDS)


@dataclass
class Window:
    """A stretch [first_clip, first_clip + n_clips) of one video, with its exact clip similarities to the query.

    clip_seconds: the index's clip length; feats: np.float32 [n_clips, D] clip embeddings; clip_scores: np.float32 [n_clips] cosine to the query.
    score: the window's coarse score (retriever.coarse); moment: the coarse moment (start_clip,
    end_clip_exclusive) in video clips.
    """
    video_id: int
    path: str
    duration: float
    first_clip: int
    n_clips: int
    clip_seconds: float
    feats: np.ndarray = field(repr=False, default=None)
    clip_scores: np.ndarray = field(repr=False, default=None)
    score: float = float("-inf")
    moment: tuple[int, int] = (0, 0)

    @property
    def start(self) -> float:
        return clip_to_seconds(self.first_clip, self.clip_seconds)

    @property
    def end(self) -> float:
        return min(clip_to_seconds(self.last_clip, self.clip_seconds), max(self.duration, self.start))

    @property
    def last_clip(self) -> int:  # exclusive
        return self.first_clip + self.n_clips

    def overlap(self, other: "Window") -> int:
        """Clips shared with another window of the same video (0 for other videos)."""
        if other.video_id != self.video_id:
            return 0
        return max(0, min(self.last_clip, other.last_clip) - max(self.first_clip, other.first_clip))


def event_clip_spans(events: list[dict], n_clips: int, clip_seconds: float) -> list[tuple[int, int]]:
    """Stored events (seconds) -> clip spans [a, b) on the clip grid, clamped to the video, at least one clip."""
    spans = []
    for ev in events:
        a = seconds_to_clip(ev["start"], clip_seconds)
        b = seconds_to_clip(ev["end"], clip_seconds)
        a = min(max(a, 0), n_clips - 1)
        spans.append((a, min(max(b, a + 1), n_clips)))
    return spans


def window_around(hit_clip: int, n_clips: int, event_spans: list[tuple[int, int]],
                  max_clips: int = MAX_WINDOW_CLIPS) -> tuple[int, int]:
    """The window (first_clip, length) placed for a hit at ``hit_clip`` in a video of ``n_clips`` clips.

    Centred on the pseudo-event holding the hit; start snapped back to the latest event boundary that keeps that
    event inside the window (the reranker then sees the event whole and any event leading into it).
    """
    if n_clips <= max_clips:
        return 0, n_clips
    event = next(((a, b) for a, b in event_spans if a <= hit_clip < b), (hit_clip, hit_clip + 1))
    a, b = event
    if b - a >= max_clips:  # an event longer than a window: centre on the hit itself
        a, b = hit_clip, hit_clip + 1
    centre = (a + b) // 2
    start = min(max(centre - max_clips // 2, 0), n_clips - max_clips)
    boundaries = sorted({s for s, _ in event_spans} | {e for _, e in event_spans})
    snapped = [s for s in boundaries if s <= start and s + max_clips >= b]
    if snapped:
        start = snapped[-1]
    return start, max_clips


def best_event_moment(clip_scores: np.ndarray, event_spans: list[tuple[int, int]], first_clip: int
                      ) -> tuple[tuple[int, int], float]:
    """The coarse moment of a window: the stored pseudo-event (clipped to the window) of highest mean clip score.

    Args: clip_scores [n] of the window's clips; event_spans in video clips. Returns ((a, b) video clips, score).
    """
    n = len(clip_scores)
    best, best_score = (first_clip + int(np.argmax(clip_scores)), first_clip + int(np.argmax(clip_scores)) + 1), -np.inf
    for a, b in event_spans:
        lo, hi = max(a, first_clip), min(b, first_clip + n)
        if hi <= lo:
            continue
        s = float(clip_scores[lo - first_clip: hi - first_clip].mean())
        if s > best_score:
            best, best_score = (lo, hi), s
    if best_score == -np.inf:
        best_score = float(clip_scores.max())
    return best, best_score


EVIDENCE_CLIPS = 3  # shortest stretch (6 s) whose mean cosine ranks a window; see best_stretch_mean


def best_stretch_mean(clip_scores: np.ndarray, min_clips: int = EVIDENCE_CLIPS) -> float:
    """The highest mean clip score over any run of ≥ ``min_clips`` consecutive clips (all clips if fewer).

    A pseudo-event can hold a short moment together with unrelated clips around it (the segmentation is
    query-blind), and its mean then hides the moment. The best run of a few clips does not. Runs shorter than
    ``min_clips`` are too easily won by one noisy clip of a distractor video. Only lengths < 2 * min_clips need
    checking: a longer run splits into two runs of ≥ min_clips, one of which has at least its mean.
    """
    scores = np.asarray(clip_scores, dtype=np.float64)
    n = len(scores)
    if n <= min_clips:
        return float(scores.mean())
    prefix = np.concatenate([[0.0], np.cumsum(scores)])
    return max(float(((prefix[length:] - prefix[:-length]) / length).max())
               for length in range(min_clips, min(2 * min_clips, n + 1)))
