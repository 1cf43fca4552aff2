"""Labels people make on moments (`vmr serve`'s label mode), kept in the index's DuckDB, and their export as
training annotations (`vmr labels export`).

Table (created on first write, CREATE TABLE IF NOT EXISTS: indexes built before labels existed gain it then):
  labels  id PK (from the sequence labels_id: an id is never reused after a delete), query, path (video path relative to the indexed root, as in `videos`), content_hash (of the video
          when labelled), start, end (seconds), verdict ('accept' | 'reject'), source ('hit': a search result,
          'mark': a moment marked while watching), orig_start, orig_end (the hit as proposed; NULL for marks),
          score (the hit's score), created_at, updated_at

A label names its video by path + content hash, not by id: a video that is re-indexed with other content, or
deleted, leaves its labels stale, and the export skips them (and says how many) instead of pairing a sentence
with frames it was never said about.

Export format: one jsonl record per (query, video) with at least one accepted window, the fields `vmr train
--index` reads (model/data/dataset.py):
  qid (int: the smallest label id of the group, stable), query, vid (video path relative to the root), duration,
  relevant_windows [[start, end], ...] (accepted hits, adjusted hits, marked moments), and
  negative_windows [[start, end], ...]: hits a person REJECTED for this query in this video (training draws negative
  windows from them: model/data/negatives.py, source 'labels'). Groups with rejections only are left out (counted),
  since a training record needs a relevant window.

Writes go through ``write_connection``: one short read-write connection (DuckDB allows one writing process; an
ingest may hold the file for a moment, db.connect waits it out). Callers in one process serialize their writes.
"""
from __future__ import annotations

import datetime
import json
import math

import duckdb

from store import db
from store.errors import VmrError

VERDICTS = ("accept", "reject")
SOURCES = ("hit", "mark")
MAX_QUERY_CHARS = 1000
COLUMNS = ("id", "query", "path", "content_hash", "start", "end", "verdict", "source", "orig_start", "orig_end",
           "score", "created_at", "updated_at")

SEQUENCE = "CREATE SEQUENCE IF NOT EXISTS labels_id"  # ids never come back after a delete
SCHEMA = """CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY, query VARCHAR NOT NULL, path VARCHAR NOT NULL, content_hash VARCHAR,
    start DOUBLE NOT NULL, "end" DOUBLE NOT NULL, verdict VARCHAR NOT NULL, source VARCHAR NOT NULL,
    orig_start DOUBLE, orig_end DOUBLE, score DOUBLE, created_at TIMESTAMP, updated_at TIMESTAMP)"""


def write_connection(index_dir, wait: float = db.LOCK_WAIT_SECONDS) -> duckdb.DuckDBPyConnection:
    """A read-write connection with the labels table present (close it soon: it keeps an ingest out); waits at
    most ``wait`` s for another process's write batch (db.connect)."""
    con = db.connect(index_dir, read_only=False, wait=wait)
    if not db.read_meta(con):
        con.close()
        raise VmrError(f"{index_dir} is not a finished vmr index (no meta)")
    con.execute(SEQUENCE)
    con.execute(SCHEMA)
    return con


def check_label(query: str, start: float, end: float, verdict: str, source: str, duration: float | None) -> None:
    """Raise VmrError (one line) when a label is not well formed for a video of ``duration`` seconds."""
    if not isinstance(query, str) or not query.strip():
        raise VmrError("a label needs a non-empty query")
    if len(query) > MAX_QUERY_CHARS:
        raise VmrError(f"the query is {len(query)} characters long; at most {MAX_QUERY_CHARS}")
    if verdict not in VERDICTS:
        raise VmrError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
    if source not in SOURCES:
        raise VmrError(f"source must be one of {', '.join(SOURCES)}, not {source!r}")
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end <= start:
        raise VmrError(f"a label needs 0 <= start < end, got {start}..{end}")
    if duration is not None and start >= duration + 1e-6:
        raise VmrError(f"start {start} s is past the video's end ({duration} s)")


def _video_row(con, video_id: int) -> dict:
    row = con.execute("SELECT path, content_hash, duration, status FROM videos WHERE id = ?", [int(video_id)]).fetchone()
    if row is None or row[3] != "indexed":
        raise VmrError(f"no indexed video with id {video_id}")
    return {"path": row[0], "content_hash": row[1], "duration": row[2]}


def add_label(con, video_id: int, query: str, start: float, end: float, verdict: str, source: str = "hit",
              orig_start: float | None = None, orig_end: float | None = None, score: float | None = None) -> dict:
    """Insert one label on an indexed video (end clipped to the video's duration). Returns the stored row."""
    video = _video_row(con, video_id)
    start, end = float(start), float(end)
    check_label(query, start, end, verdict, source, video["duration"])
    if video["duration"]:
        end = min(end, float(video["duration"]))
    now = _now()
    with db.transaction(con):
        label_id = con.execute("SELECT nextval('labels_id')").fetchone()[0]
        con.execute('INSERT INTO labels (id, query, path, content_hash, start, "end", verdict, source, orig_start, '
                    "orig_end, score, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [label_id, " ".join(query.split()), video["path"], video["content_hash"], start, end, verdict,
                     source, orig_start, orig_end, score, now, now])
    return get_label(con, label_id)


def update_label(con, label_id: int, start: float | None = None, end: float | None = None,
                 verdict: str | None = None) -> dict:
    """Change a label's window and/or verdict. Raises VmrError for an unknown id or a bad window."""
    label = get_label(con, label_id)
    start = label["start"] if start is None else float(start)
    end = label["end"] if end is None else float(end)
    verdict = verdict or label["verdict"]
    check_label(label["query"], start, end, verdict, label["source"], None)
    with db.transaction(con):
        con.execute('UPDATE labels SET start = ?, "end" = ?, verdict = ?, updated_at = ? WHERE id = ?',
                    [start, end, verdict, _now(), int(label_id)])
    return get_label(con, label_id)


def delete_label(con, label_id: int) -> None:
    get_label(con, label_id)
    con.execute("DELETE FROM labels WHERE id = ?", [int(label_id)])


def get_label(con, label_id: int) -> dict:
    rows = _select(con, "WHERE id = ?", [int(label_id)])
    if not rows:
        raise VmrError(f"no label with id {label_id}")
    return rows[0]


def list_labels(con, query: str | None = None, path: str | None = None) -> list[dict]:
    """Labels, oldest first; filtered by exact query and/or video path. [] on an index without labels."""
    where, params = [], []
    if query is not None:
        where.append("query = ?")
        params.append(" ".join(query.split()))
    if path is not None:
        where.append("path = ?")
        params.append(path)
    return _select(con, ("WHERE " + " AND ".join(where)) if where else "", params)


def count_labels(con) -> dict:
    """{"total", "accept", "reject"}: zeros on an index without labels."""
    try:
        rows = con.execute("SELECT verdict, count(*) FROM labels GROUP BY verdict").fetchall()
    except duckdb.CatalogException:
        rows = []
    counts = {v: 0 for v in VERDICTS} | {k: int(n) for k, n in rows}
    return {"total": sum(counts.values()), **counts}


def _select(con, where: str, params: list) -> list[dict]:
    names = ", ".join(f'"{c}"' for c in COLUMNS)
    try:
        rows = con.execute(f"SELECT {names} FROM labels {where} ORDER BY id", params).fetchall()
    except duckdb.CatalogException:  # no label written yet
        return []
    out = []
    for row in rows:
        d = dict(zip(COLUMNS, row))
        for key in ("created_at", "updated_at"):
            d[key] = d[key].isoformat() if d[key] is not None else None
        out.append(d)
    return out


def export_records(con) -> tuple[list[dict], dict]:
    """Training records from the labels (module docstring) and a report {"records", "labels", "stale",
    "negative_only"}: stale = labels whose video is gone or was re-indexed with other content."""
    labels = list_labels(con)
    videos = {r[0]: {"content_hash": r[1], "duration": r[2]} for r in
              con.execute("SELECT path, content_hash, duration FROM videos WHERE status = 'indexed'").fetchall()}
    groups: dict[tuple[str, str], list[dict]] = {}
    stale = 0
    for label in labels:
        video = videos.get(label["path"])
        if video is None or (label["content_hash"] and video["content_hash"]
                             and label["content_hash"] != video["content_hash"]):
            stale += 1
            continue
        groups.setdefault((label["query"], label["path"]), []).append(label)
    records, negative_only = [], 0
    for (query, path), group in groups.items():
        windows = {v: sorted({(round(g["start"], 3), round(g["end"], 3)) for g in group if g["verdict"] == v})
                   for v in VERDICTS}
        if not windows["accept"]:
            negative_only += 1
            continue
        records.append({"qid": min(g["id"] for g in group), "query": query, "vid": path,
                        "duration": float(videos[path]["duration"]),
                        "relevant_windows": [list(w) for w in windows["accept"]],
                        "negative_windows": [list(w) for w in windows["reject"]]})
    records.sort(key=lambda r: r["qid"])
    return records, {"records": len(records), "labels": len(labels), "stale": stale, "negative_only": negative_only}


def export_labels(index_dir, out_path) -> dict:
    """`vmr labels export`: write the training jsonl to ``out_path``; returns the report of export_records."""
    con = db.connect(index_dir, read_only=True)
    try:
        records, report = export_records(con)
    finally:
        con.close()
    with open(out_path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return report


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
