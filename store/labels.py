"""Labels people make on moments (`vmr serve`'s label mode), kept in the index's DuckDB, and their export as
training annotations (`vmr labels export`).

Table (created on first write, CREATE TABLE IF NOT EXISTS; a table written by an older vmr gains the newer columns
in place on the next write, ALTER TABLE ADD COLUMN, its labels kept):
  labels  id PK (from the sequence labels_id: an id is never reused), query (as said), query_key (the sentence
          compared: whitespace collapsed, lower case), path (video path relative to the indexed root, as in
          `videos`), content_hash (of the video when labelled), start, end (seconds), verdict ('accept' |
          'reject'), source ('hit': a search result, 'mark': a moment marked while watching), orig_start, orig_end
          (the hit as found; NULL for marks), score (the hit's score), search_id (the server's id of the search
          that found the hit), author (who labelled: the name of the access token; NULL on a tokenless localhost
          server), version (1, +1 at every change: a writer names the version it saw, see Conflict), deleted_at
          (a deleted label stays, hidden, until restored), created_at, updated_at

One label per (sentence, hit): a second verdict on the same hit of the same sentence is a change of the first
(update_label), never a second row, so two tabs cannot store a hit both accepted and rejected; a writer that
names an older version than the stored one gets Conflict with the stored label (a stale tab).

A label names its video by path + content hash, not by id: a video that is re-indexed with other content, or
deleted, leaves its labels stale, and the export skips them (and says how many) instead of pairing a sentence
with frames it was never said about.

Export format: one jsonl record per (sentence, video) with at least one accepted window, the fields `vmr train
--index` reads (model/data/dataset.py):
  qid (int: the smallest label id of the group, stable), query, vid (video path relative to the root), duration,
  relevant_windows [[start, end], ...] (accepted hits, adjusted hits, marked moments), and
  negative_windows [[start, end], ...]: hits a person REJECTED for this query in this video (training draws negative
  windows from them: model/data/negatives.py, source 'labels'). Groups with rejections only are left out (counted),
  since a training record needs a relevant window. A window both accepted and rejected for one sentence (labels
  written before one-label-per-hit, or an accepted mark over a rejected hit) is a contradiction: the export
  refuses and names the labels, or with ``drop_contradictions`` leaves those windows out (counted).

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
COLUMNS = ("id", "query", "query_key", "path", "content_hash", "start", "end", "verdict", "source", "orig_start",
           "orig_end", "score", "search_id", "author", "version", "deleted_at", "created_at", "updated_at")
WINDOW_DIGITS = 3  # windows are compared (one label per hit, contradictions) at millisecond precision

SEQUENCE = "CREATE SEQUENCE IF NOT EXISTS labels_id"  # ids never come back after a delete
SCHEMA = """CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY, query VARCHAR NOT NULL, path VARCHAR NOT NULL, content_hash VARCHAR,
    start DOUBLE NOT NULL, "end" DOUBLE NOT NULL, verdict VARCHAR NOT NULL, source VARCHAR NOT NULL,
    orig_start DOUBLE, orig_end DOUBLE, score DOUBLE, created_at TIMESTAMP, updated_at TIMESTAMP)"""
# Columns newer than SCHEMA, added in place to a table made by an older vmr (name -> DuckDB type and default).
ADDED_COLUMNS = {"query_key": "VARCHAR", "search_id": "VARCHAR", "author": "VARCHAR",
                 "version": "INTEGER DEFAULT 1", "deleted_at": "TIMESTAMP"}
# How a read-only reader of such a table answers the columns it lacks (as the migration fills them).
_OLD_DEFAULTS = {"version": "1", "query_key": "lower(query)"}


class Conflict(VmrError):
    """The write was made against another state than the stored one (a stale tab, a hit labelled elsewhere):
    HTTP 409. ``label``: the stored label, as get_label returns it."""

    def __init__(self, message: str, label: dict):
        super().__init__(message)
        self.label = label


def query_key(query: str) -> str:
    """The form in which two sentences are one sentence: whitespace collapsed, lower case (as DuckDB's lower())."""
    return " ".join(query.split()).lower()


def write_connection(index_dir, wait: float = db.LOCK_WAIT_SECONDS) -> duckdb.DuckDBPyConnection:
    """A read-write connection with the labels table present and current (close it soon: it keeps an ingest out);
    waits at most ``wait`` s for another process's write batch (db.connect)."""
    con = db.connect(index_dir, read_only=False, wait=wait)
    if not db.read_meta(con):
        con.close()
        raise VmrError(f"{index_dir} is not a finished vmr index (no meta)")
    con.execute(SEQUENCE)
    con.execute(SCHEMA)
    _add_missing_columns(con)
    return con


def _table_columns(con) -> set[str]:
    return {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                      "WHERE table_name = 'labels'").fetchall()}


def _add_missing_columns(con) -> None:
    missing = [name for name in ADDED_COLUMNS if name not in _table_columns(con)]
    if not missing:
        return
    with db.transaction(con):
        for name in missing:
            con.execute(f"ALTER TABLE labels ADD COLUMN {name} {ADDED_COLUMNS[name]}")
        for (query,) in con.execute("SELECT DISTINCT query FROM labels WHERE query_key IS NULL").fetchall():
            con.execute("UPDATE labels SET query_key = ? WHERE query = ?", [query_key(query), query])


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
    row = con.execute("SELECT path, content_hash, duration, status FROM videos WHERE id = ?",
                      [int(video_id)]).fetchone()
    if row is None or row[3] != "indexed":
        raise VmrError(f"no indexed video with id {video_id}")
    return {"path": row[0], "content_hash": row[1], "duration": row[2]}


def add_label(con, video_id: int, query: str, start: float, end: float, verdict: str, source: str = "hit",
              orig_start: float | None = None, orig_end: float | None = None, score: float | None = None,
              search_id: str | None = None, author: str | None = None) -> dict:
    """Insert one label on an indexed video (end clipped to the video's duration). Returns the stored row.

    A hit (orig_start/orig_end: the window as found, default start/end) that already holds a label for this
    sentence raises Conflict with that label: change it with update_label instead."""
    video = _video_row(con, video_id)
    start, end = float(start), float(end)
    check_label(query, start, end, verdict, source, video["duration"])
    if video["duration"]:
        end = min(end, float(video["duration"]))
    if source == "hit":
        orig_start = start if orig_start is None else float(orig_start)
        orig_end = end if orig_end is None else float(orig_end)
        held = _hit_label(con, query_key(query), video["path"], orig_start, orig_end)
        if held is not None:
            raise Conflict(f"this hit already holds label {held['id']} ({held['verdict']}) for this sentence: "
                           "change that label (PATCH) instead of adding one", held)
    now = _now()
    with db.transaction(con):
        label_id = con.execute("SELECT nextval('labels_id')").fetchone()[0]
        con.execute('INSERT INTO labels (id, query, query_key, path, content_hash, start, "end", verdict, source, '
                    "orig_start, orig_end, score, search_id, author, version, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)",
                    [label_id, " ".join(query.split()), query_key(query), video["path"], video["content_hash"],
                     start, end, verdict, source, orig_start, orig_end, score, search_id, author, now, now])
    return get_label(con, label_id)


def _hit_label(con, key: str, path: str, orig_start: float, orig_end: float) -> dict | None:
    """The live label of one hit (sentence key, video, window as found), or None."""
    rows = _select(con, "WHERE query_key = ? AND path = ? AND source = 'hit' AND deleted_at IS NULL "
                        "AND round(orig_start, ?) = round(?, ?) AND round(orig_end, ?) = round(?, ?)",
                   [key, path, WINDOW_DIGITS, orig_start, WINDOW_DIGITS, WINDOW_DIGITS, orig_end, WINDOW_DIGITS])
    return rows[-1] if rows else None


def _check_version(label: dict, version: int | None) -> None:
    if version is not None and int(version) != label["version"]:
        by = f" by {label['author']}" if label.get("author") else ""
        raise Conflict(f"label {label['id']} was changed{by} since you saw it (version {version}, now "
                       f"{label['version']}: {label['verdict']}); look again, then repeat the change", label)


def update_label(con, label_id: int, start: float | None = None, end: float | None = None,
                 verdict: str | None = None, version: int | None = None, author: str | None = None) -> dict:
    """Change a label's window and/or verdict. VmrError for an unknown id or a bad window; Conflict when
    ``version`` (the one the writer saw) is not the stored one, or the label was deleted since."""
    label = get_label(con, label_id, deleted=True)
    if label["deleted_at"] is not None:
        raise Conflict(f"label {label_id} was deleted since you saw it; label the hit again", label)
    _check_version(label, version)
    start = label["start"] if start is None else float(start)
    end = label["end"] if end is None else float(end)
    verdict = verdict or label["verdict"]
    check_label(label["query"], start, end, verdict, label["source"], None)
    with db.transaction(con):
        con.execute('UPDATE labels SET start = ?, "end" = ?, verdict = ?, author = coalesce(?, author), '
                    "version = version + 1, updated_at = ? WHERE id = ?",
                    [start, end, verdict, author, _now(), int(label_id)])
    return get_label(con, label_id)


def delete_label(con, label_id: int, version: int | None = None) -> dict:
    """Hide a label (restore_label brings it back); returns it as deleted. VmrError for an unknown or already
    deleted id; Conflict on a stale ``version``."""
    label = get_label(con, label_id)
    _check_version(label, version)
    con.execute("UPDATE labels SET deleted_at = ?, version = version + 1 WHERE id = ?", [_now(), int(label_id)])
    return get_label(con, label_id, deleted=True)


def restore_label(con, label_id: int) -> dict:
    """Undo a delete. VmrError when the label is not deleted; Conflict when its hit was labelled again since."""
    label = get_label(con, label_id, deleted=True)
    if label["deleted_at"] is None:
        raise VmrError(f"label {label_id} is not deleted")
    if label["source"] == "hit":
        held = _hit_label(con, label["query_key"], label["path"], label["orig_start"], label["orig_end"])
        if held is not None:
            raise Conflict(f"the hit of label {label_id} was labelled again since (label {held['id']}): not "
                           "restored", held)
    con.execute("UPDATE labels SET deleted_at = NULL, version = version + 1, updated_at = ? WHERE id = ?",
                [_now(), int(label_id)])
    return get_label(con, label_id)


def get_label(con, label_id: int, deleted: bool = False) -> dict:
    """One label; VmrError when there is none (or it is deleted, unless ``deleted``)."""
    rows = _select(con, "WHERE id = ?" + ("" if deleted else " AND deleted_at IS NULL"), [int(label_id)])
    if not rows:
        raise VmrError(f"no label with id {label_id}")
    return rows[0]


def list_labels(con, query: str | None = None, path: str | None = None) -> list[dict]:
    """Live labels, oldest first; filtered by sentence (query_key) and/or video path. [] without a labels table."""
    where, params = ["deleted_at IS NULL"], []
    if query is not None:
        where.append("query_key = ?")
        params.append(query_key(query))
    if path is not None:
        where.append("path = ?")
        params.append(path)
    return _select(con, "WHERE " + " AND ".join(where), params)


def count_labels(con) -> dict:
    """{"total", "accept", "reject"} of the live labels: zeros on an index without labels."""
    try:
        deleted = "deleted_at IS NULL" if "deleted_at" in _table_columns(con) else "true"
        rows = con.execute(f"SELECT verdict, count(*) FROM labels WHERE {deleted} GROUP BY verdict").fetchall()
    except duckdb.CatalogException:
        rows = []
    counts = {v: 0 for v in VERDICTS} | {k: int(n) for k, n in rows}
    return {"total": sum(counts.values()), **counts}


def _select(con, where: str, params: list) -> list[dict]:
    """Label dicts (COLUMNS). A table an older vmr wrote, read without migrating it (a read-only connection),
    answers its missing columns as the migration would fill them."""
    present = _table_columns(con)
    if not present:  # no label written yet
        return []
    if not set(ADDED_COLUMNS) <= present:
        view = ", ".join(f'"{c}"' if c in present else f"{_OLD_DEFAULTS.get(c, 'NULL')} AS {c}" for c in COLUMNS)
        table = f"(SELECT {view} FROM labels)"
    else:
        table = "labels"
    names = ", ".join(f'"{c}"' for c in COLUMNS)
    rows = con.execute(f"SELECT {names} FROM {table} {where} ORDER BY id", params).fetchall()
    out = []
    for row in rows:
        d = dict(zip(COLUMNS, row))
        if d["query_key"] is None:
            d["query_key"] = query_key(d["query"])
        for key in ("created_at", "updated_at", "deleted_at"):
            d[key] = d[key].isoformat() if d[key] is not None else None
        out.append(d)
    return out



def export_records(con, drop_contradictions: bool = False) -> tuple[list[dict], dict]:
    """Training records from the labels (module docstring) and a report {"records", "labels", "stale",
    "negative_only", "contradictions"}: stale = labels whose video is gone or was re-indexed with other content;
    contradictions = [{"query", "vid", "window", "accept_ids", "reject_ids"}], windows both accepted and rejected for
    one sentence. Raises VmrError naming them, unless ``drop_contradictions`` (then those windows are left out)."""
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
        groups.setdefault((label["query_key"], label["path"]), []).append(label)
    records, negative_only, contradictions = [], 0, []
    for (_, path), group in groups.items():
        ids: dict[str, dict[tuple, list[int]]] = {v: {} for v in VERDICTS}
        for g in group:
            window = (round(g["start"], WINDOW_DIGITS), round(g["end"], WINDOW_DIGITS))
            ids[g["verdict"]].setdefault(window, []).append(g["id"])
        both = sorted(ids["accept"].keys() & ids["reject"].keys())
        contradictions += [{"query": group[0]["query"], "vid": path, "window": list(w),
                            "accept_ids": ids["accept"][w], "reject_ids": ids["reject"][w]} for w in both]
        windows = {v: sorted(set(ids[v]) - set(both)) for v in VERDICTS}
        if not windows["accept"]:
            negative_only += 1
            continue
        records.append({"qid": min(g["id"] for g in group), "query": group[0]["query"], "vid": path,
                        "duration": float(videos[path]["duration"]),
                        "relevant_windows": [list(w) for w in windows["accept"]],
                        "negative_windows": [list(w) for w in windows["reject"]]})
    if contradictions and not drop_contradictions:
        raise VmrError(describe_contradictions(contradictions))
    records.sort(key=lambda r: r["qid"])
    return records, {"records": len(records), "labels": len(labels), "stale": stale, "negative_only": negative_only,
                     "contradictions": contradictions}


def describe_contradictions(contradictions: list[dict], shown: int = 5) -> str:
    """One line naming windows both accepted and rejected for one sentence, and the fix."""
    named = "; ".join(f"“{c['query']}” in {c['vid']} {c['window'][0]}-{c['window'][1]} s accepted by label "
                      f"{','.join(map(str, c['accept_ids']))}, rejected by {','.join(map(str, c['reject_ids']))}"
                      for c in contradictions[:shown])
    more = f" (and {len(contradictions) - shown} more)" if len(contradictions) > shown else ""
    return (f"{len(contradictions)} window(s) both relevant and negative for one sentence: {named}{more}. Delete "
            "the wrong label (the page's Labels panel), or export with --drop-contradictions to leave them out")


def export_labels(index_dir, out_path, drop_contradictions: bool = False) -> dict:
    """`vmr labels export`: write the training jsonl to ``out_path``; returns the report of export_records
    (VmrError on contradictions unless ``drop_contradictions``; nothing is written then)."""
    con = db.connect(index_dir, read_only=True)
    try:
        records, report = export_records(con, drop_contradictions)
    finally:
        con.close()
    with open(out_path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return report


def describe_export(report: dict, out_path) -> str:
    """`vmr labels export`'s line for the report of export_labels."""
    return (f"wrote {report['records']} records from {report['labels']} labels -> {out_path}"
            + (f" ({report['stale']} stale: video deleted or re-indexed with other content)" if report["stale"] else "")
            + (f" ({report['negative_only']} query/video pairs with rejections only: left out)"
               if report["negative_only"] else "")
            + (f" ({len(report['contradictions'])} contradicting window(s) left out)"
               if report["contradictions"] else ""))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
