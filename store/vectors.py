"""The library's FAISS files (clips.faiss, events.faiss) and how they stay in step with DuckDB.

DuckDB is the source of truth. Every write transaction bumps meta.generation; `faiss.json` records the generation
the FAISS files reflect and is written (atomically) AFTER them. So after a crash at any point either faiss.json's
generation equals DuckDB's (files current) or it does not (the writer rebuilds them from DuckDB before its next
update; readers meanwhile use the stale files and re-score/filter every hit against DuckDB).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile

import numpy as np

from store import faiss_index
from store.db import VIDEO_ID_STRIDE, fetch_vectors
from store.errors import VmrError

TABLES = ("clips", "events")
STATE_FILE = "faiss.json"
REBUILD_CHUNK = 65536  # vectors read from DuckDB per step when rebuilding
FETCH_FACTOR = 4  # an approximate FAISS index returns k * FETCH_FACTOR hits, re-scored exactly from DuckDB


def index_file(index_dir, table: str) -> str:
    return os.path.join(os.fspath(index_dir), f"{table}.faiss")


def read_state(index_dir) -> dict:
    try:
        with open(os.path.join(os.fspath(index_dir), STATE_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_state(index_dir, state: dict) -> None:
    path = os.path.join(os.fspath(index_dir), STATE_FILE)
    fd, tmp = tempfile.mkstemp(prefix=STATE_FILE + ".", suffix=".tmp", dir=os.fspath(index_dir))
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def vector_ids(video_id: int, n: int) -> np.ndarray:
    """FAISS ids of rows 0..n-1 of one video: video_id * 2**20 + idx. Returns int64 [n]."""
    return int(video_id) * VIDEO_ID_STRIDE + np.arange(int(n), dtype=np.int64)


def split_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int64 [N] FAISS ids -> (video_id [N], idx [N])."""
    ids = np.asarray(ids, dtype=np.int64)
    return ids // VIDEO_ID_STRIDE, ids % VIDEO_ID_STRIDE


class FaissFiles:
    """The writer's in-memory FAISS indexes for clips and events, saved as files next to the DuckDB file.

    Usage (ingest): ff = FaissFiles.open(index_dir, con, generation, dim); ff.replace(...)/ff.remove(...) after
    each DuckDB commit; ff.save(generation) now and then and at the end.
    """

    def __init__(self, index_dir, indexes: dict, dim: int):
        self.index_dir = os.fspath(index_dir)
        self.indexes = indexes  # table (clips/events) -> faiss.Index
        self.dim = dim
        self.needs_rebuild = False  # an index type that cannot remove ids was asked to

    @classmethod
    def open(cls, index_dir, con, generation: int, dim: int, force_rebuild: bool = False) -> "FaissFiles":
        """Load the files if they reflect ``generation``, else rebuild both from DuckDB (``con``)."""
        state = read_state(index_dir)
        current = (not force_rebuild and state.get("generation") == generation
                   and all(os.path.isfile(index_file(index_dir, k)) for k in TABLES))
        if current:
            try:
                indexes = {k: faiss_index.read_index(index_file(index_dir, k), gpu=False) for k in TABLES}
                if all(ix.d == dim for ix in indexes.values()):
                    return cls(index_dir, indexes, dim)
            except Exception:  # unreadable file: rebuild below  # noqa: BLE001
                pass
        return cls(index_dir, build_from_db(con, dim), dim)

    def replace(self, video_id: int, old_counts: tuple[int, int], clip_vectors: np.ndarray,
                event_vectors: np.ndarray) -> None:
        """Swap one video's vectors: drop its old ids (old_counts = (n_clips, n_events)), add the new ones."""
        self.remove(video_id, old_counts)
        for table, vectors in zip(TABLES, (clip_vectors, event_vectors)):
            if len(vectors):
                faiss_index.add_vectors(self.indexes[table], vectors, vector_ids(video_id, len(vectors)))

    def remove(self, video_id: int, old_counts: tuple[int, int]) -> None:
        for table, n in zip(TABLES, old_counts):
            if n and not self.needs_rebuild:
                try:
                    faiss_index.remove_ids(self.indexes[table], vector_ids(video_id, n))
                except NotImplementedError:
                    self.needs_rebuild = True

    def save(self, con, generation: int) -> None:
        """Write both files atomically, then faiss.json. Rebuilds first if an index could not remove ids or the
        library outgrew the current index type (flat -> IVF)."""
        sizes = {k: int(self.indexes[k].ntotal) for k in TABLES}
        wanted = {k: faiss_index.choose_index_spec(max(sizes[k], 1), self.dim)["type"] for k in TABLES}
        if self.needs_rebuild or any(faiss_index.index_type(self.indexes[k]) != wanted[k] for k in TABLES):
            self.indexes = build_from_db(con, self.dim)
            self.needs_rebuild = False
        for table in TABLES:
            faiss_index.write_index_atomic(self.indexes[table], index_file(self.index_dir, table))
        write_state(self.index_dir, {"generation": int(generation),
                                     **{f"n_{k}": int(self.indexes[k].ntotal) for k in TABLES},
                                     **{f"{k}_type": faiss_index.index_type(self.indexes[k]) for k in TABLES}})


class ReadCache:
    """A reader's FAISS indexes, read again only when their file changes (the writer replaces files atomically)."""

    def __init__(self, index_dir):
        self.index_dir = os.fspath(index_dir)
        self._cached: dict = {}  # table -> (file mtime, index or None)

    def get(self, table: str):
        """The table's index, or None when it has no file or an unreadable one (search then reads DuckDB)."""
        path = index_file(self.index_dir, table)
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            return None
        cached = self._cached.get(table)
        if cached is None or cached[0] != mtime:
            try:
                index = faiss_index.read_index(path)
            except VmrError as err:  # DuckDB holds every vector: answer exactly from it meanwhile
                logging.getLogger("vmr.store").warning("%s: searching the DuckDB vectors directly (slower) until "
                                                       "`vmr index` rebuilds the FAISS files", err)
                index = None
            cached = self._cached[table] = (mtime, index)
        return cached[1]


def build_from_db(con, dim: int) -> dict:
    """Both indexes rebuilt from DuckDB's vectors (type chosen by size). Returns table -> faiss.Index."""
    indexes = {}
    for table in TABLES:
        n = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        spec = faiss_index.choose_index_spec(max(n, 1), dim)
        if spec["type"] == "flat" or n == 0:
            spec = {"type": "flat", "dim": dim, "metric": "ip"}
            index = faiss_index.build_index(np.zeros((0, dim), np.float32), np.zeros(0, np.int64), spec)
            for ids, vectors in _iter_vectors(con, table):
                faiss_index.add_vectors(index, vectors, ids)
        else:  # IVF needs its training sample up front: read everything (the vectors are needed anyway)
            parts = list(_iter_vectors(con, table))
            index = faiss_index.build_index(np.concatenate([v for _, v in parts]),
                                            np.concatenate([i for i, _ in parts]), spec)
        indexes[table] = index
    return indexes


def _iter_vectors(con, table: str):
    """Yield (ids int64 [n], vectors f32 [n, D]) over a table, in chunks."""
    last = -1
    while True:
        rows = con.execute(
            f"SELECT video_id::BIGINT * {VIDEO_ID_STRIDE} + idx AS id, embedding FROM {table} "
            f"WHERE video_id::BIGINT * {VIDEO_ID_STRIDE} + idx > ? ORDER BY id LIMIT {REBUILD_CHUNK}", [last]
        ).fetchnumpy()
        if len(rows["id"]) == 0:
            return
        ids = np.asarray(rows["id"], dtype=np.int64)
        yield ids, np.stack(rows["embedding"]).astype(np.float32)
        last = int(ids[-1])


def fetch_by_ids(con, table: str, ids: np.ndarray) -> dict:
    """Current vectors of FAISS ids still present in DuckDB: id -> f32 [D]."""
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[ids >= 0]
    if not len(ids):
        return {}
    rows = con.execute(
        f"SELECT video_id::BIGINT * {VIDEO_ID_STRIDE} + idx AS id, embedding FROM {table} "
        f"WHERE video_id::BIGINT * {VIDEO_ID_STRIDE} + idx IN (SELECT unnest(?::BIGINT[]))", [ids.tolist()]
    ).fetchnumpy()
    return {int(i): np.asarray(e, np.float32) for i, e in zip(rows["id"], rows["embedding"])}


def search(con, table: str, index, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Top-k FAISS ids of ``table`` by inner product with ``query`` f32 [D]: [(id, score)], best first.

    ``index``: the table's FAISS index, or None (no readable file): then exactly from DuckDB. The hits of an
    approximate index are re-scored exactly from DuckDB, and ids gone since the file was written drop out."""
    if index is None:
        return brute_force(con, table, query, k)
    fetch = k if faiss_index.is_exact(index) else k * FETCH_FACTOR
    fetch = min(fetch + 16, max(int(index.ntotal), 1))  # slack for ids gone since the file was written
    _, found = faiss_index.search(index, query[None], fetch)
    current = fetch_by_ids(con, table, found[0])
    return sorted(((i, float(v @ query)) for i, v in current.items()), key=lambda h: -h[1])[:k]


def brute_force(con, table: str, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Exact top-k straight from DuckDB (no FAISS file yet): [(id, score)], best first."""
    best: list[tuple[float, int]] = []
    for ids, vectors in _iter_vectors(con, table):
        scores = vectors @ query
        best.extend(zip(scores.tolist(), ids.tolist()))
        best = sorted(best, reverse=True)[:k]
    return [(i, s) for s, i in best]


__all__ = ["FaissFiles", "ReadCache", "build_from_db", "fetch_by_ids", "search", "brute_force", "vector_ids", "split_ids", "read_state",
           "index_file", "TABLES", "fetch_vectors"]
