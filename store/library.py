"""A vmr library on disk: one DuckDB file (truth) + FAISS files (coarse search), read and written through here.

    with Library(index_dir) as lib:                       # read-only (search, status, training data)
        lib.meta(); lib.videos(); lib.resolve_vid("cats/tabby.mp4")
        lib.clip_embeddings(vid) -> f32 [T, D]; lib.events(vid) -> [{idx, start, end}]
        lib.search_clips(query [D], k) -> [(video_id, clip_idx, score)]

The writer (indexer) opens it with read_only=False and groups commits in ``with lib.session():`` blocks kept short,
because a DuckDB file is either one read-write process or any number of readers. Read-only calls open the file for
one query each (waiting out a writer's batch), so a search never holds the writer up for long either.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time

import numpy as np

from store import db, faiss_index, features, ids, kinds, vectors
from store.errors import VmrError


class Library:
    def __init__(self, index_dir, read_only: bool = True):
        self.index_dir = os.fspath(index_dir)
        self.read_only = read_only
        self._con = None
        self._faiss = vectors.ReadCache(self.index_dir)  # the readers' FAISS files
        if read_only:
            with self._connection() as con:  # fails now, with a clear message, if there is no index
                if not db.read_meta(con):
                    raise VmrError(f"{self.index_dir} is not a finished vmr index (no meta)")

    # ---- connections -------------------------------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    @contextlib.contextmanager
    def session(self):
        """Hold one connection for a batch of calls (the writer's batches; keep them short)."""
        if self._con is not None:
            yield self._con
            return
        self._con = db.connect(self.index_dir, read_only=self.read_only)
        try:
            yield self._con
        finally:
            self.close()

    @contextlib.contextmanager
    def _connection(self):
        if self._con is not None:
            yield self._con
        else:
            con = db.connect(self.index_dir, read_only=self.read_only)
            try:
                yield con
            finally:
                con.close()

    # ---- reads -------------------------------------------------------------------------------------------------
    def meta(self) -> dict:
        """schema_version, clip_model, embed_dim, root, generation, faiss (state of the FAISS files)..."""
        with self._connection() as con:
            meta = db.read_meta(con)
        meta["faiss"] = vectors.read_state(self.index_dir)
        return meta

    def videos(self, status: str | None = None) -> list[dict]:
        """Rows of `videos` (dicts), ordered by id; ``status`` filters ('indexed', 'failed', 'pending')."""
        sql = ("SELECT id, path, size, mtime, content_hash, duration, fps, width, height, n_clips, n_events, "
               "status, error, indexed_at FROM videos")
        params = []
        if status is not None:
            sql += " WHERE status = ?"
            params.append(status)
        with self._connection() as con:
            cursor = con.execute(sql + " ORDER BY id", params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def video(self, video_id: int) -> dict:
        for row in self._select_videos("id = ?", [int(video_id)]):
            return row
        raise VmrError(f"no video with id {video_id} in {self.index_dir}")

    def resolve_vid(self, vid: str) -> int:
        """Video id of an indexed video named by its path relative to the root, or its file stem."""
        vid = str(vid).replace(os.sep, "/")
        rows = self._select_videos("path = ? AND status = 'indexed'", [vid])
        if not rows:
            stems = self._select_videos("status = 'indexed'", [])
            rows = [r for r in stems if os.path.splitext(os.path.basename(r["path"]))[0] == vid]
        if not rows:
            raise VmrError(f"no indexed video {vid!r} in {self.index_dir} (give its path relative to the indexed "
                           "folder, or its file name without extension)")
        if len(rows) > 1:
            raise VmrError(f"{vid!r} names {len(rows)} videos ({', '.join(r['path'] for r in rows[:3])}...): "
                           "give the path relative to the indexed folder")
        return int(rows[0]["id"])

    def _select_videos(self, where: str, params: list) -> list[dict]:
        with self._connection() as con:
            cursor = con.execute(f"SELECT id, path, duration, n_clips, n_events, status, error FROM videos WHERE {where}",
                                 params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def clip_embeddings(self, video_id: int) -> np.ndarray:
        """f32 [T, D]; row i = clip i (the frame sampled for [2i, 2i+2) s)."""
        with self._connection() as con:
            out = db.fetch_vectors(con, "SELECT embedding FROM clips WHERE video_id = ? ORDER BY idx", [int(video_id)])
            if len(out) == 0:
                out = np.zeros((0, db.read_meta(con).get("embed_dim", 0)), np.float32)
        return out

    def videos_by_id(self, video_ids) -> dict[int, dict]:
        """{id: row (path, duration, n_clips, n_events, status, error)} of the given videos, in one query."""
        ids = sorted({int(v) for v in video_ids})
        if not ids:
            return {}
        return {int(r["id"]): r for r in self._select_videos("id IN (SELECT unnest(?))", [ids])}

    def clip_embeddings_many(self, video_ids) -> dict[int, np.ndarray]:
        """{id: f32 [T, D]} of the coarse kind for several videos in one query (a query's candidate videos)."""
        with self._connection() as con:
            return features.coarse_many(con, sorted({int(v) for v in video_ids}))

    def features_many(self, video_ids, kinds_wanted: list[str]) -> dict[int, np.ndarray]:
        """{id: f32 [T, sum of the kinds' dims]}: the named kinds of each video side by side, in that order, as
        stored (a reader normalises each kind on its own, model.sample.video_input), over the clips every kind
        covers (store.features.side_by_side). Videos lacking one of the kinds are left out."""
        ids = sorted({int(v) for v in video_ids})
        with self._connection() as con:
            coarse = kinds.coarse_kind(db.read_meta(con))
            per_kind = [features.coarse_many(con, ids) if kind == coarse else features.read_many(con, ids, kind)
                        for kind in kinds_wanted]
        return features.side_by_side(per_kind)

    def kinds_by_video(self) -> dict[int, list[str]]:
        """{id: the feature kinds it holds} of every indexed video (the coarse kind for each one with clips)."""
        with self._connection() as con:
            coarse = kinds.coarse_kind(db.read_meta(con))
            extra = features.kinds_by_video(con)
            with_clips = [int(v) for v, in con.execute("SELECT id FROM videos WHERE status = 'indexed' AND n_clips > 0")
                          .fetchall()]
        return {v: sorted([coarse, *extra.get(v, [])]) for v in with_clips}

    def events_many(self, video_ids) -> dict[int, list[dict]]:
        """{id: [{idx, start, end}] in order} for several videos in one query."""
        ids = sorted({int(v) for v in video_ids})
        out: dict[int, list[dict]] = {v: [] for v in ids}
        if not ids:
            return out
        with self._connection() as con:
            rows = con.execute('SELECT video_id, idx, start, "end" FROM events WHERE video_id IN (SELECT unnest(?)) '
                               "ORDER BY video_id, idx", [ids]).fetchall()
        for vid, i, st, ed in rows:
            out[int(vid)].append({"idx": i, "start": st, "end": ed})
        return out

    def clips(self, video_id: int) -> list[dict]:
        """[{idx, start, end}] of one video (seconds)."""
        return self._spans("clips", video_id)

    def events(self, video_id: int) -> list[dict]:
        """Pseudo-events of one video: [{idx, start, end}] (seconds), in order."""
        return self._spans("events", video_id)

    def event_embeddings(self, video_id: int) -> np.ndarray:
        with self._connection() as con:
            return db.fetch_vectors(con, "SELECT embedding FROM events WHERE video_id = ? ORDER BY idx", [int(video_id)])

    def _spans(self, table: str, video_id: int) -> list[dict]:
        with self._connection() as con:
            rows = con.execute(f'SELECT idx, start, "end" FROM {table} WHERE video_id = ? ORDER BY idx',
                               [int(video_id)]).fetchall()
        return [{"idx": i, "start": s, "end": e} for i, s, e in rows]

    def counts(self) -> dict:
        with self._connection() as con:
            clips = con.execute("SELECT count(*) FROM clips").fetchone()[0]
            events = con.execute("SELECT count(*) FROM events").fetchone()[0]
            by_status = dict(con.execute("SELECT status, count(*) FROM videos GROUP BY status").fetchall())
        return {"clips": clips, "events": events, **{f"videos_{k}": v for k, v in by_status.items()}}

    # ---- search ------------------------------------------------------------------------------------------------
    def search_clips(self, query: np.ndarray, k: int) -> list[tuple[int, int, float]]:
        """Top-k clips by cosine with ``query`` f32 [D] (normalised): [(video_id, clip_idx, score)], best first."""
        return self._search("clips", query, k)

    def search_events(self, query: np.ndarray, k: int) -> list[tuple[int, int, float]]:
        """Top-k pseudo-events: [(video_id, event_idx, score)], best first."""
        return self._search("events", query, k)

    def _search(self, table: str, query: np.ndarray, k: int) -> list[tuple[int, int, float]]:
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        if int(k) <= 0:
            return []
        index = self._faiss.get(table)
        with self._connection() as con:
            dim = db.read_meta(con).get("embed_dim")
            if dim is not None and query.shape[0] != dim:
                raise VmrError(f"query has {query.shape[0]} dims, the index {dim} (different CLIP model?)")
            hits = vectors.search(con, table, index, query, int(k))
        return [(int(i // db.VIDEO_ID_STRIDE), int(i % db.VIDEO_ID_STRIDE), s) for i, s in hits]

    # ---- writes (indexer) ----------------------------------------------------------------------------------
    def _writable(self):
        if self.read_only:
            raise VmrError("this Library was opened read-only")

    def prepare(self, clip_model: str, embed_dim: int, root: str, clip_seconds: float,
                clip_source: dict | None = None) -> dict:
        """Create the schema (first run) or check the index matches this CLIP model, root and clip length (seconds
        per clip, recorded as meta ``clip_seconds``; indexes written before it was recorded use the 2-s grid, the
        only one vmr has written). Returns meta.

        ``clip_source`` (store.clip_source.CLIPSource.to_meta(): model, pretrained, precision) tells search how to
        load the same CLIP for queries; it is refreshed on every run, since a local checkpoint may have moved.
        """
        self._writable()
        with self.session() as con:
            meta = db.read_meta(con)
            if meta:
                if meta.get("schema_version") != db.SCHEMA_VERSION:
                    raise VmrError(f"index {self.index_dir} has schema v{meta.get('schema_version')}, this vmr "
                                   f"writes v{db.SCHEMA_VERSION}: index into a new --index directory")
                if meta.get("clip_model") != clip_model or meta.get("embed_dim") != embed_dim:
                    raise VmrError(f"index {self.index_dir} holds {meta.get('clip_model')} features; you asked for "
                                   f"{clip_model}: use the same --clip-model/--clip-pretrained or a new --index")
                if meta.get("root") != root:
                    raise VmrError(f"index {self.index_dir} indexes {meta.get('root')}, not {root}: use a new --index")
                if float(meta.setdefault("clip_seconds", clip_seconds)) != float(clip_seconds):
                    raise VmrError(f"index {self.index_dir} holds {meta['clip_seconds']}-s clips, this vmr cuts "
                                   f"{clip_seconds}-s clips: index into a new --index directory")
                if clip_source and meta.get("clip_source") != clip_source:
                    db.write_meta(con, {"clip_source": clip_source})
                    meta["clip_source"] = clip_source
                db.ensure_added_tables(con)  # an index made before other kinds or the text channels gains their tables
                update = kinds.record_update(meta, clip_model, embed_dim)
                if update:
                    db.write_meta(con, update)
                    meta.update(update)
                return meta
            with db.transaction(con):
                for sql in db.schema_sql(embed_dim):
                    con.execute(sql)
                meta = {"schema_version": db.SCHEMA_VERSION, "clip_model": clip_model, "embed_dim": int(embed_dim),
                        "root": root, "clip_seconds": float(clip_seconds), "generation": 0, "next_video_id": 1,
                        "library_id": ids.library_id_of(root), "created_at": _now().isoformat()}
                if clip_source:
                    meta["clip_source"] = clip_source
                meta["feature_kinds"] = {kinds.CLIP_KIND: kinds.clip_kind_record(clip_model, embed_dim, meta)}
                meta["coarse_kind"] = kinds.CLIP_KIND
                db.write_meta(con, meta)
            return meta

    def file_states(self) -> dict:
        """path -> {id, size, mtime, content_hash, status, n_clips, n_events} for every row of `videos`."""
        with self._connection() as con:
            rows = con.execute("SELECT path, id, size, mtime, content_hash, status, n_clips, n_events FROM videos").fetchall()
        return {r[0]: dict(zip(("id", "size", "mtime", "content_hash", "status", "n_clips", "n_events"), r[1:]))
                for r in rows}

    def add_pending(self, files: list[tuple[str, int, float]]) -> dict:
        """Give new paths ids (in the given order, one transaction) with status 'pending'. Returns path -> id."""
        self._writable()
        given = {}
        if not files:
            return given
        with self.session() as con, db.transaction(con):
            meta = db.read_meta(con)
            number, library_id = int(meta["next_video_id"]), int(meta.get("library_id", 0))
            for path, size, mtime in files:
                given[path] = ids.video_id(library_id, number)
                con.execute("INSERT INTO videos (id, path, size, mtime, status) VALUES (?, ?, ?, ?, 'pending')",
                            [given[path], path, size, mtime])
                number += 1
            db.write_meta(con, {"next_video_id": number})
        return given

    def commit_video(self, video_id: int, info: dict, clip_spans: np.ndarray, clip_vectors: np.ndarray,
                     event_spans: np.ndarray, event_clips: np.ndarray, event_vectors: np.ndarray,
                     other_kinds: dict | None = None) -> int:
        """Replace one video's clips/events and mark it indexed, all in ONE transaction. Returns the generation.

        info: size, mtime, content_hash, duration, fps, width, height. clip_spans/event_spans f32 [N, 2] seconds;
        event_clips int [E, 2] (first, last clip); vectors f32 [N, D] normalised; other_kinds: {kind: (vectors, record)}
        of its non-coarse kinds (as commit_features writes them)."""
        self._writable()
        with self.session() as con, db.transaction(con):
            self._drop_vectors(con, video_id)  # new content: every kind of the old one leaves
            for kind, (vectors_of_kind, record) in (other_kinds or {}).items():
                self._write_kind(con, video_id, kind, vectors_of_kind, record)
            db.insert_vectors(con, "clips", video_id, {"start": clip_spans[:, 0], "end": clip_spans[:, 1]}, clip_vectors)
            db.insert_vectors(con, "events", video_id,
                              {"start": event_spans[:, 0], "end": event_spans[:, 1],
                               "clip_start": np.asarray(event_clips[:, 0], np.int32),
                               "clip_end": np.asarray(event_clips[:, 1], np.int32)}, event_vectors)
            con.execute("""UPDATE videos SET size = ?, mtime = ?, content_hash = ?, duration = ?, fps = ?, width = ?,
                           height = ?, n_clips = ?, n_events = ?, status = 'indexed', error = NULL, indexed_at = ?
                           WHERE id = ?""",
                        [info["size"], info["mtime"], info.get("content_hash"), info.get("duration"), info.get("fps"),
                         info.get("width"), info.get("height"), len(clip_vectors), len(event_vectors), _now(), video_id])
            return self._bump(con)

    def commit_failed(self, video_id: int, info: dict, error: str) -> int:
        """Mark a video failed with a one-line reason (its old clips/events, if any, leave). Returns generation."""
        self._writable()
        error = " ".join(str(error).split())[:500]
        with self.session() as con, db.transaction(con):
            self._drop_vectors(con, video_id)
            con.execute("""UPDATE videos SET size = ?, mtime = ?, content_hash = ?, n_clips = 0, n_events = 0,
                           status = 'failed', error = ?, indexed_at = ? WHERE id = ?""",
                        [info.get("size"), info.get("mtime"), info.get("content_hash"), error, _now(), video_id])
            return self._bump(con)

    def touch(self, video_id: int, size: int, mtime: float) -> None:
        """Same content, new mtime (a copy or `touch`): remember the mtime so the next run skips it quickly."""
        self._writable()
        with self.session() as con:
            con.execute("UPDATE videos SET size = ?, mtime = ? WHERE id = ?", [size, mtime, video_id])

    def delete_videos(self, video_ids: list[int]) -> int:
        """Remove videos (files gone) with their clips and events, one transaction. Returns the generation."""
        self._writable()
        with self.session() as con, db.transaction(con):
            for vid in video_ids:
                self._drop_vectors(con, vid)
                con.execute("DELETE FROM videos WHERE id = ?", [vid])
            return self._bump(con)

    def commit_features(self, video_id: int, kind: str, vectors_of_clips: np.ndarray, record: dict) -> None:
        """Store one indexed video's vectors [n, dim] of a non-coarse ``kind`` (replacing its old ones) and the kind's
        record (store.kinds) if new, in one transaction; refuses a record that contradicts the one the index holds."""
        self._writable()
        with self.session() as con, db.transaction(con):
            self._write_kind(con, video_id, kind, vectors_of_clips, record)

    def _write_kind(self, con, video_id: int, kind: str, vectors_of_clips: np.ndarray, record: dict) -> None:
        if kind == kinds.coarse_kind(meta := db.read_meta(con)):
            raise VmrError(f"'{kind}' is this index's coarse kind: its vectors come with the clips (commit_video)")
        held = kinds.feature_kinds(meta)
        kinds.check_record(held.get(kind), record, kind, self.index_dir)
        if held.get(kind) != record:  # a new kind, or its weights file moved
            db.write_meta(con, {"feature_kinds": {**held, kind: record}})
        features.write(con, video_id, kind, vectors_of_clips, record["dtype"])

    @staticmethod
    def _drop_vectors(con, video_id: int) -> None:
        for table in ("clips", "events"):
            con.execute(f"DELETE FROM {table} WHERE video_id = ?", [int(video_id)])
        db.delete_added_rows(con, video_id)  # its other kinds and text channels

    def generation(self) -> int:
        with self._connection() as con:
            return int(db.read_meta(con).get("generation", 0))

    def open_faiss(self, force_rebuild: bool = False) -> vectors.FaissFiles:
        """The writer's FAISS indexes: loaded if current, else rebuilt from DuckDB."""
        self._writable()
        with self.session() as con:
            meta = db.read_meta(con)
            return vectors.FaissFiles.open(self.index_dir, con, int(meta["generation"]), int(meta["embed_dim"]),
                                           force_rebuild=force_rebuild)

    def save_faiss(self, files: vectors.FaissFiles) -> None:
        self._writable()
        with self.session() as con:
            files.save(con, int(db.read_meta(con)["generation"]))

    @staticmethod
    def _bump(con) -> int:
        generation = int(db.read_meta(con).get("generation", 0)) + 1
        db.write_meta(con, {"generation": generation})
        return generation


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def wait_for_index(index_dir, timeout: float = 30.0) -> None:
    """Block until an index exists at index_dir (tests and tools that start a reader beside a fresh ingest)."""
    deadline = time.monotonic() + timeout
    while not os.path.isfile(db.db_path(index_dir)):
        if time.monotonic() > deadline:
            raise VmrError(f"no index appeared at {index_dir}")
        time.sleep(0.05)
