"""Training targets of one sample, as the authors' dataset makes them: span targets (GT windows, at most
``max_windows``, a random subset, in normalised (center, width) over the window's length), saliency labels, and
the training crop of a video longer than one window (placed at random around the first GT window).
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch

from model.data.sample import DataConfig
from model.spans import span_xx_to_cxw

SALIENCY_SAMPLES = 2  # positive and negative clips per sample (hard + easy for QVHighlights, 2 random otherwise)


def training_crop(n_clips: int, ann: dict, cfg: DataConfig, rng: random.Random) -> tuple[int, int]:
    """(first clip, end clip) of a max_v_l window placed at random so that it holds the first GT window (or as
    much of it as fits)."""
    size = cfg.v_limit
    st, ed = ann["relevant_windows"][0][:2]
    gs = max(0, min(n_clips - 1, int(math.floor(st / cfg.clip_length))))
    ge = max(gs + 1, min(n_clips, int(math.ceil(ed / cfg.clip_length))))
    if ge - gs >= size:
        lo, hi = gs, ge - size
    else:
        lo, hi = max(0, ge - size), min(gs, n_clips - size)
    start = rng.randint(lo, max(lo, hi))
    return start, start + size


def crop_annotation(ann: dict, start: int, end: int, clip_length: float) -> dict:
    """The annotation as seen from clips [start, end): windows clipped and shifted, clip ids re-based."""
    t0, t1 = start * clip_length, end * clip_length
    out = dict(ann, duration=t1 - t0)
    if "relevant_windows" in ann:
        windows = [[max(w[0], t0) - t0, min(w[1], t1) - t0] for w in ann["relevant_windows"]
                   if w[1] > t0 and w[0] < t1]
        out["relevant_windows"] = [w for w in windows if w[1] > w[0]]
    if "relevant_clip_ids" in ann and "saliency_scores" in ann:
        kept = [(c - start, s) for c, s in zip(ann["relevant_clip_ids"], ann["saliency_scores"]) if start <= c < end]
        out["relevant_clip_ids"] = [c for c, _ in kept]
        out["saliency_scores"] = [s for _, s in kept]
    return out


def span_targets(windows: list, n_clips: int, cfg: DataConfig, rng: random.Random) -> torch.Tensor:
    """[#windows, 2] normalised (center, width) targets; a random max_windows subset when there are more."""
    windows = [list(w[:2]) for w in windows]
    if len(windows) > cfg.max_windows:
        rng.shuffle(windows)
        windows = windows[:cfg.max_windows]
    xx = torch.tensor(windows, dtype=torch.float32) / (n_clips * cfg.clip_length)
    return span_xx_to_cxw(xx)


def saliency_from_scores(clip_ids: list[int], scores: list, n_clips: int, rng: random.Random):
    """QVHighlights labels: per-clip sum of the 3 annotators' scores; positives = the top-scored relevant clip
    (hard) + a random relevant clip (easy); negatives = the lowest-scored relevant clip (hard) + a random clip
    outside the relevant ones (easy; the hard pair again when there is none).

    Returns (pos [2], neg [2], all_scores [n_clips]).
    """
    # Clip ids past the features (upstream grows the score array instead) are dropped.
    pairs = [(c, float(np.sum(s))) for c, s in zip(clip_ids, scores) if c < n_clips]
    if not pairs:
        return None
    ids = [c for c, _ in pairs]
    agg = np.array([a for _, a in pairs])
    all_scores = np.zeros(n_clips, dtype=np.float32)
    all_scores[ids] = agg
    order = np.argsort(agg)  # increasing, numpy's default sort as upstream
    hard_pos, hard_neg = [ids[order[-1]]], [ids[order[0]]]
    easy_pool = sorted(set(range(n_clips)) - set(ids))
    if easy_pool:
        easy_pos, easy_neg = rng.sample(ids, 1), rng.sample(easy_pool, 1)
    else:
        easy_pos, easy_neg = hard_pos, hard_neg
    return hard_pos + easy_pos, hard_neg + easy_neg, all_scores


def saliency_from_window(window, duration: float, n_clips: int, rng: random.Random):
    """Charades / TACoS (no saliency annotation): clips inside the first GT window score 1; 2 random inside are
    positives, 2 random outside negatives (the positives again when the window covers the video)."""
    clip_seconds = duration / n_clips
    gs = int(window[0] / clip_seconds)
    ge = max(0, min(int(window[1] / clip_seconds), n_clips) - 1)
    gs = min(gs, ge)
    pos = rng.sample(range(gs, ge + 1), SALIENCY_SAMPLES) if gs != ge else [gs] * SALIENCY_SAMPLES
    pool = list(range(0, gs)) + list(range(ge + 1, n_clips))
    neg = rng.sample(pool, SALIENCY_SAMPLES) if len(pool) >= SALIENCY_SAMPLES else list(pos)
    all_scores = np.zeros(n_clips, dtype=np.float32)
    all_scores[gs:ge + 1] = 1
    return pos, neg, all_scores


def make_labels(ann: dict, n_clips: int, cfg: DataConfig, rng: random.Random) -> dict:
    """Training targets of one sample (see the module docstring)."""
    labels = {"spans": span_targets(ann["relevant_windows"], n_clips, cfg, rng)}
    sal = None
    if ann.get("relevant_clip_ids") and ann.get("saliency_scores"):
        sal = saliency_from_scores(ann["relevant_clip_ids"], ann["saliency_scores"], n_clips, rng)
    if sal is None:
        sal = saliency_from_window(ann["relevant_windows"][0], ann["duration"], n_clips, rng)
    labels["saliency_pos"], labels["saliency_neg"], labels["saliency_all"] = sal
    return labels
