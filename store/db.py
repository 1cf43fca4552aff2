"""The DuckDB file of a library: schema, connections that wait out the other process's lock, array I/O.

DuckDB lets ONE process open a file read-write, or many processes open it read-only, never both at once. The
writer (ingest) therefore holds its connection only for a short batch of commits and readers (search, status)
only for one query; whoever finds the file locked retries for a while (LOCK_WAIT_SECONDS) instead of failing.

Tables (embedding dims fixed at creation from the CLIP model):
  meta    key VARCHAR PK, value VARCHAR (JSON)           schema_version, clip_model, embed_dim, root, generation,
                                                          library_id, next_video_id, feature_kinds, coarse_kind...
  videos  id PK (store.ids: unique across libraries), path UNIQUE (relative to root, '/'), size, mtime, content_hash, duration, fps, width, height,
          n_clips, n_events, status ('pending' | 'indexed' | 'failed'), error, indexed_at
  clips   (video_id, idx) PK, start, end (seconds), embedding FLOAT[D]      row idx = clip sampled at ~2*idx s
  events  (video_id, idx) PK, start, end (seconds), clip_start, clip_end, embedding FLOAT[D]
  features  (video_id, kind) PK: every feature kind besides the coarse one (store.features)
  text_segments, channel_runs: the text channels' time-coded text and per-video outcome (store.transcripts)
Indexes made before ids carried a library id have INTEGER id columns; their ids fit them (store.ids).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import time

import duckdb
import numpy as np

from store import features, transcripts
from store.errors import VmrError

SCHEMA_VERSION = 1
DB_FILE = "library.duckdb"
LOCK_WAIT_SECONDS = 60.0
VIDEO_ID_STRIDE = 2 ** 20  # FAISS id of clip i of video v = v * VIDEO_ID_STRIDE + i (events likewise)


def schema_sql(dim: int) -> list[str]:
    dim = int(dim)
    return [
        "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
        """CREATE TABLE IF NOT EXISTS videos (
            id BIGINT PRIMARY KEY, path VARCHAR UNIQUE NOT NULL, size BIGINT, mtime DOUBLE, content_hash VARCHAR,
            duration DOUBLE, fps DOUBLE, width INTEGER, height INTEGER, n_clips INTEGER DEFAULT 0,
            n_events INTEGER DEFAULT 0, status VARCHAR NOT NULL, error VARCHAR, indexed_at TIMESTAMP)""",
        f"""CREATE TABLE IF NOT EXISTS clips (
            video_id BIGINT NOT NULL, idx INTEGER NOT NULL, start DOUBLE, "end" DOUBLE,
            embedding FLOAT[{dim}] NOT NULL, PRIMARY KEY (video_id, idx))""",
        f"""CREATE TABLE IF NOT EXISTS events (
            video_id BIGINT NOT NULL, idx INTEGER NOT NULL, start DOUBLE, "end" DOUBLE, clip_start INTEGER,
            clip_end INTEGER, embedding FLOAT[{dim}] NOT NULL, PRIMARY KEY (video_id, idx))""",
        features.TABLE_SQL,
        *transcripts.TABLES_SQL,
    ]


def ensure_added_tables(con) -> None:
    """Create, in an index made before them, the tables added since schema v1: the other feature kinds
    (store.features) and the text channels (store.transcripts). Nothing else changes."""
    features.ensure_table(con)
    transcripts.ensure_tables(con)


def delete_added_rows(con, video_id: int) -> None:
    """A video's rows of those tables (its content changed, failed or left), in the caller's transaction."""
    features.delete(con, video_id)
    transcripts.delete(con, video_id)


def db_path(index_dir) -> str:
    return os.path.join(os.fspath(index_dir), DB_FILE)


def connect(index_dir, read_only: bool, wait: float = LOCK_WAIT_SECONDS) -> duckdb.DuckDBPyConnection:
    """Open the library's DuckDB file, retrying while the other side holds the lock.

    Raises VmrError when the file is missing (read-only), corrupt, or still locked after ``wait`` seconds.
    """
    path = db_path(index_dir)
    if os.path.exists(os.fspath(index_dir)) and not os.path.isdir(os.fspath(index_dir)):
        raise VmrError(f"--index {index_dir} is a file, not an index folder: give the folder `vmr index` wrote")
    if read_only and not os.path.isfile(path):
        raise VmrError(f"no vmr index at {index_dir} (missing {DB_FILE}); build one with `vmr index DIR --index {index_dir}`")
    if not read_only:
        os.makedirs(os.fspath(index_dir), exist_ok=True)
    deadline = time.monotonic() + wait
    delay = 0.01
    while True:
        try:
            return duckdb.connect(path, read_only=read_only)
        except duckdb.IOException as err:
            message = str(err)
            if "lock" not in message.lower():
                raise VmrError(f"cannot open {path}: {message.splitlines()[0]} - the index is damaged: build a new "
                               f"one (`vmr index VIDEOS --index NEW_FOLDER`)") from None
            if time.monotonic() > deadline:
                raise VmrError(f"index {index_dir} stays locked by another vmr process: {message.splitlines()[0]}") from None
        except duckdb.Error as err:
            raise VmrError(f"cannot open {path}: {str(err).splitlines()[0]}") from None
        time.sleep(delay * (1 + random.random()))
        delay = min(delay * 2, 0.25)


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection):
    """BEGIN ... COMMIT, ROLLBACK on any error (a video is all-or-nothing)."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def read_meta(con) -> dict:
    try:
        rows = con.execute("SELECT key, value FROM meta").fetchall()
    except duckdb.CatalogException:
        return {}
    return {k: json.loads(v) for k, v in rows}


def video_rows(con, columns: tuple[str, ...]) -> list[tuple]:
    """Every row of ``videos`` (``columns`` of it, in that order), by id: the server's catalogue."""
    return con.execute(f"SELECT {', '.join(columns)} FROM videos ORDER BY id").fetchall()


def event_spans(con, video_id: int) -> list[tuple[float, float]]:
    """(start, end) seconds of one video's pseudo-events, in order."""
    return con.execute('SELECT start, "end" FROM events WHERE video_id = ? ORDER BY idx', [video_id]).fetchall()


def write_meta(con, values: dict) -> None:
    for key, value in values.items():
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, json.dumps(value)])


def insert_vectors(con, table: str, video_id: int, rows: dict, embeddings: np.ndarray) -> None:
    """Insert one video's rows into clips/events with their FLOAT[D] embeddings [N, D].

    rows: column name -> 1-d array of N values (besides video_id, idx, embedding). The embeddings go in as one flat
    numpy column scanned by DuckDB and regrouped per row: ~50x faster than one parameter list per row.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = embeddings.shape
    if n == 0:
        return
    columns = dict(rows)
    flat_rows = {"r": np.repeat(np.arange(n, dtype=np.int32), dim), "j": np.tile(np.arange(dim, dtype=np.int32), n),
                 "v": embeddings.ravel()}
    per_row = {"r": np.arange(n, dtype=np.int32), **{k: np.asarray(v) for k, v in columns.items()}}
    names = ", ".join(f'"{c}"' for c in columns)
    picked = ", ".join(f'p."{c}"' for c in columns)
    vmr_flat = {k: np.ascontiguousarray(v) for k, v in flat_rows.items()}  # noqa: F841 (DuckDB scans locals by name)
    vmr_rows = {k: np.ascontiguousarray(v) for k, v in per_row.items()}  # noqa: F841
    con.execute(f"""INSERT INTO {table} (video_id, idx, {names}, embedding)
        SELECT {int(video_id)}, p.r, {picked}, e.vec::FLOAT[{dim}]
        FROM vmr_rows p JOIN (SELECT r, list(v ORDER BY j) AS vec FROM vmr_flat GROUP BY r) e USING (r)""")


def fetch_vectors(con, sql: str, params=None) -> np.ndarray:
    """Run a query whose single column is a FLOAT[D] array; returns f32 [N, D]."""
    result = con.execute(sql, params or []).fetchnumpy()
    column = next(iter(result.values())) if result else np.zeros(0)
    if len(column) == 0:
        return np.zeros((0, 0), np.float32)
    return np.stack(column).astype(np.float32, copy=False)
