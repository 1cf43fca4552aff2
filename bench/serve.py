"""`vmr serve` benchmark: search round-trip through the HTTP API vs the same search in process, and a mixed load.

    python -m bench.serve --out DIR [--quick] [--videos N] [--clients 20] [--seconds 60]

Library: the synthetic-vector test world of bench/search.py (``make_library``: N videos, target sentences among
distractors; no video files, decoding 10^3 videos is out of reach here). So that thumbnails and video bytes have
files to serve, the index's root is pointed at a folder holding SERVED real test-world mp4 files named as the
first library videos (their pictures are not those videos': the load test only needs real files to decode/read).

1. Round trip: every target sentence (twice) in process (retriever.search.SearchEngine, world CLIP + world
   reranker) and through GET /api/search of `vmr serve` (a child process; one keep-alive client), alternating query
   by query so that other load on the machine hits both alike; p50/p95 and the ratio of the p50s (target <= 1.3x).
3. Load: ``clients`` threads for ``seconds`` s, each looping over a mix (search 40%, video byte ranges 30%,
   thumbnails 20%, label writes 10%); per kind: requests, errors (HTTP >= 400 or a failed connection), p50/p95.
Both the server and the clients run on this machine and share its cores: the load figures are an upper bound on
latency, not what a lone page sees.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS, WORLD_RERANKER

SERVED = 8  # library videos given real files
MIX = (("search", 0.4), ("range", 0.3), ("thumbnail", 0.2), ("label", 0.1))
REPO = Path(__file__).resolve().parents[1]


def build(tmp: Path, n_videos: int) -> tuple[Path, list[dict], list[str]]:
    """Synthetic library of n_videos with SERVED real files; returns (index, target annotations, served paths)."""
    from bench.search import make_library
    from model.inference.features import ClipEncoder
    from store import db
    from world.generator import build_world

    encoder = ClipEncoder.load(str(WORLD_CLIP_CONFIG), str(WORLD_CLIP_WEIGHTS), device="cpu")
    index = tmp / "index"
    rows = make_library(index, n_videos, encoder)
    con = db.connect(index, read_only=False)
    try:
        served = [r[0] for r in con.execute("SELECT path FROM videos ORDER BY id LIMIT ?", [SERVED]).fetchall()]
        db.write_meta(con, {"root": str(tmp / "files")})
    finally:
        con.close()
    build_world(tmp / "real", n_videos=SERVED, seed=3, long_videos=0)
    (tmp / "files").mkdir()
    for src, name in zip(sorted((tmp / "real" / "videos").glob("*.mp4")), served):
        shutil.copy(src, tmp / "files" / name)
    return index, rows, served


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs) * 1000.0
    return {"n": len(xs), "p50_ms": round(float(np.percentile(a, 50)), 2), "p95_ms": round(float(np.percentile(a, 95)), 2)}


def round_trips(index: Path, port: int, queries: list[str], stages: dict, rounds: int = 2
                ) -> tuple[list[float], list[float]]:
    """Seconds per query in process and through the API, alternating query by query (so that load from other
    processes on the machine hits both alike)."""
    from retriever.search import SearchEngine

    con = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    local, api = [], []
    with SearchEngine(index, checkpoint=str(WORLD_RERANKER), device="cpu") as engine:
        for q in queries[:2]:  # warm-up
            engine.search(q, top_k=10)
            call(con, "GET", "/api/search?" + urllib.parse.urlencode({"q": q, "top_k": 10}))
        for _ in range(rounds):
            for q in queries:
                t0 = time.perf_counter()
                result = engine.search(q, top_k=10)
                t1 = time.perf_counter()
                status, body = call(con, "GET", "/api/search?" + urllib.parse.urlencode({"q": q, "top_k": 10}))
                api.append(time.perf_counter() - t1)
                local.append(t1 - t0)
                assert status == 200
                stages["in_process"].append(getattr(result, "timings", None) or dict(engine.last_timings))
                stages["api"].append(json.loads(body)["timings"])
    con.close()
    return local, api


def start_server(index: Path, log: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--index", str(index), "--checkpoint",
                             str(WORLD_RERANKER), "--device", "cpu", "--port", str(port)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            status, _ = call(http.client.HTTPConnection("127.0.0.1", port, timeout=5), "GET", "/api/status")
            if status == 200:
                return proc, port
        except OSError:
            time.sleep(0.3)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"vmr serve did not start: {log.read_text()[-1000:]}")


def call(con: http.client.HTTPConnection, method: str, path: str, body: dict | None = None,
         headers: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    hdrs = {"Content-Type": "application/json"} if data else {}
    con.request(method, path, body=data, headers={**hdrs, **(headers or {})})
    res = con.getresponse()
    return res.status, res.read()


def load(port: int, queries: list[str], served: list[dict], clients: int, seconds: float) -> dict:
    """``clients`` threads mixing requests for ``seconds``: {kind: {"n", "errors", "p50_ms", "p95_ms"}}."""
    times = {k: [] for k, _ in MIX}
    errors = {k: 0 for k, _ in MIX}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(seed: int):
        rng = random.Random(seed)
        con = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < stop:
            kind = rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]
            video = rng.choice(served)
            t0 = time.perf_counter()
            try:
                if kind == "search":
                    status, _ = call(con, "GET", "/api/search?" + urllib.parse.urlencode({"q": rng.choice(queries)}))
                elif kind == "range":
                    first = rng.randrange(0, max(1, video["size"] - 65536))
                    status, body = call(con, "GET", f"/api/videos/{video['id']}/file",
                                        headers={"Range": f"bytes={first}-{first + 65535}"})
                    status = status if len(body) == min(65536, video["size"] - first) else 599
                elif kind == "thumbnail":
                    t = rng.uniform(0, video["duration"] or 1)
                    status, _ = call(con, "GET", f"/api/videos/{video['id']}/thumbnail?t={t:.1f}")
                else:
                    start = rng.uniform(0, 20)
                    status, _ = call(con, "POST", "/api/labels", {"video_id": video["id"], "query": rng.choice(queries),
                                                                  "start": start, "end": start + 6, "source": "mark",
                                                                  "verdict": rng.choice(["accept", "reject"])})
                ok = status < 400
            except (OSError, http.client.HTTPException):
                ok = False
                con.close()
                con = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            dt = time.perf_counter() - t0
            with lock:
                times[kind].append(dt)
                errors[kind] += 0 if ok else 1
        con.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {k: {**percentiles(times[k]), "errors": errors[k]} for k, _ in MIX}


def run(out_dir, quick: bool = False, n_videos: int | None = None, clients: int = 20,
        seconds: float | None = None) -> dict:
    n_videos = n_videos or (100 if quick else 1000)
    seconds = seconds or (5.0 if quick else 60.0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs ({platform.processor() or 'cpu'}), "
                          f"Python {platform.python_version()}", "videos": n_videos, "clients": clients,
               "seconds": seconds}
    with tempfile.TemporaryDirectory(prefix="vmr-serve-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        # built in a child process: this one then searches as fresh as the server (writing the library here first
        # made the in-process searches ~4x slower than the same searches in a fresh process)
        subprocess.run([sys.executable, "-m", "bench.serve", "--out", str(tmp), "--build", str(n_videos)], cwd=REPO,
                       check=True)
        built = json.loads((tmp / "built.json").read_text())
        index, rows, served_paths = tmp / "index", built["rows"], built["served"]
        results["build_seconds"] = round(time.perf_counter() - t0, 1)
        queries = [r["query"] for r in rows]
        proc, port = start_server(index, tmp / "serve.log")
        try:
            stages = {"in_process": [], "api": []}
            local, api = round_trips(index, port, queries, stages)
            results["stages_p50_ms"] = {side: {k: round(1000 * float(np.median([t.get(k, 0.0) for t in ts])), 2)
                                               for k in ts[0]} for side, ts in stages.items()}
            results["in_process"], results["api"] = percentiles(local), percentiles(api)
            results["ratio_p50"] = round(results["api"]["p50_ms"] / results["in_process"]["p50_ms"], 3)
            con = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            videos = json.loads(call(con, "GET", "/api/videos?limit=1000")[1])["videos"]
            served = [v for v in videos if v["path"] in set(served_paths)]
            for v in served:
                v["size"] = (tmp / "files" / v["path"]).stat().st_size
            results["load"] = load(port, queries, served, clients, seconds)
            con = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # the old one idled past keep-alive
            status = json.loads(call(con, "GET", "/api/status")[1])
            results["labels_after"] = status["labels"]["total"]
            results["labels_written"] = results["load"]["label"]["n"] - results["load"]["label"]["errors"]
        finally:
            proc.terminate()
            proc.wait(30)
    (out_dir / "serve.json").write_text(json.dumps(results, indent=2))
    (out_dir / "serve.md").write_text(describe(results))
    return results


def describe(r: dict) -> str:
    lines = [f"# vmr serve benchmark", "",
             f"Machine: {r['machine']}. Library: {r['videos']} synthetic test-world videos "
             f"(built in {r['build_seconds']} s; {SERVED} of them with real mp4 files for thumbnails and ranges).", "",
             "## Search round-trip: API vs in process (same queries, world CLIP + world reranker)", "",
             "| path | queries | p50 ms | p95 ms |", "|---|---|---|---|",
             f"| in process (SearchEngine.search) | {r['in_process']['n']} | {r['in_process']['p50_ms']} | "
             f"{r['in_process']['p95_ms']} |",
             f"| GET /api/search (keep-alive client) | {r['api']['n']} | {r['api']['p50_ms']} | {r['api']['p95_ms']} |",
             "", f"p50 ratio API / in process: **{r['ratio_p50']}x** (target <= 1.3x)", "",
             "Stage p50 ms (the engine's own timings): " + "; ".join(
                 f"{side}: " + ", ".join(f"{k} {v}" for k, v in st.items()) for side, st in r["stages_p50_ms"].items()),
             "",
             f"## Mixed load: {r['clients']} clients for {r['seconds']:.0f} s", "",
             "| request | count | errors | p50 ms | p95 ms |", "|---|---|---|---|---|"]
    for kind, v in r["load"].items():
        lines.append(f"| {kind} | {v['n']} | {v['errors']} | {v.get('p50_ms', '-')} | {v.get('p95_ms', '-')} |")
    total_errors = sum(v["errors"] for v in r["load"].values())
    lines += ["", f"Errors in total: **{total_errors}**. Labels written {r['labels_written']}, labels in the index "
              f"after: {r['labels_after']} (must be equal).",
              "", "Server and clients share the machine's cores (searches are serialized in the server: one CLIP "
              "+ reranker), so the load latencies include queueing behind concurrent searches.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--videos", type=int, default=None)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--build", type=int, default=None, help=argparse.SUPPRESS)  # internal: child that builds
    args = parser.parse_args()
    if args.build:
        _, rows, served = build(Path(args.out), args.build)
        (Path(args.out) / "built.json").write_text(json.dumps({"rows": rows, "served": served}))
        return
    results = run(args.out, quick=args.quick, n_videos=args.videos, clients=args.clients, seconds=args.seconds)
    print(describe(results))


if __name__ == "__main__":
    main()
