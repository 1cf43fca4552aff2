"""`vmr serve`'s JSON API on a real uvicorn server (localhost, free port) over a real test-world index.

Covers: search fields (== in-process search), status (the note of an ingest stopped early; answers while another
process holds the file), video metadata, Range requests (exact bytes), thumbnails (cache in the index), traversal
attempts (.., encoded, absolute, a symlink planted in the video folder pointing outside; its hits say "not playable"
and why), oversized / malformed bodies and unknown ids (4xx with a JSON error), parallel label writes + searches
(counts consistent), `vmr labels export` (the format `vmr train --index` reads).
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS, WORLD_RERANKER

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not WORLD_RERANKER.is_file(), reason="world reranker not trained")]
SECRET = "vmr-secret-token-8c1f"  # content of a file outside the indexed folder: must never come back


def build_index(root: Path, n_videos: int = 4, seed: int = 11) -> tuple[Path, list[dict]]:
    """A test-world library (h264 mp4) plus planted escapes, indexed: returns (index dir, annotation rows).

    root/outside/ holds a secret text file and a copy of a world video; the video folder gets symlinks to both
    (escape.mp4 -> the outside video: indexed, since the indexer follows links; passwd.mp4 -> the secret)."""
    from indexer.ingest import run_ingest
    from world.generator import build_world

    _, rows = build_world(root, n_videos=n_videos, seed=seed, long_videos=0, min_duration=40, max_duration=80)
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET * 10)
    last = sorted((root / "videos").glob("*.mp4"))[-1]
    shutil.copy(last, outside / "elsewhere.mp4")
    os.symlink(outside / "elsewhere.mp4", root / "videos" / "escape.mp4")
    os.symlink(outside / "secret.txt", root / "videos" / "passwd.mp4")
    summary = run_ingest(str(root / "videos"), str(root / "index"), clip_model=str(WORLD_CLIP_CONFIG),
                         clip_pretrained=str(WORLD_CLIP_WEIGHTS), device="cpu", progress=False)
    assert summary.indexed == n_videos + 1 and [f["path"] for f in summary.failed] == ["passwd.mp4"]
    return root / "index", rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app):
    """uvicorn serving ``app`` on a free localhost port in a thread; yields the port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive()


def request(port: int, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
    """One raw HTTP request (the path goes out exactly as given): (status, headers, body bytes)."""
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        con.putrequest(method, path, skip_accept_encoding=True)
        headers = dict(headers or {})
        if isinstance(body, str):
            body = body.encode()
        if body is not None and "Content-Length" not in headers and "Transfer-Encoding" not in headers:
            headers["Content-Length"] = str(len(body))
        for k, v in headers.items():
            con.putheader(k, v)
        con.endheaders()
        try:  # a server that refuses a body early may close before it is all sent
            if body is not None and headers.get("Transfer-Encoding") == "chunked":
                for i in range(0, len(body), 4096):
                    piece = body[i: i + 4096]
                    con.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                con.send(b"0\r\n\r\n")
            elif body is not None:
                con.send(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        res = con.getresponse()
        return res.status, {k.lower(): v for k, v in res.getheaders()}, res.read()
    finally:
        con.close()


def get_json(port, path):
    status, _, body = request(port, "GET", path)
    assert status == 200, body[:300]
    return json.loads(body)


def post_json(port, path, payload, method="POST"):
    status, _, body = request(port, method, path, json.dumps(payload), {"Content-Type": "application/json"})
    return status, (json.loads(body) if body else None)


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("serve_world")
    index, rows = build_index(root)
    return root, index, rows


@pytest.fixture(scope="module")
def app(world):
    from server.app import create_app

    return create_app(str(world[1]), checkpoint=str(WORLD_RERANKER), device="cpu")


@pytest.fixture(scope="module")
def port(app):
    with running_server(app) as p:
        yield p


def video_ids(port) -> dict[str, int]:
    return {v["path"]: v["id"] for v in get_json(port, "/api/videos")["videos"]}


def test_search_matches_in_process_search_with_urls(port, app, world):
    query = world[2][0]["query"]
    out = get_json(port, "/api/search?q=" + query.replace(" ", "+") + "&top_k=5")
    direct = app.state.vmr.search(query, 5)[0]
    assert out["query"] == query and 1 <= len(out["moments"]) <= 5
    keys = ("path", "video_id", "start", "end", "score", "coarse_score", "confidence", "saliency", "window", "reranked")
    assert [{k: m[k] for k in keys} for m in out["moments"]] == [{k: m[k] for k in keys} for m in direct]
    first = out["moments"][0]
    assert first["path"] == f"{world[2][0]['vid']}.mp4" and first["rank"] == 1 and first["reranked"] is True
    assert first["video_url"] == f"/api/videos/{first['video_id']}/file"
    status, headers, jpeg = request(port, "GET", first["thumbnail_url"])
    assert status == 200 and headers["content-type"] == "image/jpeg" and jpeg[:2] == b"\xff\xd8"
    assert out["timings"]["total"] > 0


def test_status_videos_and_metadata(port, world):
    status = get_json(port, "/api/status")
    assert status["videos"] == 5 and status["ingest"] == {**status["ingest"], "running": False, "pending": 0,
                                                             "failed": 1, "done": 6, "total": 6}
    assert status["reranker"] is True and status["root"] == str(world[0] / "videos")
    ids = video_ids(port)
    assert "passwd.mp4" not in ids and len(ids) == 5
    one = get_json(port, f"/api/videos/{ids['escape.mp4']}")
    assert one["duration"] > 0 and abs(one["n_clips"] - one["duration"] / 2) <= 1 and one["events"]
    assert all(0 <= s < e <= one["duration"] + 1e-6 for s, e in one["events"])
    html = request(port, "GET", "/")
    assert html[0] == 200 and b"/static/app.js" in html[2]
    assert request(port, "GET", "/static/app.js")[0] == 200
    assert "/api/search" in get_json(port, "/openapi.json")["paths"]


def test_status_says_when_an_ingest_stopped_early(port, app, world):
    """A pending video with no ingest running (a `vmr index` stopped after listing its files) gets `vmr status`'s
    note; while an ingest holds the index's lock the same counts read as a running ingest."""
    from store.lock import ingest_lock

    state = app.state.vmr
    state.write(lambda con: con.execute("INSERT INTO videos (id, path, size, mtime, status) "
                                        "VALUES (9999, 'stopped.mp4', 1, 0, 'pending')"))
    try:
        ingest = get_json(port, "/api/status")["ingest"]
        assert ingest["running"] is False and ingest["pending"] == 1 and ingest["total"] == 7
        assert ingest["note"] == "5 of 7 videos indexed (1 not yet); ingest incomplete — re-run `vmr index` to finish"
        with ingest_lock(world[1]):
            ingest = get_json(port, "/api/status")["ingest"]
            assert ingest["running"] is True and ingest["note"].endswith("an ingest is running")
    finally:
        state.write(lambda con: con.execute("DELETE FROM videos WHERE id = 9999"))
    ingest = get_json(port, "/api/status")["ingest"]
    assert ingest["running"] is False and ingest["note"] is None and ingest["total"] == 6


@pytest.mark.slow
def test_status_answers_while_another_process_holds_the_index(port, app, world):
    """A writer (an ingest's commit batch, a FAISS rebuild) holding the DuckDB file: status still answers, with
    the last counts read and writer_active set; other requests wait, then say 503 (busy, retry), not 4xx/500;
    once it lets go the counts are read afresh and a label is written."""
    from store.db import LOCK_WAIT_SECONDS

    before = get_json(port, "/api/status")
    ids = video_ids(port)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from store.db import connect; "
                               "con = connect(sys.argv[1], read_only=False); print('held', flush=True); "
                               "sys.stdin.read(); con.close()", str(world[1])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == b"held"
        during = get_json(port, "/api/status")
        assert during["ingest"] == {**before["ingest"], "writer_active": True}
        assert during["labels"] == before["labels"] and during["videos"] == before["videos"]
        # the catalogue answers from memory: the video list, a video's bytes and thumbnails
        assert video_ids(port) == ids
        vid = ids[sorted(p for p in ids if p.startswith("world"))[0]]
        assert request(port, "GET", f"/api/videos/{vid}/file", headers={"Range": "bytes=0-99"})[0] == 206
        assert request(port, "GET", f"/api/videos/{vid}/thumbnail?t=5")[0] == 200
        # requests that need the file wait lock_wait (60 s by default; shortened here), then get 503 + Retry-After
        # (a search waits the store's own 60 s: not tried here)
        app.state.vmr.lock_wait = 0.5
        label = {"video_id": vid, "query": "while held", "start": 1.0, "end": 3.0}
        for method, path, body in (("POST", "/api/labels", json.dumps(label)), ("GET", "/api/labels", None)):
            status, headers, reply = request(port, method, path, body, {"Content-Type": "application/json"})
            assert status == 503 and headers["retry-after"] == "2", (path, status, reply[:200])
            assert "the index is busy" in json.loads(reply)["error"], path
    finally:
        app.state.vmr.lock_wait = LOCK_WAIT_SECONDS
        holder.stdin.close()
        assert holder.wait(60) == 0
    after = get_json(port, "/api/status")
    assert after["ingest"] == {**before["ingest"], "writer_active": False} and after["labels"] == before["labels"]
    assert post_json(port, "/api/labels", label)[0] == 201


def test_range_requests_return_exact_bytes(port, world):
    ids = video_ids(port)
    name = sorted(p for p in ids if p.startswith("world"))[0]
    data = (world[0] / "videos" / name).read_bytes()
    url = f"/api/videos/{ids[name]}/file"
    status, headers, body = request(port, "GET", url)
    assert status == 200 and body == data and headers["content-type"] == "video/mp4"
    assert headers.get("accept-ranges") == "bytes"
    for spec, want in ((f"bytes=100-199", data[100:200]), ("bytes=-50", data[-50:]),
                       (f"bytes={len(data) - 10}-", data[-10:]), ("bytes=0-0", data[:1])):
        status, headers, body = request(port, "GET", url, headers={"Range": spec})
        assert status == 206 and body == want, spec
        first = len(data) - len(want) if spec.startswith("bytes=-") or spec.endswith("-") else int(spec[6:].split("-")[0])
        assert headers["content-range"] == f"bytes {first}-{first + len(want) - 1}/{len(data)}"
    assert request(port, "GET", url, headers={"Range": f"bytes={len(data) + 5}-"})[0] == 416


def test_thumbnails_cached_in_the_index(port, world):
    from server.media import ThumbnailCache

    ids = video_ids(port)
    vid = ids[sorted(p for p in ids if p.startswith("world"))[0]]
    a = request(port, "GET", f"/api/videos/{vid}/thumbnail?t=3.9")
    b = request(port, "GET", f"/api/videos/{vid}/thumbnail?t=2.0")  # same 2-s clip
    c = request(port, "GET", f"/api/videos/{vid}/thumbnail?t=30")
    assert a[0] == b[0] == c[0] == 200 and a[2] == b[2] and a[2] != c[2]
    files = sorted(os.listdir(world[1] / "thumbnails"))
    assert any(f.startswith(f"{vid}-") and f.endswith("-1.jpg") for f in files)
    # a re-indexed video (other content) gets other files; videos gone are swept
    cache = ThumbnailCache(str(world[1]))
    assert cache.version({"id": 1, "content_hash": "aa"}) != cache.version({"id": 1, "content_hash": "bb"})
    assert cache.sweep(set(ids.values()) - {vid}) >= 2
    assert not any(f.startswith(f"{vid}-") for f in os.listdir(world[1] / "thumbnails"))


def test_traversal_and_escapes_are_refused(port, world):
    ids = video_ids(port)
    escape = ids["escape.mp4"]
    known = min(ids.values())
    attempts = ["/api/videos/..%2F..%2Foutside%2Fsecret.txt/file", "/api/videos/../../outside/secret.txt",
                "/api/videos/%2e%2e/file", "/api/videos/%2Fetc%2Fpasswd/file", "/api/videos//etc/passwd/file",
                "/static/../../outside/secret.txt", "/static/%2e%2e/%2e%2e/outside/secret.txt",
                "/static/..%2F..%2Fapp.py", "/static//etc/passwd", f"/static/{world[0]}/outside/secret.txt",
                "/api/videos/1.5/file", "/api/videos/-1/file", "/api/videos/999999/file",
                "/api/videos/999999/thumbnail", f"/api/videos/{escape}/file", f"/api/videos/{escape}/thumbnail?t=1",
                f"/api/videos/{known}/thumbnail?t=-3", f"/api/videos/{known}/thumbnail?t=nan", "/%2e%2e/%2e%2e/etc/passwd",
                "/api/labels?video_id=../../etc/passwd"]
    for path in attempts:
        status, headers, body = request(port, "GET", path)
        assert 400 <= status < 500, (path, status)
        assert headers["content-type"].startswith("application/json") and "error" in json.loads(body), path
        assert SECRET.encode() not in body and b"root:" not in body, path
    assert request(port, "GET", f"/api/videos/{escape}/file")[0] == 403  # indexed, but its real file is outside


def test_hits_whose_file_is_not_served_say_so(port, world):
    """escape.mp4 links to a copy of the last world video kept outside the indexed folder: indexed and found (the
    same frames as its original), but marked not playable, with the reason and no URLs to a file it refuses."""
    last = sorted(p.name for p in (world[0] / "videos").glob("world*.mp4"))[-1]
    row = next(r for r in world[2] if f"{r['vid']}.mp4" == last)
    hits = get_json(port, "/api/search?q=" + row["query"].replace(" ", "+") + "&top_k=20")["moments"]
    by_path = {}
    for h in hits:
        by_path.setdefault(h["path"], h)
    assert {last, "escape.mp4"} <= by_path.keys()
    escape = by_path["escape.mp4"]
    assert escape["playable"] is False and escape["unplayable_reason"] == "file not served: outside the indexed folder"
    assert escape["thumbnail_url"] is None and escape["video_url"] is None
    assert all(h["playable"] is True and h["unplayable_reason"] is None and h["video_url"] for h in hits
               if h["path"] != "escape.mp4")
    listed = {v["path"]: v for v in get_json(port, "/api/videos")["videos"]}
    assert listed["escape.mp4"]["playable"] is False and listed["escape.mp4"]["video_url"] is None
    assert listed[last]["playable"] is True
    assert request(port, "GET", f"/api/videos/{escape['video_id']}/thumbnail?t={escape['start']}")[0] == 403


def test_bad_bodies_and_unknown_ids(port):
    ok = {"video_id": min(video_ids(port).values()), "query": "a red circle", "start": 2.0, "end": 6.0}
    big = json.dumps({**ok, "query": "x" * 100_000})
    for headers in ({"Content-Type": "application/json"},
                    {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}):
        status, _, body = request(port, "POST", "/api/labels", big, headers)
        assert status == 413 and "error" in json.loads(body)
    bad = [("{not json", 422), ("[]", 422), (json.dumps({**ok, "start": "soon"}), 422),
           (json.dumps({**ok, "extra": 1}), 422), (json.dumps({**ok, "end": 1.0}), 422),
           (json.dumps({**ok, "verdict": "maybe"}), 422), (json.dumps({**ok, "query": " "}), 422),
           (json.dumps({**ok, "video_id": 424242}), 404), (json.dumps({**ok, "start": 1e9, "end": 2e9}), 422)]
    for payload, want in bad:
        status, _, body = request(port, "POST", "/api/labels", payload, {"Content-Type": "application/json"})
        assert status == want and "error" in json.loads(body), payload[:80]
    # No body bytes: h11 refuses the header itself, and a body it never reads would reset the connection.
    assert request(port, "POST", "/api/labels", None, {"Content-Length": "abc"})[0] == 400
    assert post_json(port, "/api/labels/987654", {"verdict": "reject"}, method="PATCH")[0] == 404
    assert request(port, "DELETE", "/api/labels/987654")[0] == 404
    for path in ("/api/search?q=", "/api/search?q=%20%20", "/api/search?q=a&top_k=0",
                 "/api/search?q=a&top_k=1000", "/api/search?q=" + "a" * 1001, "/api/search"):
        status, _, body = request(port, "GET", path)
        assert status == 422 and "error" in json.loads(body), path
    assert request(port, "GET", "/api/nothing-here")[0] == 404


@pytest.mark.slow
def test_parallel_label_writes_and_searches_stay_consistent(port, world):
    ids = sorted(v for p, v in video_ids(port).items() if p.startswith("world"))
    before = len(get_json(port, "/api/labels")["labels"])
    query = world[2][1]["query"]

    def write(i):
        status, label = post_json(port, "/api/labels", {"video_id": ids[i % len(ids)], "query": f"parallel {i % 3}",
                                                        "start": float(i % 20), "end": float(i % 20 + 4),
                                                        "verdict": "reject" if i % 4 == 0 else "accept"})
        assert status == 201, label
        if i % 5 == 0:
            assert post_json(port, f"/api/labels/{label['id']}", {"end": label["end"] + 1}, method="PATCH")[0] == 200
        if i % 7 == 0:
            assert request(port, "DELETE", f"/api/labels/{label['id']}")[0] == 204
        return label["id"]

    def search(_):
        return len(get_json(port, "/api/search?q=" + query.replace(" ", "+") + "&top_k=3")["moments"])

    with ThreadPoolExecutor(12) as pool:
        writes = [pool.submit(write, i) for i in range(60)]
        searches = [pool.submit(search, i) for i in range(12)]
        made = [f.result() for f in writes]
        assert all(f.result() >= 1 for f in searches)
    assert len(set(made)) == 60
    labels = get_json(port, "/api/labels")["labels"]
    deleted = len([i for i in range(60) if i % 7 == 0])
    assert len(labels) == before + 60 - deleted
    assert len({lab["id"] for lab in labels}) == len(labels)
    assert get_json(port, "/api/status")["labels"]["total"] == len(labels)
    patched = [lab for lab in labels if lab["query"].startswith("parallel") and lab["end"] - lab["start"] == 5.0]
    assert len(patched) == len([i for i in range(60) if i % 5 == 0 and i % 7 != 0])


def test_labels_export_is_training_input(port, world, tmp_path):
    from click.testing import CliRunner

    from cli import main
    from model.data.dataset import load_annotations

    vid = video_ids(port)[f"{world[2][2]['vid']}.mp4"]
    query = "a moment labelled for export"
    for start, end, verdict, source in ((4.0, 10.0, "accept", "hit"), (20.0, 24.0, "reject", "hit"),
                                        (12.0, 14.5, "accept", "mark")):
        status, _ = post_json(port, "/api/labels", {"video_id": vid, "query": query, "start": start, "end": end,
                                                    "verdict": verdict, "source": source})
        assert status == 201
    out = tmp_path / "ann.jsonl"
    res = CliRunner().invoke(main, ["labels", "export", "--index", str(world[1]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    records = load_annotations(str(out))
    mine = [r for r in records if r["query"] == query]
    assert len(mine) == 1
    assert mine[0]["vid"] == f"{world[2][2]['vid']}.mp4" and mine[0]["duration"] > 0
    assert mine[0]["relevant_windows"] == [[4.0, 10.0], [12.0, 14.5]]
    assert mine[0]["negative_windows"] == [[20.0, 24.0]]
    assert len({r["qid"] for r in records}) == len(records)
