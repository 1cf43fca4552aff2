"""The driver's writes during an ingest: a finished video's rows and every kind computed for it, and the FAISS files.

A video decoded with its CLIP gets its clips, events and other kinds in ONE DuckDB transaction
(Library.commit_video); a video that only gained a kind gets just that kind (Library.commit_features). Either way a
kill between two videos leaves each video whole, with or without the new kind, and the next run completes it.
"""
from __future__ import annotations

import numpy as np

from indexer.pipeline import Video
from indexer.rows import video_rows
from store.kinds import CLIP_KIND, SLOWFAST_DIM, SLOWFAST_KIND
from store.library import Library


class Writer:
    """The driver's writes: DuckDB rows (one transaction per video, in short sessions) and the FAISS files.

    summary: the run's IngestSummary (counts are added to it); records: kind -> the record its vectors are stored
    under (store.kinds; None for a kind this run does not compute).
    """

    def __init__(self, lib: Library, faiss_files, summary, clip_seconds: float, records: dict | None = None):
        self.lib, self.faiss, self.summary = lib, faiss_files, summary
        self.clip_seconds = clip_seconds
        self.records = records or {}

    def settle(self, plan) -> None:
        """Remove the rows of vanished files; record the files that failed before decoding (``plan``:
        indexer.ingest.Plan)."""
        with self.lib.session():
            if plan.gone:
                self.lib.delete_videos([s["id"] for s in plan.gone])
                for s in plan.gone:
                    self.faiss.remove(s["id"], (s["n_clips"] or 0, s["n_events"] or 0))
                self.summary.removed = len(plan.gone)
            for cand in plan.unreadable:
                old = plan.states.get(cand.path)
                self.lib.commit_failed(plan.ids[cand.path], {"size": cand.size, "mtime": cand.mtime}, cand.error)
                if old:
                    self.faiss.remove(old["id"], (old["n_clips"] or 0, old["n_events"] or 0))
                self.summary.new_failures += 1

    def save(self) -> None:
        self.lib.save_faiss(self.faiss)

    def commit(self, videos: list[Video]) -> int:
        """Write finished videos (one transaction each) in one short DuckDB session; then update FAISS. Returns
        the clips stored."""
        with self.lib.session():
            return sum(self._commit_one(video) if CLIP_KIND in video.kinds else self._commit_kinds(video)
                       for video in videos)

    def _commit_one(self, video: Video) -> int:
        first = video.infos[0]
        old = video.old or {}
        old_counts = (old.get("n_clips") or 0, old.get("n_events") or 0)
        stat = {"size": video.cand.size, "mtime": video.cand.mtime, "content_hash": first.get("content_hash")}
        error = _decode_error(video)
        if first.get("unchanged"):
            self.lib.touch(video.video_id, video.cand.size, video.cand.mtime)
            self.summary.unchanged += 1
            return 0
        if error is None:
            vectors = np.concatenate([video.vectors[s] for s in sorted(video.vectors)])
            if video.total_clips is None or len(vectors) < video.total_clips:
                error = f"decoding stopped early ({len(vectors)} of {video.total_clips} clips)"
        others = {}
        if error is None and SLOWFAST_KIND in video.kinds:
            others[SLOWFAST_KIND] = (slowfast_vectors(video), self.records[SLOWFAST_KIND])
            if others[SLOWFAST_KIND][0] is None:
                error = f"decoding stopped early (SlowFast: {_slowfast_count(video)} of {video.sf_total} clips)"
        if error is not None:
            self.lib.commit_failed(video.video_id, stat, error)
            self.faiss.remove(video.video_id, old_counts)
            self.summary.new_failures += 1
            return 0
        vectors = vectors[: video.total_clips]
        duration = float(video.end_time)
        clip_spans, event_spans, event_clips, event_vectors = video_rows(vectors, duration, self.clip_seconds)
        stat.update(duration=duration, fps=first.get("fps"), width=first.get("width"), height=first.get("height"))
        self.lib.commit_video(video.video_id, stat, clip_spans, vectors, event_spans, event_clips, event_vectors,
                              others)
        self.faiss.replace(video.video_id, old_counts, vectors, event_vectors)
        self.summary.indexed += 1
        self.summary.clips += len(vectors)
        video.vectors.clear()
        video.sf_vectors.clear()
        return len(vectors)

    def _commit_kinds(self, video: Video) -> int:
        """An indexed video that gained kinds (its CLIP rows stay as they are); a failure leaves it as it was."""
        error = _decode_error(video)
        vectors = slowfast_vectors(video) if error is None else None
        if error is None and vectors is None:
            error = f"decoding stopped early ({_slowfast_count(video)} of {video.sf_total} clips)"
        if error is not None:
            self.summary.feature_failures.append({"path": video.cand.path, "kind": SLOWFAST_KIND, "error": error})
            return 0
        self.lib.commit_features(video.video_id, SLOWFAST_KIND, vectors, self.records[SLOWFAST_KIND])
        self.summary.added[SLOWFAST_KIND] = self.summary.added.get(SLOWFAST_KIND, 0) + 1
        self.summary.clips += len(vectors)
        video.sf_vectors.clear()
        return len(vectors)


def _decode_error(video: Video) -> str | None:
    return next((i["error"] for i in video.infos.values() if i.get("error")), None)


def _slowfast_count(video: Video) -> int:
    return sum(len(v) for v in video.sf_vectors.values())


def slowfast_vectors(video: Video) -> np.ndarray | None:
    """f32 [sf_total, 2304]: the segments' SlowFast vectors in clip order (a segment that reached the end may
    repeat the padded clips of the one before: the same vectors); None when a clip is missing."""
    if video.sf_total is None:
        return None
    out = np.zeros((video.sf_total, SLOWFAST_DIM), np.float32)
    filled = np.zeros(video.sf_total, bool)
    for first, vectors in video.sf_vectors.items():
        n = max(0, min(len(vectors), video.sf_total - first))
        out[first: first + n], filled[first: first + n] = vectors[:n], True
    return out if filled.all() else None
