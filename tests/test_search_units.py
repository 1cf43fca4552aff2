"""Search pieces without Ray: window placement, tiling, merge/NMS, coarse stage on a synthetic world library."""
from __future__ import annotations

import numpy as np
import pytest

from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS
from world.generator import WorldEvent, WorldVideo
from world.scene import WorldObject
from retriever.merge import Moment, ScoreRule, nms_merge, span_coarse_score
from retriever.windows import (MAX_WINDOW_CLIPS, Window, best_event_moment, best_stretch_mean, event_clip_spans,
                               index_clip_seconds, window_around)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_window_around_short_video_is_whole_video():
    assert window_around(10, 40, [(0, 20), (20, 40)]) == (0, 40)


def test_window_around_keeps_hit_event_whole_and_snaps_to_boundary():
    spans = [(0, 100), (100, 130), (130, 170), (170, 300)]
    first, n = window_around(140, 300, spans)
    assert n == MAX_WINDOW_CLIPS
    assert first <= 130 and 170 <= first + n  # the hit's event [130, 170) is inside
    assert first in {a for a, _ in spans} | {b for _, b in spans}  # snapped to a boundary
    first, n = window_around(299, 300, [(0, 300)])  # no events to snap to: clamped to the video end
    assert first + n == 300


def test_clip_length_comes_from_the_index():
    assert index_clip_seconds({"clip_seconds": 1.0}) == 1.0
    assert index_clip_seconds({}) == 2.0  # indexes written before the field: the 2-s grid
    w = Window(1, "a.mp4", 31.0, first_clip=10, n_clips=25, clip_seconds=1.0)
    assert (w.start, w.end) == (10.0, 31.0)
    assert Window(1, "a.mp4", 90.0, 10, 25, 2.0).end == 70.0
    events = [{"start": 0.0, "end": 6.0}, {"start": 6.0, "end": 31.0}]
    assert event_clip_spans(events, 31, 1.0) == [(0, 6), (6, 31)]
    assert event_clip_spans(events, 16, 2.0) == [(0, 3), (3, 16)]


def test_best_event_moment_picks_highest_mean_event():
    scores = np.array([0.1, 0.1, 0.9, 0.8, 0.2, 0.95, 0.1, 0.1], np.float32)
    (a, b), s = best_event_moment(scores, [(0, 2), (2, 4), (4, 8)], first_clip=0)
    assert (a, b) == (2, 4) and s == pytest.approx(0.85)


def test_span_coarse_score_and_score_rule():
    scores = np.array([0.0, 0.5, 1.0, 0.5], np.float32)
    assert span_coarse_score(scores, 10, 22.0, 26.0, 2.0) == pytest.approx(0.75)  # clips 11, 12
    coarse = Moment(1, "a", 0, 4, None, 0.3)
    m = Moment(1, "a", 0, 4, 0.81, 0.5, span_saliency=0.25)
    assert ScoreRule().score(coarse) == 0.3  # a coarse moment is scored by its cosine
    assert ScoreRule().score(m) == pytest.approx(0.81)  # no fitted rule: the model's confidence alone
    assert ScoreRule("saliency", 2.0).score(m) == pytest.approx(0.25 + 2.0 * 0.5)
    assert ScoreRule("both").score(m) == pytest.approx(0.45)  # geometric mean
    assert ScoreRule.from_dict(ScoreRule("both", 0.5).to_dict()) == ScoreRule("both", 0.5)
    with pytest.raises(ValueError):
        ScoreRule("cosine")


def test_relevance_rules_and_the_two_step_fit():
    """The relevance rules read span_relevance; the fit picks the model score that ranks best alone, then the
    coarse weight that ranks best with it (here: the coarse cosine alone would rank best, the confidence worst)."""
    from retriever.fit_score import fit_rule

    m = Moment(1, "a", 0, 4, 0.64, 0.5, span_saliency=0.25, span_relevance=0.81)
    assert ScoreRule("relevance", 1.0).score(m) == pytest.approx(0.81 + 0.5)
    assert ScoreRule("relevance_confidence").score(m) == pytest.approx(0.72)
    # per query: the moment (video 1) and a decoy (video 2) that the confidence and the coarse cosine prefer
    per_query = []
    for q in range(4):
        right = Moment(1, "a", 0, 4, 0.5, 0.30, span_saliency=0.5, span_relevance=0.9)
        decoy = Moment(2, "b", 0, 4, 0.9, 0.31 if q else 0.9, span_saliency=0.6, span_relevance=0.2)
        per_query.append(([right, decoy], 1, [[0, 4]]))
    rule, table = fit_rule(per_query)
    assert rule.model == "relevance"  # alone: R@1 100 (as relevance_confidence: ties go to the earlier score)
    assert table["relevance/0"]["VCMR_R1@0.5"] == 100.0 and table["confidence/0"]["VCMR_R1@0.5"] == 0.0
    assert rule.coarse_weight == 0.0  # the coarse term only hurts it: the smallest weight
    no_head = [([Moment(1, "a", 0, 4, 0.5, 0.3, span_saliency=0.5)], 1, [[0, 4]])]
    assert not any(k.startswith("relevance") for k in fit_rule(no_head)[1])  # a model without the head


def test_nms_merge_suppresses_overlaps_within_a_video_only():
    ms = [Moment(1, "a", 10, 20, 0.9, 0.5, score=3), Moment(1, "a", 11, 21, 0.8, 0.5, score=2),
          Moment(2, "b", 10, 20, 0.7, 0.5, score=1), Moment(1, "a", 40, 50, 0.6, 0.5, score=0.5)]
    kept = nms_merge(ms)
    assert [(m.video_id, m.start) for m in kept] == [(1, 10), (2, 10), (1, 40)]
    assert len(nms_merge(ms, top_k=2)) == 2


@pytest.fixture(scope="module")
def synthetic_index(tmp_path_factory):
    """A synthetic-vector library: 30 short videos + a 10-minute one whose only events lie past 150 s."""
    from world.generator import ObjectPool, sample_video
    from world.synthetic import write_library
    from model.inference.features import ClipEncoder

    rng = np.random.default_rng(0)
    target = WorldObject("purple", "cross", "left")
    pool = ObjectPool(rng, exclude={target})
    videos = [sample_video(rng, f"v{i:03d}", 2 * int(rng.integers(30, 76)), pool) for i in range(30)]
    videos.append(WorldVideo("long", 600.0, 40, [WorldEvent(target, 400.0, 430.0)]))
    encoder = ClipEncoder.load(str(WORLD_CLIP_CONFIG), str(WORLD_CLIP_WEIGHTS), device="cpu")
    index = tmp_path_factory.mktemp("synthetic") / "index"
    write_library(index, videos, encoder)
    return index, videos, target


def test_coarse_finds_moment_past_150s_in_10_minute_video(synthetic_index):
    from retriever.search import SearchEngine

    index, videos, target = synthetic_index
    with SearchEngine(index, rerank=False, device="cpu") as engine:
        pooled, _ = engine.encode_query(target.sentence())
        windows = engine.candidates(pooled)
        results = engine.search(target.sentence(), top_k=5).moments
    assert windows[0].path == "long.mp4" and windows[0].n_clips == MAX_WINDOW_CLIPS
    assert windows[0].first_clip <= 200 and 215 <= windows[0].last_clip  # the window holds the event
    top = results[0]
    assert top["path"] == "long.mp4" and top["reranked"] is False
    inter = min(top["end"], 430) - max(top["start"], 400)
    assert inter / (max(top["end"], 430) - min(top["start"], 400)) >= 0.5
    assert len(top["saliency"]) == MAX_WINDOW_CLIPS


def test_best_stretch_mean_finds_a_short_moment_inside_a_long_event():
    scores = np.array([0.1] * 10 + [0.9, 0.8, 0.85] + [0.1] * 10, np.float32)
    (_, _), event_mean = best_event_moment(scores, [(0, len(scores))], first_clip=0)
    assert best_stretch_mean(scores) == pytest.approx(0.85) and event_mean < 0.3
    # brute force over every run of >= 3 clips agrees
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 40):
        s = rng.random(n)
        brute = max(s[a:b].mean() for a in range(n) for b in range(a + min(3, n), n + 1))
        assert best_stretch_mean(s) == pytest.approx(brute)
