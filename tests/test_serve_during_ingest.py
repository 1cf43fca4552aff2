"""`vmr serve` while `vmr index` adds videos to the same index (issue 11: the page works during an ingest and shows
the new videos after it).

A real uvicorn server over a 2-video test-world index; then 3 more videos land in the folder and a `vmr index`
child process (real Ray: it joins this session's cluster) indexes them. While that ingest holds the index's lock:
/api/status says an ingest is running and counts its progress, searches answer 200 with the already-indexed videos,
label writes succeed (the server and the ingest take turns at the DuckDB file). After it: the counts hold all 5
videos, nothing reads as running or incomplete, and a search finds a new video. Polls with deadlines, no timing
asserts.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.test_server_api import get_json, post_json, running_server
from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS, WORLD_RERANKER

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not WORLD_RERANKER.is_file(), reason="world reranker not trained")]
N_FIRST, N_LATER = 2, 3
INGEST_DEADLINE_S = 300  # the child ingest on a loaded 2-core machine takes ~10-30 s


def search_paths(port: int, query: str, top_k: int = 5) -> list[str]:
    out = get_json(port, "/api/search?" + urllib.parse.urlencode({"q": query, "top_k": top_k}))
    return [m["path"] for m in out["moments"]]


@pytest.fixture(scope="module")
def library(tmp_path_factory, ray_session):
    """(root, index dir, annotation rows, first video names, later video names): the first videos indexed, the
    later ones kept aside in root/later."""
    from indexer.ingest import run_ingest
    from world.generator import build_world

    root = tmp_path_factory.mktemp("serve_ingest_world")
    _, rows = build_world(root, n_videos=N_FIRST + N_LATER, seed=31, long_videos=0, min_duration=40,
                          max_duration=80)
    names = sorted(p.name for p in (root / "videos").glob("*.mp4"))
    first, later = names[:N_FIRST], names[N_FIRST:]
    (root / "later").mkdir()
    for name in later:
        shutil.move(root / "videos" / name, root / "later" / name)
    summary = run_ingest(str(root / "videos"), str(root / "index"), clip_model=str(WORLD_CLIP_CONFIG),
                         clip_pretrained=str(WORLD_CLIP_WEIGHTS), device="cpu", progress=False)
    assert summary.indexed == N_FIRST and not summary.failed
    return root, root / "index", rows, first, later


@pytest.mark.slow
def test_page_api_works_during_an_ingest_and_shows_new_videos_after(library, ray_session):
    from server.app import create_app
    from store.lock import ingest_running

    root, index, rows, first, later = library
    old_row = next(r for r in rows if f"{r['vid']}.mp4" in first)
    new_row = next(r for r in rows if f"{r['vid']}.mp4" in later)
    app = create_app(str(index), checkpoint=str(WORLD_RERANKER), device="cpu")
    with running_server(app) as port:
        ids = {v["path"]: v["id"] for v in get_json(port, "/api/videos")["videos"]}
        assert sorted(ids) == first
        before = get_json(port, "/api/status")
        assert before["videos"] == N_FIRST and before["ingest"]["running"] is False
        assert f"{old_row['vid']}.mp4" in search_paths(port, old_row["query"])

        for name in later:
            shutil.move(root / "later" / name, root / "videos" / name)
        log = open(root / "ingest.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "cli", "index", str(root / "videos"), "--index", str(index),
                                 "--device", "cpu", "--workers", "1",
                                 "--ray-address", ray_session.get_runtime_context().gcs_address],
                                stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
        statuses, stop = [], threading.Event()

        def poll_status():  # the page polls /api/status; here as often as the server answers
            while not stop.is_set():
                statuses.append(get_json(port, "/api/status")["ingest"])
                time.sleep(0.1)

        poller = threading.Thread(target=poll_status, daemon=True)
        poller.start()
        searched = labelled = 0
        deadline = time.monotonic() + INGEST_DEADLINE_S
        try:
            while proc.poll() is None:
                assert time.monotonic() < deadline, "the ingest did not finish"
                if not ingest_running(index):
                    time.sleep(0.05)
                    continue
                # both requests are made while the ingest holds the index: counted only if it still does after
                paths = search_paths(port, old_row["query"])
                status, label = post_json(port, "/api/labels", {
                    "video_id": ids[f"{old_row['vid']}.mp4"], "query": old_row["query"],
                    "start": 2.0, "end": 6.0 + labelled % 5, "verdict": "accept", "source": "mark"})
                assert status == 201, label
                assert f"{old_row['vid']}.mp4" in paths, paths
                if ingest_running(index):
                    searched += 1
                    labelled += 1
                time.sleep(0.2)  # a person's pace, not a load test (bench/serve.py is that)
        finally:
            stop.set()
            poller.join(30)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        assert proc.returncode == 0, (root / "ingest.log").read_text()[-2000:]
        assert searched >= 1 and labelled >= 1, "no request was made while the ingest ran"

        # the status showed the ingest running with its progress: the new files counted, not all done yet
        running = [s for s in statuses if s["running"]]
        assert running, statuses[-3:]
        assert any(s["total"] == N_FIRST + N_LATER and s["done"] < s["total"] and s["pending"] >= 1
                   for s in running), running[-3:]
        assert all(s["note"].endswith("an ingest is running") for s in running if s["pending"])
        done = [s["done"] for s in statuses]
        assert done == sorted(done), "progress went backwards"

        after = get_json(port, "/api/status")
        assert after["videos"] == N_FIRST + N_LATER
        assert after["ingest"] == {**after["ingest"], "running": False, "pending": 0, "failed": 0,
                                   "done": N_FIRST + N_LATER, "note": None}
        assert after["labels"]["total"] == len(get_json(port, "/api/labels")["labels"]) >= labelled
        listed = {v["path"]: v for v in get_json(port, "/api/videos")["videos"]}
        assert sorted(listed) == sorted(first + later)
        hits = get_json(port, "/api/search?" + urllib.parse.urlencode({"q": new_row["query"], "top_k": 5}))
        new_hit = next(m for m in hits["moments"] if m["path"] == f"{new_row['vid']}.mp4")
        assert new_hit["playable"] is True
        status, _ = post_json(port, "/api/labels", {"video_id": new_hit["video_id"], "search_id": hits["search_id"],
                                                    "start": new_hit["start"], "end": new_hit["end"]})
        assert status == 201
        thumb = urllib.request.urlopen(f"http://127.0.0.1:{port}{new_hit['thumbnail_url']}", timeout=60)
        assert thumb.status == 200 and thumb.read(2) == b"\xff\xd8"
