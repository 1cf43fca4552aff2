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


def _two_kind_checkpoint(path, clip_dim: int, text_dim: int, slow_dim: int) -> str:
    """A random tiny LLMEPET that reads [slowfast | clip] per clip, as the authors' released checkpoints do."""
    import torch

    from model.inference.checkpoint import save_checkpoint
    from model.config import ModelConfig
    from model.net.llmepet import build_model
    from model.data.sample import DataConfig

    torch.manual_seed(0)
    cfg = ModelConfig(txt_dim=text_dim, vid_dim=slow_dim + clip_dim + 2, hidden_dim=32, nheads=4, dim_feedforward=64,
                      enc_layers=1, dec_layers=1, t2v_layers=1, dummy_layers=1, moment_layers=1, sent_layers=1,
                      num_dummies=3, total_prompts=3, num_queries=5, llm="random", llm_dim=32, llm_heads=4,
                      llm_kv_heads=4, llm_ffn_dim=64, llm_layers="0:1")
    spec = {"clip_model": "world_clip:world_clip.pt", "video_kinds": ["slowfast", "clip"],
            "video_dims": [slow_dim, clip_dim], "text_dim": text_dim, "clip_seconds": 2.0}
    save_checkpoint(str(path), build_model(cfg), DataConfig(), spec, "custom")
    return str(path)


def test_reranker_input_is_the_checkpoints_kinds_in_its_order(synthetic_index, tmp_path):
    """A checkpoint reading [slowfast | clip] is refused by an index without slowfast (one line naming it); once
    the index holds slowfast for all videos but one, each window's input is that video's stored slowfast rows
    beside its clip rows, and the video without it keeps its coarse moments (counted as unread)."""
    import shutil

    from retriever.search import SearchEngine
    from store.errors import VmrError
    from store.library import Library

    index = tmp_path / "index"
    shutil.copytree(synthetic_index[0], index)
    target = synthetic_index[2]
    ckpt = _two_kind_checkpoint(tmp_path / "two_kinds.pt", clip_dim=32, text_dim=32, slow_dim=6)
    with pytest.raises(VmrError) as refused:
        SearchEngine(index, checkpoint=ckpt, device="cpu")
    assert "'slowfast'" in str(refused.value) and "\n" not in str(refused.value)

    rng = np.random.default_rng(0)
    record = {"dim": 6, "dtype": "float16", "model": "test", "weights": "none", "precision": "fp32", "frames": "-"}
    slow = {}
    with Library(index, read_only=False) as lib:
        for video in lib.videos(status="indexed"):
            if video["path"] != "long.mp4":
                slow[video["id"]] = rng.standard_normal((video["n_clips"] + 1, 6)).astype(np.float16)
                lib.commit_features(video["id"], "slowfast", slow[video["id"]], record)
    with SearchEngine(index, checkpoint=ckpt, device="cpu") as engine:
        pooled, _ = engine.encode_query(target.sentence())
        windows = engine.candidates(pooled)
        ready, unread = engine.reranker.with_inputs(engine.library, windows, "clip")
        assert [w.path for w in unread] and all(w.path == "long.mp4" for w in unread)
        assert ready
        for window in ready:
            clips = engine.library.clip_embeddings(window.video_id)[window.first_clip: window.last_clip]
            expected = np.concatenate([slow[window.video_id][window.first_clip: window.last_clip], clips], 1)
            np.testing.assert_array_equal(window.feats, expected.astype(np.float32))
        result = engine.search(target.sentence(), top_k=500)  # past every reranked moment: the coarse ones follow
    assert result.rerank_depth["unread"] == len(unread)
    long_hits = [m for m in result.moments if m["path"] == "long.mp4"]
    assert long_hits and all(m["reranked"] is False for m in long_hits)
    assert any(m["reranked"] for m in result.moments)


def test_several_libraries_search_as_one(synthetic_index, tmp_path):
    """Two libraries of different folders are searched as one (`vmr search --index A --index B`): their video
    ids do not collide, each query finds its video in whichever library holds it, the merged clip hits are the
    best of both; two indexes of one folder, or of another CLIP, are refused in one line."""
    from click.testing import CliRunner

    import cli
    from model.inference.features import ClipEncoder
    from retriever.search import SearchEngine
    from store.coarse_store import CoarseStore, LibrarySet
    from store.errors import VmrError
    from store.library import Library
    from world.synthetic import write_library

    _, videos, target = synthetic_index
    encoder = ClipEncoder.load(str(WORLD_CLIP_CONFIG), str(WORLD_CLIP_WEIGHTS), device="cpu")
    first, second = tmp_path / "a", tmp_path / "b"
    write_library(first, videos[:10], encoder, root="/videos/a")
    write_library(second, videos[10:20] + videos[-1:], encoder, seed=1, root="/videos/b")  # the long one in b
    with Library(first) as a, Library(second) as b:
        assert isinstance(a, CoarseStore)
        ids_a, ids_b = {v["id"] for v in a.videos()}, {v["id"] for v in b.videos()}
        assert ids_a and ids_b and not ids_a & ids_b
        both = LibrarySet([a, b])
        query = encoder.encode_text([target.sentence()])[0]
        merged = both.search_clips(query, 30)
        expected = sorted(a.search_clips(query, 30) + b.search_clips(query, 30), key=lambda h: -h[2])[:30]
        assert [h[2] for h in merged] == [h[2] for h in expected]
        assert {h[0] for h in merged} & ids_a and {h[0] for h in merged} & ids_b
        rows = both.videos_by_id({h[0] for h in merged})
        assert set(rows) == {h[0] for h in merged}  # each id read from the library that holds it
    with SearchEngine([first, second], rerank=False, device="cpu") as engine:
        assert engine.search(target.sentence(), top_k=3).moments[0]["path"] == "long.mp4"
        assert engine.search(videos[3].events[0].obj.sentence(), top_k=20).moments
    out = CliRunner().invoke(cli.main, ["search", target.sentence(), "--index", str(first), "--index", str(second),
                                        "--no-rerank", "--json", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert '"long.mp4"' in out.output

    twin = tmp_path / "twin"
    write_library(twin, videos[:2], encoder, root="/videos/a")
    with pytest.raises(VmrError, match="share library id") as refused:
        SearchEngine([first, twin], rerank=False, device="cpu")
    assert "\n" not in str(refused.value)
