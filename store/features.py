"""Per-clip feature vectors of every kind an index holds, read and written on one DuckDB connection.

The coarse kind (store.kinds.coarse_kind, CLIP today) lives in ``clips.embedding``: it is the search key, the FAISS
files are built from it and search re-scores its hits from it. Every other kind lives in ``features``, one row a
video and kind, holding the video's [n, dim] matrix (row i = clip i) as raw bytes in the kind's stored dtype:

  features  (video_id, kind) PK, n, dim, dtype ('float32' | 'float16'), data BLOB

A whole matrix a row because every reader wants whole videos (a reranker window, a training video), and one
transaction then writes or replaces one kind of one video, so a kind is added to an indexed library video by
video, kill-safe, without touching its other kinds.
"""
from __future__ import annotations

import duckdb
import numpy as np

TABLE_SQL = """CREATE TABLE IF NOT EXISTS features (
    video_id BIGINT NOT NULL, kind VARCHAR NOT NULL, n INTEGER NOT NULL, dim INTEGER NOT NULL,
    dtype VARCHAR NOT NULL, data BLOB NOT NULL, PRIMARY KEY (video_id, kind))"""
DTYPES = ("float32", "float16")


def ensure_table(con) -> None:
    """Create ``features`` in an index made before it existed (nothing else changes)."""
    con.execute(TABLE_SQL)


def write(con, video_id: int, kind: str, vectors: np.ndarray, dtype: str) -> None:
    """Store (or replace) one video's vectors f32/f16 [n, dim] of ``kind``, converted to ``dtype``."""
    if dtype not in DTYPES:
        raise ValueError(f"feature dtype {dtype!r}: expected one of {DTYPES}")
    vectors = np.ascontiguousarray(vectors, dtype=dtype)
    con.execute("DELETE FROM features WHERE video_id = ? AND kind = ?", [int(video_id), kind])
    con.execute("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?)",
                [int(video_id), kind, int(vectors.shape[0]), int(vectors.shape[1]), dtype, vectors.tobytes()])


def delete(con, video_id: int) -> None:
    """Drop every non-coarse kind of a video (its content changed, failed or left)."""
    con.execute("DELETE FROM features WHERE video_id = ?", [int(video_id)])


def _rows(con, sql: str, params=None) -> list[tuple]:
    """Rows of a query on ``features``; none from an index made before the table existed (opened read-only)."""
    try:
        return con.execute(sql, params or []).fetchall()
    except duckdb.CatalogException:
        return []


def read_many(con, video_ids: list[int], kind: str) -> dict[int, np.ndarray]:
    """{id: f32 [n, dim]} of the given videos that hold ``kind``, in one query."""
    rows = _rows(con, "SELECT video_id, n, dim, dtype, data FROM features WHERE kind = ? AND video_id IN "
                       "(SELECT unnest(?::BIGINT[]))", [kind, [int(v) for v in video_ids]])
    return {int(vid): np.frombuffer(data, dtype=dtype).reshape(n, dim).astype(np.float32)
            for vid, n, dim, dtype, data in rows}


def coarse_many(con, video_ids: list[int]) -> dict[int, np.ndarray]:
    """{id: f32 [T, D]} of the coarse kind (``clips.embedding``) of several videos, in one query; a video without
    clips gets an empty [0, 0] array."""
    out = {int(v): np.zeros((0, 0), np.float32) for v in video_ids}
    result = con.execute("SELECT video_id, embedding FROM clips WHERE video_id IN (SELECT unnest(?::BIGINT[])) "
                         "ORDER BY video_id, idx", [list(out)]).fetchnumpy()
    vids = np.asarray(result["video_id"])
    if len(vids) == 0:
        return out
    vectors = np.stack(result["embedding"]).astype(np.float32, copy=False)
    bounds = np.flatnonzero(np.diff(vids)) + 1
    for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(vids)]):
        out[int(vids[start])] = vectors[start:stop]
    return out


def side_by_side(per_kind: list[dict[int, np.ndarray]]) -> dict[int, np.ndarray]:
    """Each video that every kind holds: its kinds' matrices concatenated along features, in the given order.

    A kind may hold a row more or fewer than another (a recipe that pads the video to whole clips of its own);
    the clips all kinds cover are kept, as the authors' data loader keeps the shortest source's length."""
    common = set(per_kind[0]).intersection(*per_kind[1:]) if per_kind else set()
    out = {}
    for vid in common:
        parts = [kind[vid] for kind in per_kind]
        n = min(len(p) for p in parts)
        if n:
            out[vid] = np.concatenate([p[:n] for p in parts], axis=1)
    return out


def kinds_by_video(con) -> dict[int, list[str]]:
    """{id: [non-coarse kinds it holds, sorted]} of every video that holds one."""
    out: dict[int, list[str]] = {}
    for vid, kind in _rows(con, "SELECT video_id, kind FROM features ORDER BY video_id, kind"):
        out.setdefault(int(vid), []).append(kind)
    return out


def videos_per_kind(con) -> dict[str, int]:
    """{kind: number of videos holding it} over the non-coarse kinds."""
    return dict(_rows(con, "SELECT kind, count(*) FROM features GROUP BY kind"))


__all__ = ["ensure_table", "write", "delete", "read_many", "coarse_many", "side_by_side", "kinds_by_video",
           "videos_per_kind"]
