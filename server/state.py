"""What `vmr serve` keeps between requests: the search engine (CLIP, reranker), the video catalogue, the locks.

DuckDB gives a file to ONE writing process or to many reading ones, and inside one process it refuses a read-only
and a read-write connection to the same file at once. So, in this process:
  - every DuckDB use goes through ``db_lock`` (a readers-writer lock): reads (search, status, label lists) share
    it, label writes take it alone, and writers go first once waiting, so a stream of searches cannot starve them;
  - searches also take ``search_lock``: the engine's Library and models are not made for two threads at once;
  - connections are opened per request and closed at once (never held), so an `vmr index` process running beside
    the server gets the file between requests; thumbnails and video bytes need no DuckDB at all (the catalogue
    below answers them from memory).
/api/status waits at most STATUS_WAIT_SECONDS for the file, then answers with the counts it read last (flagged
writer_active), so the page's status line keeps up with an ingest however long one of its batches holds the file.
The catalogue (id -> video row) is re-read when older than CATALOGUE_SECONDS, so videos an ingest adds appear
within seconds, and deleted ones disappear with their cached thumbnails.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict

from retriever.search import SearchEngine
from store import db
from store.errors import VmrError
from store.labels import WINDOW_DIGITS, count_labels, write_connection
from store.lock import ingest_running
from store.status import incomplete_note

STATUS_WAIT_SECONDS = 1.0  # /api/status waits this long for a writer's batch, then answers with the last counts
CATALOGUE_SECONDS = 2.0  # the video table is re-read at most this often (plus on an unknown id)
UNKNOWN_ID_REFRESH_SECONDS = 0.5  # an unknown id forces a re-read at most this often (ids probing cannot flood)
SEARCHES_KEPT = 2000  # searches whose hits may still be labelled (~100 bytes a hit, 20 hits a search: ~4 MB)
VIDEO_COLUMNS = ("id", "path", "size", "mtime", "content_hash", "duration", "fps", "width", "height", "n_clips",
                 "n_events", "status", "error")


class Busy(Exception):
    """Another process (an ingest) kept the index's DuckDB file for longer than the request may wait: HTTP 503,
    try again. Not a VmrError, so no endpoint mistakes it for a bad request."""


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (writer preference)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    def acquire_read(self):
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1

    def release_read(self):
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self):
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True

    def release_write(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    def reading(self):
        return _Held(self.acquire_read, self.release_read)

    def writing(self):
        return _Held(self.acquire_write, self.release_write)


class _Held:
    def __init__(self, acquire, release):
        self._acquire, self._release = acquire, release

    def __enter__(self):
        self._acquire()

    def __exit__(self, *exc):
        self._release()


class RecentSearches:
    """The last SEARCHES_KEPT searches, by the id /api/search returns with its hits: a hit's label names the search
    that found it, so the label's sentence is the one the hit was found for (not what the search box holds now).
    Kept in memory only: after a restart a page's old hits are unknown, and labelling them asks to search again."""

    def __init__(self, kept: int = SEARCHES_KEPT):
        self.kept = kept
        self._searches: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, query: str, moments: list[dict]) -> str:
        """Remember one search; returns its id. ``moments``: dicts with video_id, start, end."""
        search_id = secrets.token_hex(8)
        hits = {hit_key(m["video_id"], m["start"], m["end"]) for m in moments}
        with self._lock:
            self._searches[search_id] = {"query": query, "hits": hits}
            while len(self._searches) > self.kept:
                self._searches.popitem(last=False)
        return search_id

    def get(self, search_id: str) -> dict | None:
        """{"query", "hits": {hit_key(...)}} of a remembered search, or None."""
        with self._lock:
            return self._searches.get(search_id)


def hit_key(video_id: int, start: float, end: float) -> tuple[int, float, float]:
    """A hit as a search found it: (video id, start, end) at the labels' window precision."""
    return int(video_id), round(float(start), WINDOW_DIGITS), round(float(end), WINDOW_DIGITS)


class ServerState:
    """The loaded engine and the in-memory video catalogue of one index (see the module docstring)."""

    def __init__(self, index_dir: str, checkpoint: str | None = None, device: str = "auto", engine=None,
                 precision: str = "auto"):
        self.index_dir = str(index_dir)
        self.db_lock = ReadWriteLock()
        self.lock_wait = db.LOCK_WAIT_SECONDS  # seconds a request waits out another process's write batch
        self.search_lock = threading.Lock()
        self.searches = RecentSearches()
        self._catalogue_lock = threading.Lock()
        self.engine = engine or SearchEngine(self.index_dir, checkpoint=checkpoint, device=device,
                                             precision=precision)
        self.meta = self.engine.meta
        self.root = self.meta.get("root")
        self._videos: dict[int, dict] = {}
        self._by_path: dict[str, int] = {}
        self._read_at = 0.0
        self._forced_at = 0.0
        self.generation = None
        self._label_counts = None  # the last read, answered while a writer holds the file
        self.on_catalogue_change = []  # callables(set of live ids), e.g. the thumbnail cache's sweep
        self.refresh(force=True)

    def close(self) -> None:
        with self.search_lock, self.db_lock.writing():
            self.engine.close()

    # ---- DuckDB access -------------------------------------------------------------------------------------
    def read(self, fn, wait: float | None = None):
        """fn(read-only connection) under the shared lock, with a connection opened for this call only (waiting at
        most ``wait`` s, default lock_wait, for a writer: Busy after)."""
        with self.db_lock.reading():
            con = _busy_if_locked(db.connect, self.index_dir, read_only=True,
                                  wait=self.lock_wait if wait is None else wait)
            try:
                return fn(con)
            finally:
                con.close()

    def write(self, fn):
        """fn(read-write connection, labels table present) alone in this process; one short connection."""
        with self.db_lock.writing():
            con = _busy_if_locked(write_connection, self.index_dir, wait=self.lock_wait)
            try:
                return fn(con)
            finally:
                con.close()

    def search(self, query: str, top_k: int, channels: list[str] | None = None):
        """(moments as `vmr search --json` dicts, stage seconds) for one query; ``channels``: those that propose
        moments (None: all the index holds)."""
        extra = {"channels": channels} if channels else {}
        with self.search_lock, self.db_lock.reading():
            result = _busy_if_locked(self.engine.search, query, top_k=top_k, **extra)
            moments = getattr(result, "moments", result)
            timings = getattr(result, "timings", None) or dict(getattr(self.engine, "last_timings", {}))
        return moments, timings

    # ---- the catalogue -------------------------------------------------------------------------------------
    def refresh(self, force: bool = False, wait: float | None = None) -> None:
        """Re-read the video table if it is older than CATALOGUE_SECONDS (or ``force``); Busy when the file stays
        locked for ``wait`` seconds (default lock_wait)."""
        now = time.monotonic()
        if not force and now - self._read_at < CATALOGUE_SECONDS:
            return
        with self._catalogue_lock:
            if not force and time.monotonic() - self._read_at < CATALOGUE_SECONDS:
                return
            def load(con):
                return db.video_rows(con, VIDEO_COLUMNS), db.read_meta(con).get("generation")

            rows, generation = self.read(load, wait=wait)
            videos = {int(r[0]): dict(zip(VIDEO_COLUMNS, r)) for r in rows}
            changed = generation != self.generation or videos.keys() != self._videos.keys()
            self._videos, self.generation = videos, generation
            self._by_path = {v["path"]: i for i, v in videos.items()}
            self._read_at = time.monotonic()
        if changed:
            live = {i for i, v in videos.items() if v["status"] == "indexed"}
            for callback in self.on_catalogue_change:
                callback(live)

    def _refresh_or_keep(self) -> None:
        """refresh(), but while another process holds the file past STATUS_WAIT_SECONDS the catalogue read last
        answers (files and thumbnails need nothing newer)."""
        try:
            self.refresh(wait=STATUS_WAIT_SECONDS)
        except Busy:
            pass

    def videos(self) -> list[dict]:
        self._refresh_or_keep()
        return list(self._videos.values())

    def video(self, video_id: int) -> dict:
        """The catalogue row of an indexed video; VmrError when there is none (re-reads once for a new id)."""
        self._refresh_or_keep()
        row = self._videos.get(int(video_id))
        if row is None and time.monotonic() - self._forced_at > UNKNOWN_ID_REFRESH_SECONDS:
            self._forced_at = time.monotonic()
            self.refresh(force=True)
            row = self._videos.get(int(video_id))
        if row is None or row["status"] != "indexed":
            raise VmrError(f"no indexed video with id {video_id}")
        return row

    def video_id_of(self, path: str) -> int | None:
        return self._by_path.get(path)

    def ingest_progress(self) -> dict:
        """The video table's counts and whether an ingest runs: {running, writer_active, done, total, indexed,
        failed, pending, note}. ``running``: some `vmr index` holds the index's ingest lock (store/lock.py); new
        files wait as 'pending' until indexed or failed, so done/total is its progress. ``writer_active``: a
        process holds the DuckDB file for writing right now (if for over STATUS_WAIT_SECONDS, the counts are the
        last ones read: status answers at once however long an ingest's batch takes). ``note``: `vmr status`'s
        line when videos are pending (an ingest running, or one stopped early that a re-run finishes), else None."""
        try:
            self.refresh(force=True, wait=STATUS_WAIT_SECONDS)
            self.read(lambda con: None, wait=0.0)
            writer_active = False
        except Busy:
            writer_active = True
        counts = {"indexed": 0, "failed": 0, "pending": 0}
        for v in self._videos.values():
            counts[v["status"]] = counts.get(v["status"], 0) + 1
        total = sum(counts.values())
        running = ingest_running(self.index_dir)
        note = incomplete_note({**counts, "videos": total, "ingest_running": running})
        return {"running": running, "writer_active": writer_active, "done": counts["indexed"] + counts["failed"],
                "total": total, **counts, "note": note}

    def label_counts(self) -> dict:
        """{"total", "accept", "reject"} (store/labels.py); the last read while a writer holds the file."""
        try:
            self._label_counts = self.read(count_labels, wait=STATUS_WAIT_SECONDS)
        except Busy:
            if self._label_counts is None:
                raise
        return self._label_counts


def _busy_if_locked(fn, *args, **kwargs):
    """fn(...), with store.db.connect's 'stays locked by another vmr process' turned into Busy."""
    try:
        return fn(*args, **kwargs)
    except VmrError as err:
        if "stays locked" in str(err):
            raise Busy(str(err)) from None
        raise
