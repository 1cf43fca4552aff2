"""`vmr serve`'s JSON API on a real uvicorn server (localhost, free port) over a real test-world index.

Covers: search fields (== in-process search), status (the note of an ingest stopped early; answers while another
process holds the file), video metadata, Range requests (exact bytes), thumbnails (cache in the index), traversal
attempts (.., encoded, absolute, a symlink planted in the video folder pointing outside; its hits say "not playable"
and why), oversized / malformed bodies and unknown ids (4xx with a JSON error), parallel label writes + searches
(counts consistent), `vmr labels export` (the format `vmr train --index` reads), a hit's label bound to its
search's sentence, stale writes (If-Match -> 409), delete + restore, clip downloads and `vmr export-clip` (stream
copy and re-encode, decoded back; bad bounds 422 / one line), a foreign Host (400 on every route), and a
server with tokens (401 on every route but the page and its login; labels record the token's name).
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
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
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
        headers = dict(headers or {})
        con.putrequest(method, path, skip_accept_encoding=True, skip_host="Host" in headers)
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
        label = {"video_id": vid, "query": "while held", "start": 1.0, "end": 3.0, "source": "mark"}
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
    ok = {"video_id": min(video_ids(port).values()), "query": "a red circle", "start": 2.0, "end": 6.0,
          "source": "mark"}
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
                                                        "source": "mark", "start": float(i % 20),
                                                        "end": float(i % 20 + 4),
                                                        "verdict": "reject" if i % 4 == 0 else "accept"})
        assert status == 201, label
        if i % 5 == 0:
            assert post_json(port, f"/api/labels/{label['id']}", {"end": label["end"] + 1}, method="PATCH")[0] == 200
        if i % 7 == 0:
            assert request(port, "DELETE", f"/api/labels/{label['id']}")[0] == 200
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
    for start, end, verdict, source in ((4.0, 10.0, "accept", "mark"), (20.0, 24.0, "reject", "mark"),
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


def test_a_hit_label_takes_the_sentence_its_search_was_for(port, world):
    """A hit's label names the search that found it (search_id) and takes that search's sentence: another
    sentence (the search box changed since), an unknown search (the server restarted) or a window that search did
    not find are refused; one label per (sentence, hit): a second verdict answers 409 with the first."""
    query = world[2][3]["query"]
    found = get_json(port, "/api/search?q=" + query.replace(" ", "+") + "&top_k=5")
    other = get_json(port, "/api/search?q=a+yellow+star+slides+down&top_k=5")
    assert found["search_id"] != other["search_id"]
    hit = found["moments"][0]
    label = {"video_id": hit["video_id"], "start": hit["start"], "end": hit["end"], "search_id": found["search_id"]}
    status, body = post_json(port, "/api/labels", {**label, "query": "a yellow star slides down"})
    assert status == 409 and f"found for “{query}”" in body["error"]
    status, body = post_json(port, "/api/labels", {**label, "search_id": other["search_id"]})
    assert status == 422 and "not a hit of search" in body["error"]
    status, body = post_json(port, "/api/labels", {**label, "search_id": "0123456789abcdef"})
    assert status == 409 and "search again" in body["error"]
    status, body = post_json(port, "/api/labels", {k: v for k, v in label.items() if k != "search_id"})
    assert status == 422 and "search_id" in body["error"]
    status, made = post_json(port, "/api/labels", label)
    assert status == 201 and made["query"] == query and made["search_id"] == found["search_id"]
    assert made["orig_start"] == hit["start"] and made["version"] == 1
    status, body = post_json(port, "/api/labels", {**label, "verdict": "reject"})  # a second tab, stale
    assert status == 409 and body["label"]["id"] == made["id"] and body["label"]["verdict"] == "accept"
    listed = get_json(port, "/api/labels?query=" + query.upper().replace(" ", "+"))["labels"]
    assert [lab["id"] for lab in listed] == [made["id"]]


def test_stale_writes_get_409_and_deletes_undo(port):
    """If-Match names the version a tab saw (the ETag): a stale PATCH or DELETE gets 409 with the stored label;
    a delete hides the label, restore brings it back."""
    vid = min(video_ids(port).values())
    status, headers, body = request(port, "POST", "/api/labels", json.dumps(
        {"video_id": vid, "query": "two tabs", "start": 5.0, "end": 9.0, "source": "mark"}),
        {"Content-Type": "application/json"})
    made = json.loads(body)
    assert status == 201 and headers["etag"] == '"1"'

    def change(method, path, payload, version):
        status, headers, body = request(port, method, path, None if payload is None else json.dumps(payload),
                                        {"Content-Type": "application/json", "If-Match": f'"{version}"'})
        return status, headers, json.loads(body)

    status, headers, body = change("PATCH", f"/api/labels/{made['id']}", {"verdict": "reject"}, 1)
    assert status == 200 and body["version"] == 2 and headers["etag"] == '"2"'
    status, _, body = change("PATCH", f"/api/labels/{made['id']}", {"end": 11.0}, 1)  # the other tab saw 1
    assert status == 409 and body["label"]["verdict"] == "reject" and "since you saw it" in body["error"]
    assert change("DELETE", f"/api/labels/{made['id']}", None, 1)[0] == 409
    status, _, body = change("DELETE", f"/api/labels/{made['id']}", None, 2)
    assert status == 200 and body["deleted_at"]
    assert made["id"] not in [lab["id"] for lab in get_json(port, "/api/labels")["labels"]]
    status, body = post_json(port, f"/api/labels/{made['id']}/restore", {})
    assert status == 200 and body["deleted_at"] is None and body["end"] == 9.0
    assert made["id"] in [lab["id"] for lab in get_json(port, "/api/labels")["labels"]]
    assert request(port, "PATCH", f"/api/labels/{made['id']}", "{}",
                   {"Content-Type": "application/json", "If-Match": "soon"})[0] == 400


def _every_route(app, video_id: int) -> list[tuple[str, str]]:
    """(method, path) of every route of the app, path parameters filled in, plus a static file."""
    out = [("GET", "/static/app.js")]
    for route in app.routes:
        methods = sorted(getattr(route, "methods", None) or [])
        if not methods or "{path" in route.path:
            continue
        path = route.path.replace("{video_id}", str(video_id)).replace("{label_id}", "1")
        out.append((methods[0] if methods[0] != "HEAD" else methods[-1], path))
    return out


def test_a_foreign_host_header_gets_400_on_every_route(port, app):
    """DNS rebinding: a page on evil.example.com whose name points at 127.0.0.1 reads nothing."""
    vid = min(video_ids(port).values())
    routes = _every_route(app, vid)
    assert len(routes) >= 12
    for method, path in routes:
        status, headers, body = request(port, method, path, headers={"Host": "evil.example.com"})
        assert status == 400, (method, path, status)
        assert "does not answer to Host 'evil.example.com'" in json.loads(body)["error"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST"):
        assert request(port, "GET", "/api/videos", headers={"Host": host})[0] == 200, host


def test_a_server_with_tokens_answers_only_with_one(world):
    """Bound beyond localhost: every route but the page and its login gets 401 without a token; a Bearer header or
    the cookie POST /api/login sets lets one in; a label made with a token records the token's name; a name given
    with --allow-host (a reverse proxy's) is answered, others are not."""
    from server.app import create_app
    from server.access import allowed_hosts, host_of, parse_tokens

    assert parse_tokens(["ana=0123456789", "abcdefghij"]) == {"0123456789": "ana", "abcdefghij": "user"}
    with pytest.raises(ValueError, match="too short"):
        parse_tokens(["ana=short"])
    assert host_of("[::1]:8000") == "::1" and host_of("Videos.Example.com:443") == "videos.example.com"
    assert {"10.1.2.3", "localhost"} <= allowed_hosts("10.1.2.3")
    secured = create_app(str(world[1]), checkpoint=str(WORLD_RERANKER), device="cpu", host="10.1.2.3",
                         allow_hosts=("videos.example.com",), tokens={"s3cret-token": "ana"})
    with running_server(secured) as p:
        vid = min(v["id"] for v in json.loads(request(p, "GET", "/api/videos", headers={
            "Authorization": "Bearer s3cret-token"})[2])["videos"] if v["playable"])
        for method, path in _every_route(secured, vid):
            status, _, body = request(p, method, path)
            if path in ("/", "/static/app.js", "/favicon.ico"):
                assert status in (200, 204), path
            elif path == "/api/login":
                assert status == 422  # no body: the login form's own error, not 401
            else:
                assert status == 401 and "access token" in json.loads(body)["error"], (method, path, status)
        assert request(p, "GET", "/api/status", headers={"Authorization": "Bearer wrong-token"})[0] == 401
        status, _, body = request(p, "POST", "/api/login", json.dumps({"token": "wrong-token"}),
                                  {"Content-Type": "application/json"})
        assert status == 401
        status, headers, body = request(p, "POST", "/api/login", json.dumps({"token": "s3cret-token"}),
                                        {"Content-Type": "application/json"})
        assert status == 200 and json.loads(body) == {"user": "ana"}
        cookie = headers["set-cookie"].split(";")[0]
        assert "httponly" in headers["set-cookie"].lower() and "samesite=strict" in headers["set-cookie"].lower()
        assert request(p, "GET", f"/api/videos/{vid}/file", headers={"Cookie": cookie, "Range": "bytes=0-9"})[0] == 206
        status, _, body = request(p, "POST", "/api/labels", json.dumps(
            {"video_id": vid, "query": "with a token", "start": 1.0, "end": 2.0, "source": "mark"}),
            {"Content-Type": "application/json", "Cookie": cookie})
        assert status == 201 and json.loads(body)["author"] == "ana"
        assert request(p, "GET", "/api/status", headers={"Cookie": cookie, "Host": "videos.example.com"})[0] == 200
        assert request(p, "GET", "/api/status", headers={"Cookie": cookie, "Host": "10.1.2.3:8000"})[0] == 200
        assert request(p, "GET", "/api/status", headers={"Cookie": cookie, "Host": "evil.example.com"})[0] == 400


def test_clip_download_is_the_moment(port, world, tmp_path):
    """GET /api/videos/{id}/clip: at a keyframe (0 s) a stream copy, off one a re-encode; each decodes to the
    moment's length and opens on the source frame shown at start; named after the video; bad bounds 422."""
    from tests.test_clips import decoded, frame_shown_at, keyframe_times, mean_colour

    ids = video_ids(port)
    name = sorted(p for p in ids if p.startswith("world"))[0]
    src = world[0] / "videos" / name
    fps = get_json(port, f"/api/videos/{ids[name]}")["fps"]
    off = 5.3
    assert not any(abs(k - off) < 0.5 / fps for k in keyframe_times(src))
    for start, end, method in ((0.0, 6.0, "copy"), (off, off + 4.0, "reencode")):
        status, headers, body = request(port, "GET", f"/api/videos/{ids[name]}/clip?start={start}&end={end}")
        assert status == 200 and headers["content-type"] == "video/mp4", body[:200]
        assert headers["x-clip-method"] == method
        assert headers["content-disposition"] == f'attachment; filename="{name[:-4]}_{start:.1f}-{end:.1f}.mp4"'
        out = tmp_path / f"{method}.mp4"
        out.write_bytes(body)
        frames, _ = decoded(out)
        length = frames[-1].time + 1 / fps - frames[0].time
        assert abs(length - (end - start)) <= 2 / fps + 1e-6, (method, length)
        assert np.abs(mean_colour(frames[0]) - mean_colour(frame_shown_at(src, start))).max() < 12
    for query in ("start=4&end=2", "start=-1&end=2", "start=1e6&end=1000002", "start=nan&end=3", "start=1",
                  "end=3"):
        status, _, body = request(port, "GET", f"/api/videos/{ids[name]}/clip?{query}")
        assert status == 422 and json.loads(body)["error"], query
    assert request(port, "GET", "/api/videos/999999/clip?start=0&end=2")[0] == 404
    assert request(port, "GET", f"/api/videos/{ids['escape.mp4']}/clip?start=0&end=2")[0] == 403
    assert not [f for f in os.listdir(tempfile.gettempdir()) if f.startswith("vmr-clip-")]


def test_export_clip_command(port, world, tmp_path):
    """`vmr export-clip` by id and by path writes the same cut; a bad bound or an unknown video is one line."""
    from click.testing import CliRunner

    from cli import main
    from tests.test_clips import decoded

    name = sorted(p.name for p in (world[0] / "videos").glob("world*.mp4"))[0]
    runner = CliRunner()
    res = runner.invoke(main, ["export-clip", "--index", str(world[1]), "--video", name, "--start", "2.5",
                               "--end", "7.5", "--out", str(tmp_path / "by_path.mp4")])
    assert res.exit_code == 0 and "re-encoded" in res.output and "5.00 s" in res.output, res.output
    video_id = video_ids(port)[name]
    res = runner.invoke(main, ["export-clip", "--index", str(world[1]), "--video-id", str(video_id), "--start",
                               "2.5", "--end", "7.5", "--out", str(tmp_path / "by_id.mp4")])
    assert res.exit_code == 0, res.output
    by_path, by_id = decoded(tmp_path / "by_path.mp4")[0], decoded(tmp_path / "by_id.mp4")[0]
    gap = by_path[1].time - by_path[0].time
    assert len(by_path) == len(by_id) and abs(by_path[-1].time + gap - 5.0) <= 2 * gap + 1e-6
    out = tmp_path / "bad.mp4"
    for args, said in ((["--video", name, "--start", "9", "--end", "3"], "must be after start"),
                       (["--video", "nothing.mp4", "--start", "0", "--end", "3"], "no indexed video"),
                       (["--start", "0", "--end", "3"], "--video-id or by --video")):
        res = runner.invoke(main, ["export-clip", "--index", str(world[1]), "--out", str(out), *args])
        assert res.exit_code == 1 and said in res.output and len(res.output.strip().splitlines()) == 1, res.output
        assert not out.exists()
