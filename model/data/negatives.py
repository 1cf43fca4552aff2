"""Negative windows: clip windows that do NOT hold the query's moment, trained towards "no moment here".

A model that only ever sees windows holding their moment learns to find the best span in any window, so a window of
the wrong video still gets a confident moment and its scores mean nothing across windows. Negatives teach it the
difference. Sources (``TrainConfig.neg_sources``; one is drawn at random among those available for a sample):

- ``other``: a random window of another annotated video (another query's video, never one annotated with this
  query's text);
- ``hard``: a coarse candidate window of another video for the query, what search would rerank (needs a
  provider with ``hard_negatives(query, exclude)``: the index provider; public feature dirs have none);
- ``same``: a stretch of the query's own video away from every relevant window (at least ``MIN_CLIPS`` clips,
  one clip of margin);
- ``labels``: around a hit a person rejected for this query (the ``negative_windows`` of `vmr labels export`),
  grown outwards without touching a relevant window.

A negative sample's targets: no span, every decoder query background, saliency 0 on every clip
(negative_labels below; model.training.criterion handles samples without spans).
"""
from __future__ import annotations

import math
import random

from model.errors import ModelError

SOURCES = ("other", "hard", "same", "labels")
MIN_CLIPS = 4  # shortest negative window: a few clips of evidence, as a search window has


def _relevant_clips(ann: dict, clip_length: float, margin: int = 1) -> list[tuple[int, int]]:
    """Relevant windows as clip spans [a, b), widened by ``margin`` clips."""
    out = []
    for st, ed in (w[:2] for w in ann.get("relevant_windows") or []):
        out.append((max(0, int(math.floor(st / clip_length)) - margin), int(math.ceil(ed / clip_length)) + margin))
    return out


def _gaps(n_clips: int, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Stretches [a, b) of [0, n_clips) outside every span."""
    gaps, pos = [], 0
    for a, b in sorted(spans):
        if a > pos:
            gaps.append((pos, min(a, n_clips)))
        pos = max(pos, b)
    if pos < n_clips:
        gaps.append((pos, n_clips))
    return [(a, b) for a, b in gaps if b > a]


def _window_in(a: int, b: int, size: int, rng: random.Random) -> tuple[int, int]:
    """A random window of min(size, b - a) clips inside [a, b)."""
    length = min(size, b - a)
    start = rng.randint(a, b - length)
    return start, start + length


class NegativeSampler:
    """Draws negative windows for annotations.

    Args: annotations (all of the training set), provider (FeatureProvider; ``hard_negatives`` used when it has
    one), n_clips_of: vid -> clips of that video, v_limit: window size (clips; None = whole video),
    clip_length: seconds per clip, sources: subset of SOURCES.
    """

    def __init__(self, annotations: list[dict], provider, n_clips_of, v_limit: int | None, clip_length: float,
                 sources=SOURCES):
        unknown = sorted(set(sources) - set(SOURCES))
        if unknown:
            raise ModelError(f"unknown negative source(s) {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
        self.annotations, self.provider, self.n_clips_of = annotations, provider, n_clips_of
        self.v_limit, self.clip_length = v_limit, clip_length
        self.sources = [s for s in SOURCES if s in sources]
        self.vids = sorted({a["vid"] for a in annotations})
        self.vids_of_query: dict[str, set] = {}
        for a in annotations:
            self.vids_of_query.setdefault(a["query"], set()).add(a["vid"])
        self.hard = getattr(provider, "hard_negatives", None) if "hard" in self.sources else None
        self._hard_cache: dict[str, list] = {}
        many = getattr(provider, "hard_negatives_many", None) if self.hard is not None else None
        if many is not None:  # every query's coarse search once, up front (not one search per query mid-epoch)
            got = many(dict(self.vids_of_query))  # query -> the vids annotated with it (never negatives)
            self._hard_cache = {q: list(w) for q, w in got.items()}

    def _size(self, n: int) -> int:
        return n if self.v_limit is None else min(n, self.v_limit)

    # -- one source each: (vid, first clip, end clip) or None when the source has nothing for this annotation
    def other(self, ann: dict, rng: random.Random):
        banned = self.vids_of_query.get(ann["query"], set()) | {ann["vid"]}
        pool = [v for v in self.vids if v not in banned]
        if not pool:
            return None
        vid = rng.choice(pool)
        n = self.n_clips_of(vid)
        return (vid, *_window_in(0, n, self._size(n), rng)) if n else None

    def hard_windows(self, ann: dict) -> list:
        """Every coarse candidate window of other videos for the query: the windows a search would rerank (cached
        per query). Only the best 5 of them let the world reranker give near misses (two of the three attributes
        of the sentence's object) the moment's score."""
        if self.hard is None:
            return []
        if ann["query"] not in self._hard_cache:
            banned = self.vids_of_query.get(ann["query"], set()) | {ann["vid"]}
            self._hard_cache[ann["query"]] = list(self.hard(ann["query"], banned))
        return self._hard_cache[ann["query"]]

    def hard_one(self, ann: dict, rng: random.Random):
        pool = self.hard_windows(ann)
        return rng.choice(pool) if pool else None

    def same(self, ann: dict, rng: random.Random):
        n = self.n_clips_of(ann["vid"])
        gaps = [g for g in _gaps(n, _relevant_clips(ann, self.clip_length)) if g[1] - g[0] >= MIN_CLIPS]
        if not gaps:
            return None
        a, b = rng.choice(gaps)
        return (ann["vid"], *_window_in(a, b, self._size(n), rng))

    def labels(self, ann: dict, rng: random.Random):
        rejected = ann.get("negative_windows") or []
        if not rejected:
            return None
        n = self.n_clips_of(ann["vid"])
        st, ed = rng.choice(rejected)[:2]
        a = max(0, int(math.floor(st / self.clip_length)))
        b = min(n, max(a + 1, int(math.ceil(ed / self.clip_length))))
        # the stretch free of relevant clips that holds the rejected hit's first clip
        gap = next(((g0, g1) for g0, g1 in _gaps(n, _relevant_clips(ann, self.clip_length)) if g0 <= a < g1), None)
        if gap is None:
            return None
        lo, hi = gap
        b = min(b, hi)
        size = self._size(hi - lo)
        start = min(max(lo, (a + b) // 2 - size // 2), hi - size)  # centred on the rejected hit
        return ann["vid"], start, start + size

    def sample(self, ann: dict, rng: random.Random) -> tuple[str, str, int, int] | None:
        """(source, vid, first clip, end clip) of one negative window for ``ann``; sources tried in a random
        order until one has a window (None when none has: e.g. a one-video set with no room beside the moment)."""
        order = list(self.sources)
        rng.shuffle(order)
        draw = {"other": self.other, "hard": self.hard_one, "same": self.same, "labels": self.labels}
        for source in order:
            got = draw[source](ann, rng)
            if got is not None:
                return (source, *got)
        return None

    def describe(self) -> str:
        return ", ".join(self.sources)


def negative_labels(n_clips: int) -> dict:
    """Targets of a negative window (the keys model.data.targets.make_labels gives a positive one): no span target,
    saliency 0 everywhere; the hinge pair indices are placeholders the criterion skips for negatives."""
    import numpy as np
    import torch

    return {"spans": torch.zeros(0, 2), "saliency_pos": [0, 0], "saliency_neg": [0, 0],
            "saliency_all": np.zeros(n_clips, dtype=np.float32), "negative": True}
