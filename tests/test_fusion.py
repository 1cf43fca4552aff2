"""Channel fusion and the text index's query rules (retriever/fusion.py, store/text_index.py), on plain data and a real
tantivy index over a real DuckDB file."""
from __future__ import annotations

import duckdb
import pytest

from retriever.fusion import FusionConfig, fuse, matched_span, seeds_of, snap, text_moments

tantivy = pytest.importorskip("tantivy")


def _moment(vid, start, end, **kw):
    return {"path": f"v{vid}.mp4", "video_id": vid, "start": start, "end": end, "score": 0.0, "reranked": True, **kw}


def test_matched_span_phrase_and_content_words():
    words = ["The", "coach", "says,", "we", "play", "zone", "and", "the", "zone", "holds."]
    assert matched_span(words, '"play zone"') == (4, 5, 1.0)
    assert matched_span(words, "the coach says") == (1, 2, 1.0)  # function words do not stretch the span
    assert matched_span(words, "the") == (0, 0, 1.0)  # ... unless nothing else is asked for
    assert matched_span(words, "coach holds firm") == (1, 1, pytest.approx(1 / 3))  # the run holding most terms
    assert matched_span(words, "goalkeeper") is None


def test_snap_widens_to_the_clip_grid():
    assert snap(3.1, 4.2, 2.0, 30.0) == (2.0, 6.0)
    assert snap(4.0, 4.0, 2.0, 30.0) == (4.0, 6.0)  # at least one clip
    assert snap(27.5, 29.9, 2.0, 29.0) == (26.0, 29.0)  # clamped to the video


def test_rrf_merges_one_moment_proposed_by_two_channels():
    cfg = FusionConfig(k=60.0, weights={"visual": 1.0, "speech": 1.0})
    visual = [_moment(1, 0, 10), _moment(2, 20, 30)]
    speech = [_moment(2, 22, 26, channel="speech", matched_text="we play zone", reranked=False),
              _moment(3, 0, 2, coverage=0.5)]
    out = fuse({"visual": visual, "speech": speech}, cfg, top_k=5)
    assert [(m["video_id"], m["channels"]) for m in out] == [(2, ["speech", "visual"]), (1, ["visual"]),
                                                             (3, ["speech"])]  # gated: half its terms
    assert out[2]["fusion_score"] == pytest.approx(0.5 / 62, abs=1e-6)
    assert out[0]["fusion_score"] == pytest.approx(1 / 62 + 1 / 61, abs=1e-6)
    assert (out[0]["start"], out[0]["end"], out[0]["matched_text"]) == (20, 30, "we play zone")  # reranker's edges


def test_weights_are_data_and_coarse_edges_yield_to_the_words():
    visual = [_moment(1, 0, 40, reranked=False), _moment(2, 2, 8, reranked=False)]
    speech = [_moment(2, 4, 6, channel="speech", matched_text="zone")]
    out = fuse({"visual": visual, "speech": speech}, FusionConfig(weights={"visual": 0.1, "speech": 5.0}), 2)
    assert out[0]["video_id"] == 2 and (out[0]["start"], out[0]["end"]) == (4, 6)
    assert FusionConfig.load().k > 0  # the shipped config file parses


def test_text_index_hits_become_moments(tmp_path):
    from store import transcripts
    from store.text_index import TextIndex

    con = duckdb.connect(str(tmp_path / "t.duckdb"))
    transcripts.ensure_tables(con)
    text = "then the coach says we play zone tonight"
    words = [{"word": w, "start": 10 + 0.4 * i, "end": 10.3 + 0.4 * i} for i, w in enumerate(text.split())]
    transcripts.commit(con, 7, "speech", {"state": "ok", "language": "en"}, [{"start": 10, "end": 13.5,
                                                                               "text": text, "words": words}])
    index = TextIndex(tmp_path)
    assert index.sync(con)["added"] == 1
    segments = index.matching_segments(con, '"play zone"', 5)
    moments = text_moments(segments, '"play zone"', {7: {"path": "a.mp4", "status": "indexed", "duration": 60.0}},
                           2.0)
    assert [(m["start"], m["end"], m["matched_text"], m["coverage"]) for m in moments] == [
        (12.0, 14.0, "play zone", 1.0)]
    assert [m["matched_text"] for m in text_moments(index.matching_segments(con, "the", 5), "the", {
        7: {"path": "a.mp4", "status": "indexed", "duration": 60.0}}, 2.0)] == ["the"]
    assert seeds_of(moments, FusionConfig(), 2.0) == {7: [6]}
    assert index.matching_segments(con, '"zone play"', 5) == []  # order matters in a phrase
    transcripts.commit(con, 7, "speech", {"state": "no_speech", "reason": "silent audio"}, [])
    assert index.matching_segments(con, "coach", 5) == []  # DuckDB moved on: a stale hit is dropped
    assert index.sync(con)["deleted"] == 1
