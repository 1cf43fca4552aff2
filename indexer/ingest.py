"""`vmr index`: folder -> frames (Ray decode tasks) -> CLIP (Ray actors) -> pseudo-events -> DuckDB + FAISS.

The driver plans and writes (this module); Ray does the heavy work (indexer.pipeline):
  1. plan: discover files; compare size+mtime (then content hash, in the task) with the index: new, changed,
     unchanged, gone. New files get their ids up front (sorted by path) as 'pending' rows, so ids do not depend on
     timing and a crashed run resumes them. Gone files and files that cannot be read are settled at once.
  2. the pipeline decodes and embeds the rest (see indexer.pipeline).
  3. commit: the driver assembles a video's clip embeddings, computes its pseudo-events, and commits the video in
     ONE DuckDB transaction, then updates the in-memory FAISS indexes (saved every FAISS_SAVE_SECONDS and at the
     end).
The index records its clip length (meta ``clip_seconds``): clips and events are stored on that grid.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from indexer.discover import Candidate, discover
from indexer.pipeline import Pipeline, Video
from indexer.workers import ClipChoice
from model.spans import CLIP_SECONDS, clip_bounds, clip_to_seconds
from store.errors import VmrError
from store.library import Library


@dataclass
class IngestSummary:
    index_dir: str
    indexed: int = 0
    unchanged: int = 0
    removed: int = 0
    new_failures: int = 0
    failed: list = field(default_factory=list)  # [{"path", "error"}] of every failed file in the index
    clips: int = 0
    seconds: float = 0.0
    nodes: dict = field(default_factory=dict)  # Ray node id -> decode tasks run there
    message: str = ""

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        if self.message:
            return self.message
        lines = [f"indexed {self.indexed}, unchanged {self.unchanged}, failed {len(self.failed)}, removed "
                 f"{self.removed} ({self.clips} clips in {self.seconds:.1f} s, {self.clips_per_second:.1f} clips/s) "
                 f"-> {self.index_dir}"]
        if self.failed:
            lines.append("failed files:")
            lines += [f"  {f['path']}: {f['error']}" for f in self.failed]
        return "\n".join(lines)


@dataclass
class Plan:
    """What one run does with each file: ``work`` (to decode and embed), ``gone`` (rows of vanished files),
    ``unreadable`` (files that failed before decoding); ``states``: the index's rows before the run, by path;
    ``ids``: path -> video id (new files included)."""
    work: list[Candidate]
    gone: list[dict]
    unreadable: list[Candidate]
    states: dict
    ids: dict
    unchanged: int


def plan_run(lib: Library, root: str, index_dir: str) -> Plan:
    """Discover the files under ``root`` and decide what to (re)index; new files get their ids now."""
    candidates = discover(root, exclude=[index_dir])
    states = lib.file_states()
    seen = {c.path for c in candidates}
    work, unreadable, unchanged = [], [], 0
    for cand in candidates:
        old = states.get(cand.path)
        if old and old["status"] in ("indexed", "failed") and old["size"] == cand.size and old["mtime"] == cand.mtime:
            unchanged += 1
        elif cand.error:
            unreadable.append(cand)
        else:
            work.append(cand)
    new_ids = lib.add_pending([(c.path, c.size, c.mtime) for c in candidates if c.path not in states])
    ids = {**{p: s["id"] for p, s in states.items()}, **new_ids}
    gone = [s for p, s in states.items() if p not in seen]
    return Plan(work, gone, unreadable, states, ids, unchanged)


def run_ingest(video_dir, index_dir, clip_model: str = "ViT-B-32", clip_pretrained: str | None = "openai",
               device: str = "auto", ray_address: str | None = None, workers: int | None = None,
               rebuild_faiss: bool = False, allow_random: bool = False, progress: bool = True) -> IngestSummary:
    """Index every video under ``video_dir`` into ``index_dir`` (incremental). See the module docstring."""
    from model.features import model_embed_dim, resolve_weights

    start_time = time.monotonic()
    root = os.path.abspath(os.fspath(video_dir))
    index_dir = os.path.abspath(os.fspath(index_dir))
    if not os.path.isdir(root):
        raise VmrError(f"not a folder: {video_dir}")
    if rebuild_faiss:
        return _rebuild_faiss(index_dir)
    summary = IngestSummary(index_dir)
    clip = ClipChoice(clip_model, clip_pretrained, device, allow_random)
    _, model_id, _, _ = resolve_weights(clip_model, clip_pretrained, allow_random)  # fail fast (offline, typo)
    embed_dim = model_embed_dim(clip_model)
    lib = Library(index_dir, read_only=False)
    meta = lib.prepare(model_id, embed_dim, root, clip_seconds=CLIP_SECONDS, clip_source=clip.source())

    plan = plan_run(lib, root, index_dir)
    summary.unchanged = plan.unchanged
    writer = Writer(lib, lib.open_faiss(), summary, float(meta["clip_seconds"]))
    writer.settle(plan)
    if plan.work:
        pipeline = Pipeline(clip, writer, ray_address, workers, progress)
        try:
            pipeline.run([Video(c, plan.ids[c.path], plan.states.get(c.path)) for c in plan.work], model_id)
        finally:
            summary.nodes = pipeline.nodes
    writer.save()
    summary.failed = [{"path": v["path"], "error": v["error"]} for v in lib.videos(status="failed")]
    lib.close()
    summary.seconds = time.monotonic() - start_time
    return summary


def _rebuild_faiss(index_dir: str) -> IngestSummary:
    """`vmr index --rebuild-faiss`: the FAISS files again from the DuckDB vectors."""
    if not os.path.isfile(os.path.join(index_dir, "library.duckdb")):
        raise VmrError(f"no vmr index at {index_dir} to rebuild")
    with Library(index_dir, read_only=False) as lib:
        if not lib.meta().get("clip_model"):
            raise VmrError(f"no vmr index at {index_dir} to rebuild")
        lib.save_faiss(lib.open_faiss(force_rebuild=True))
        state = lib.meta()["faiss"]
    return IngestSummary(index_dir, message=f"rebuilt FAISS from DuckDB: {state.get('n_clips', 0)} clips "
                                            f"({state.get('clips_type')}), {state.get('n_events', 0)} events -> "
                                            f"{index_dir}")


class Writer:
    """The driver's writes: DuckDB rows (one transaction per video, in short sessions) and the FAISS files."""

    def __init__(self, lib: Library, faiss_files, summary: IngestSummary, clip_seconds: float):
        self.lib, self.faiss, self.summary = lib, faiss_files, summary
        self.clip_seconds = clip_seconds

    def settle(self, plan: Plan) -> None:
        """Remove the rows of vanished files; record the files that failed before decoding."""
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
            return sum(self._commit_one(video) for video in videos)

    def _commit_one(self, video: Video) -> int:
        from model.pseudo_events import pseudo_event_clip_spans
        import torch

        first = video.infos[0]
        old = video.old or {}
        old_counts = (old.get("n_clips") or 0, old.get("n_events") or 0)
        stat = {"size": video.cand.size, "mtime": video.cand.mtime, "content_hash": first.get("content_hash")}
        error = next((i["error"] for i in video.infos.values() if i.get("error")), None)
        if first.get("unchanged"):
            self.lib.touch(video.video_id, video.cand.size, video.cand.mtime)
            self.summary.unchanged += 1
            return 0
        if error is None:
            vectors = np.concatenate([video.vectors[s] for s in sorted(video.vectors)])
            if video.total_clips is None or len(vectors) < video.total_clips:
                error = f"decoding stopped early ({len(vectors)} of {video.total_clips} clips)"
        if error is not None:
            self.lib.commit_failed(video.video_id, stat, error)
            self.faiss.remove(video.video_id, old_counts)
            self.summary.new_failures += 1
            return 0
        vectors = vectors[: video.total_clips]
        duration = float(video.end_time)
        clip_spans = clip_bounds(len(vectors), self.clip_seconds, duration)
        spans = pseudo_event_clip_spans(torch.from_numpy(vectors))
        event_spans, event_clips, event_vectors = _events(spans, vectors, duration, self.clip_seconds)
        stat.update(duration=duration, fps=first.get("fps"), width=first.get("width"), height=first.get("height"))
        self.lib.commit_video(video.video_id, stat, clip_spans, vectors, event_spans, event_clips, event_vectors)
        self.faiss.replace(video.video_id, old_counts, vectors, event_vectors)
        self.summary.indexed += 1
        self.summary.clips += len(vectors)
        video.vectors.clear()
        return len(vectors)


def _events(spans: list[tuple[int, int]], vectors: np.ndarray, duration: float, clip_seconds: float):
    """Pseudo-event clip spans -> (seconds [E, 2], clips [E, 2] first..last inclusive, embeddings [E, D]).

    Event i covers clips b_i .. b_{i+1}-1 (the last one through the final clip, and ends at the video's end);
    its embedding is the normalised mean of its clips.
    """
    n = len(vectors)
    seconds, clips, embs = [], [], []
    for i, (a, b) in enumerate(spans):
        last = i == len(spans) - 1
        end_clip = n - 1 if last else max(a, b - 1)
        seconds.append((clip_to_seconds(a, clip_seconds), duration if last else clip_to_seconds(b, clip_seconds)))
        clips.append((a, end_clip))
        mean = vectors[a: end_clip + 1].mean(axis=0)
        embs.append(mean / max(np.linalg.norm(mean), 1e-12))
    return (np.asarray(seconds, np.float64), np.asarray(clips, np.int64),
            np.asarray(embs, np.float32).reshape(len(spans), vectors.shape[1]))
