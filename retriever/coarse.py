"""Coarse stage: a query's pooled CLIP text embedding -> scored candidate windows across the library.

1. FAISS hits over clip vectors and pseudo-event vectors (``search_clips`` / ``search_events`` of the library, a
   ``store.coarse_store.CoarseStore``: one index or several as one; the store re-scores approximate hits exactly).
2. Hits grouped by video; the best ``max_videos`` videos by their best hit are kept.
3. For each kept video the exact clip similarities are computed from its DuckDB vectors, and windows of ≤75 clips
   are placed around its hits (``windows.window_around``), at most ``max_windows_per_video`` per video.
4. A window's coarse moment is its best pseudo-event (highest mean similarity). Its score is the larger of that
   mean and the best mean over any 3-6 consecutive clips (``windows.best_stretch_mean``): a pseudo-event that
   also holds unrelated clips dilutes a short moment, and at 10^4 videos the event mean alone lets the diluted
   target window fall behind distractors (bench/search.py, synthetic world at 10^4 videos, 34 queries: target
   video ranked first 76.5% by the event mean alone vs 88.2% by the larger of the two; coarse+rerank VCMR R@5
   IoU.5 70.6 vs 76.5, equal to the exhaustive baseline). The top ``n_windows`` windows are returned, best first.

Clip indices and seconds are converted on the index's own clip grid (``clip_seconds``, from its meta).
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from model.spans import CLIP_SECONDS
from retriever.windows import (MAX_WINDOW_CLIPS, Window, best_event_moment, best_stretch_mean, event_clip_spans,
                               window_around)


@dataclass
class CoarseConfig:
    clip_hits: int = 512  # FAISS neighbours over clip vectors
    event_hits: int = 128  # FAISS neighbours over pseudo-event vectors
    max_videos: int = 40  # videos whose exact clip scores are computed
    max_windows_per_video: int = 3
    n_windows: int = 24  # windows handed to the reranker
    window_clips: int = MAX_WINDOW_CLIPS  # clips a window spans: the reranker's input length (its max_v_l)


def score_window(window: Window, feats: np.ndarray, scores: np.ndarray, spans) -> Window:
    """Fill a window's features, clip scores, coarse moment and coarse score (module docstring, step 4).

    feats [T, D] and scores [T] of the whole video; spans: its pseudo-events in clips."""
    window.feats = feats[window.first_clip: window.last_clip]
    window.clip_scores = scores[window.first_clip: window.last_clip]
    window.moment, event_score = best_event_moment(window.clip_scores, spans, window.first_clip)
    window.score = max(event_score, best_stretch_mean(window.clip_scores))
    return window


def video_windows(video: dict, features: tuple, query: np.ndarray, seeds: list[int], max_windows: int,
                  clip_seconds: float = CLIP_SECONDS, window_clips: int = MAX_WINDOW_CLIPS) -> list[Window]:
    """Windows of one video around its seed clips (best seed first), scored exactly from its stored vectors.

    features: the video's (clip embeddings [T, D], pseudo-event clip spans), as ``features_of`` reads them."""
    vid = int(video["id"])
    feats, spans = features
    n = len(feats)
    if n == 0:
        return []
    scores = feats @ query  # [T] exact cosine (vectors are L2-normalised)
    order = sorted({min(max(int(s), 0), n - 1) for s in seeds}, key=lambda c: -scores[c])
    windows: list[Window] = []
    for clip in order:
        if len(windows) >= max_windows:
            break
        if any(w.first_clip <= clip < w.last_clip for w in windows):
            continue
        first, length = window_around(clip, n, spans, window_clips)
        window = Window(vid, video["path"], float(video["duration"]), first, length, clip_seconds)
        windows.append(score_window(window, feats, scores, spans))
    return windows


def coarse_candidates(library, query: np.ndarray, cfg: CoarseConfig | None = None,
                      videos: dict[int, dict] | None = None, timings: dict | None = None,
                      clip_seconds: float = CLIP_SECONDS, extra_seeds: dict[int, list[int]] | None = None) -> list[Window]:
    """Top candidate windows for a query embedding.

    Args: library: an open ``store.coarse_store.CoarseStore`` (a Library, or a LibrarySet); query: np.float32 [D], L2-normalised; timings: if given,
        receives the seconds spent in "coarse" (index search) and "windows" (exact scores, window placement);
        clip_seconds: the index's clip length; extra_seeds: {video id: [clip]} proposed by another channel (the
        text hits of retriever.fusion): a window around each, scored alike, is added after the best ones unless one
        of them already holds that clip, so that the visual stage alone does not decide what the reranker sees.
    Returns: windows sorted by coarse score, best first (≤ cfg.n_windows), then the seeded windows.
    """
    cfg = cfg or CoarseConfig()
    t0 = time.perf_counter()
    seeds: dict[int, list[int]] = defaultdict(list)
    best: dict[int, float] = defaultdict(lambda: -np.inf)
    for vid, clip, score in library.search_clips(query, cfg.clip_hits):
        seeds[int(vid)].append(int(clip))
        best[int(vid)] = max(best[int(vid)], float(score))
    event_hits = library.search_events(query, cfg.event_hits) if cfg.event_hits else []
    # DuckDB reads are batched: one query per table for all hit videos (per-video reads would be ~60% of a
    # query's time at 10^4 videos)
    events_of = library.events_many({int(vid) for vid, _, _ in event_hits})
    for vid, idx, score in event_hits:
        vid = int(vid)
        ev = next((e for e in events_of[vid] if int(e["idx"]) == int(idx)), None)
        if ev is not None:  # the event's middle clip seeds a window
            seeds[vid].append(int((ev["start"] + ev["end"]) / 2 // clip_seconds))
            best[vid] = max(best[vid], float(score))
    extra_seeds = extra_seeds or {}
    if videos is None:
        videos = {v: row for v, row in library.videos_by_id(set(best) | set(extra_seeds)).items()
                  if row.get("status") == "indexed"}
    ranked = [v for v in sorted(best, key=lambda v: -best[v]) if v in videos][: cfg.max_videos]
    t1 = time.perf_counter()
    features = features_of(library, sorted(set(ranked) | {v for v in extra_seeds if v in videos}), clip_seconds,
                           events_of)
    windows = []
    for vid in ranked:
        windows += video_windows(videos[vid], features[vid], query, seeds[vid], cfg.max_windows_per_video,
                                 clip_seconds, cfg.window_clips)
    windows.sort(key=lambda w: -w.score)
    windows = windows[: cfg.n_windows]
    for vid, clips in extra_seeds.items():
        for clip in clips:
            held = any(w.video_id == vid and w.first_clip <= clip < w.last_clip for w in windows)
            if vid in videos and not held:
                windows += video_windows(videos[vid], features[vid], query, [clip], 1, clip_seconds, cfg.window_clips)
    if timings is not None:
        timings["coarse"] = timings.get("coarse", 0.0) + t1 - t0
        timings["windows"] = timings.get("windows", 0.0) + time.perf_counter() - t1
    return windows


def with_spans(feats: np.ndarray, events: list[dict], clip_seconds: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(clip embeddings f32 [T, D], pseudo-event clip spans) of one video from its stored rows."""
    feats = np.asarray(feats, dtype=np.float32)
    return feats, event_clip_spans(events, len(feats), clip_seconds) if len(feats) else []


def features_of(library, video_ids, clip_seconds: float = CLIP_SECONDS,
                events_of: dict[int, list[dict]] | None = None) -> dict[int, tuple]:
    """{id: (clip embeddings f32 [T, D], pseudo-event clip spans)} of several videos, one DuckDB query per table.

    events_of: stored events already read for some of them (not read again)."""
    events_of = dict(events_of or {})
    events_of.update(library.events_many([v for v in video_ids if v not in events_of]))
    return {vid: with_spans(feats, events_of[vid], clip_seconds)
            for vid, feats in library.clip_embeddings_many(video_ids).items()}

