"""`vmr index`: folder -> frames (Ray decode tasks) -> CLIP (Ray actors) -> pseudo-events -> DuckDB + FAISS.

The driver plans and writes; Ray does the heavy work:
  1. discover files; compare size+mtime (then content hash, in the task) with the index: new, changed, unchanged,
     gone. New files get their ids up front (sorted by path) as 'pending' rows, so ids do not depend on timing and
     a crashed run resumes them.
  2. decode tasks (one per <=SEGMENT_CLIPS clips of a video, SPREAD over the nodes) return resized uint8 frames;
     the frames go by object reference straight to a CLIP actor, batched across videos (BATCH_FRAMES).
  3. the driver assembles a video's clip embeddings, computes its pseudo-events, and commits the video in ONE
     DuckDB transaction, then updates the in-memory FAISS indexes (saved every FAISS_SAVE_SECONDS and at the end).
In-flight work is bounded (decode tasks + frames awaiting CLIP <= 2 x workers), so memory stays flat with library
size. Ray retries tasks of a lost node (and rebuilds lost frame objects from lineage); actors restart elsewhere.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from indexer.discover import Candidate, discover
from indexer.workers import ClipWorker, decode_segment
from model.spans import CLIP_SECONDS, num_clips
from store.errors import VmrError
from store.library import Library

SEGMENT_CLIPS = 128  # clips per decode task: ~19 MB of 224x224 frames; long videos split into several tasks
BATCH_FRAMES = 64  # frames per CLIP call (across videos)
FLUSH_SECONDS = 0.5  # commit finished videos at most this often (the DuckDB file is locked only meanwhile)
FAISS_SAVE_SECONDS = 30.0
ACTOR_QUEUE = 2  # CLIP calls in flight per actor
# CLIP actors kept between run_ingest calls of one process when the CALLER owns the Ray session (tests, notebooks,
# long-lived services): loading a model into a fresh worker costs seconds. Key: (Ray job, CLIP arguments).
_ACTOR_CACHE: dict = {}


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
class _Video:
    """One video in flight."""
    cand: Candidate
    video_id: int
    old: dict | None  # its row before this run (None: new)
    infos: dict = field(default_factory=dict)  # first_clip -> decode info
    vectors: dict = field(default_factory=dict)  # first_clip -> f32 [n, D]
    planned: set = field(default_factory=set)  # first_clip of every segment submitted
    total_clips: int | None = None
    end_time: float | None = None
    lost: int = 0  # decode tasks Ray gave up on
    queued: bool = False  # handed to the writer (late results are ignored)

    def done(self) -> bool:
        if self.total_clips is None or set(self.infos) != self.planned:
            return False
        return all(first in self.vectors or self.infos[first]["n"] == 0 for first in self.planned)


def _clip_source(clip_model: str, clip_pretrained: str | None) -> dict:
    """How search reloads this CLIP: names/tags as given, local files as absolute paths."""
    def absolute(value):
        return os.path.abspath(value) if value and os.path.isfile(value) else value

    return {"model": absolute(clip_model), "pretrained": absolute(clip_pretrained) or None}


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
    summary = IngestSummary(index_dir)
    if rebuild_faiss:
        if not os.path.isfile(os.path.join(index_dir, "library.duckdb")):
            raise VmrError(f"no vmr index at {index_dir} to rebuild")
        with Library(index_dir, read_only=False) as lib:
            if not lib.meta().get("clip_model"):
                raise VmrError(f"no vmr index at {index_dir} to rebuild")
            lib.save_faiss(lib.open_faiss(force_rebuild=True))
            state = lib.meta()["faiss"]
        summary.message = (f"rebuilt FAISS from DuckDB: {state.get('n_clips', 0)} clips ({state.get('clips_type')}), "
                           f"{state.get('n_events', 0)} events -> {index_dir}")
        return summary

    _, model_id, _, _ = resolve_weights(clip_model, clip_pretrained, allow_random)  # fail fast (offline, typo)
    embed_dim = model_embed_dim(clip_model)
    lib = Library(index_dir, read_only=False)
    lib.prepare(model_id, embed_dim, root, clip_source=_clip_source(clip_model, clip_pretrained))

    candidates = discover(root, exclude=[index_dir])
    states = lib.file_states()
    seen = {c.path for c in candidates}
    gone = [s for p, s in states.items() if p not in seen]
    work, direct_failures = [], []
    for cand in candidates:
        old = states.get(cand.path)
        if old and old["status"] in ("indexed", "failed") and old["size"] == cand.size and old["mtime"] == cand.mtime:
            summary.unchanged += 1
        elif cand.error:
            direct_failures.append(cand)
        else:
            work.append(cand)
    new_ids = lib.add_pending([(c.path, c.size, c.mtime) for c in candidates if c.path not in states])
    ids = {**{p: s["id"] for p, s in states.items()}, **new_ids}

    faiss_files = lib.open_faiss()
    with lib.session():
        if gone:
            lib.delete_videos([s["id"] for s in gone])
            for s in gone:
                faiss_files.remove(s["id"], (s["n_clips"] or 0, s["n_events"] or 0))
            summary.removed = len(gone)
        for cand in direct_failures:
            old = states.get(cand.path)
            lib.commit_failed(ids[cand.path], {"size": cand.size, "mtime": cand.mtime}, cand.error)
            if old:
                faiss_files.remove(old["id"], (old["n_clips"] or 0, old["n_events"] or 0))
            summary.new_failures += 1

    if work:
        pipeline = _Pipeline(lib, faiss_files, summary, clip_model, clip_pretrained, device, allow_random,
                             ray_address, workers, progress)
        pipeline.run([_Video(c, ids[c.path], states.get(c.path)) for c in work], model_id)
    lib.save_faiss(faiss_files)
    summary.failed = [{"path": v["path"], "error": v["error"]} for v in lib.videos(status="failed")]
    lib.close()
    summary.seconds = time.monotonic() - start_time
    return summary


class _Pipeline:
    """The Ray part of one ingest run: decode tasks -> CLIP actors -> commits by the driver."""

    def __init__(self, lib, faiss_files, summary, clip_model, clip_pretrained, device, allow_random, ray_address,
                 workers, progress):
        self.lib, self.faiss, self.summary = lib, faiss_files, summary
        self.clip_args = (clip_model, clip_pretrained, device, allow_random)
        self.ray_address, self.workers, self.progress = ray_address, workers, progress

    # ---- setup -------------------------------------------------------------------------------------------------
    def _start_ray(self):
        import ray

        self.started_ray = False
        if not ray.is_initialized():
            os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
            try:
                ray.init(address=self.ray_address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise VmrError(f"cannot start/join Ray ({self.ray_address or 'local'}): "
                               f"{str(err).splitlines()[0]}") from None
            self.started_ray = True
        return ray

    def _start_actors(self, ray, model_id: str):
        clip_model, clip_pretrained, device, allow_random = self.clip_args
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = max(1, int(resources.get("CPU", 1)))
        if device != "cpu" and gpus > 0:
            n_actors, options, actor_device, threads = gpus, {"num_gpus": 1, "num_cpus": 1}, "cuda", None
            decode_cpus = 0.5  # decoding feeds the GPUs: as many decode tasks as the cores allow
        else:
            if device == "cuda":
                raise VmrError("--device cuda asked for, but the Ray cluster has no GPU")
            # One CPU actor per 8 CPUs, reserving half a CPU: its torch threads use the cores the decode tasks
            # leave. Its thread count is explicit: Ray sets OMP_NUM_THREADS=1 in a fractional-CPU actor, which kept
            # CLIP on one core. Decoding is ~10% of the CPU encoder's work, so a decode task reserves a whole CPU
            # (where there are two; a 1-CPU cluster still runs both at half): fewer decode worker processes, each
            # of which pays the torch/open_clip imports (~5 s CPU) when it starts. Measured on 2 cores, 480 clips,
            # ViT-B-32 (encoder alone 11.6 clips/s): 5.7 clips/s before, 8.0 with the threads, 11.1 with both.
            n_actors, options, actor_device = max(1, cpus // 8), {"num_cpus": 0.5}, "cpu"
            threads = max(1, min(8, cpus // n_actors))
            decode_cpus = 1 if cpus >= 2 else 0.5
        key = (ray.get_runtime_context().get_job_id(), clip_model, clip_pretrained, actor_device, allow_random,
               n_actors)
        cached = None if self.started_ray else _ACTOR_CACHE.get(key)
        if cached is not None:
            self.actors, described = cached
        else:
            actor_cls = ray.remote(max_restarts=4, max_task_retries=4, **options)(ClipWorker)
            # Named actors: another ingest on the same cluster with the same model (a second `vmr index`
            # joined with --ray-address) reuses the loaded model instead of loading its own.
            tag = hashlib.sha1(json.dumps([clip_model, clip_pretrained, actor_device, allow_random]).encode())
            self.actors = [actor_cls.options(name=f"vmr-clip-{tag.hexdigest()[:12]}-{i}", namespace="vmr",
                                             get_if_exists=True).remote(clip_model, clip_pretrained, actor_device,
                                                                        allow_random, threads)
                           for i in range(n_actors)]
            try:
                described = ray.get([a.describe.remote() for a in self.actors])
            except Exception as err:  # noqa: BLE001 - the actor's own error (e.g. a bad checkpoint) is in the text
                for actor in self.actors:
                    ray.kill(actor)
                self.actors = []
                raise VmrError(f"CLIP worker failed to start: {_first_line(err)}") from None
            if not self.started_ray:
                _ACTOR_CACHE.clear()  # one model resident at a time
                _ACTOR_CACHE[key] = (self.actors, described)
        if described[0]["model_id"] != model_id:
            raise VmrError(f"CLIP worker loaded {described[0]['model_id']}, expected {model_id}")
        self.preprocess_json = json.dumps(described[0]["preprocess"], sort_keys=True)
        self.decode_task = ray.remote(num_cpus=decode_cpus, max_retries=5, num_returns=2,
                                      scheduling_strategy="SPREAD")(decode_segment)
        workers = self.workers or cpus
        self.max_inflight = max(2, 2 * int(workers))

    # ---- the loop ----------------------------------------------------------------------------------------------
    def run(self, videos: list[_Video], model_id: str) -> None:
        from tqdm import tqdm

        ray = self._start_ray()
        try:
            self._start_actors(ray, model_id)
            self._loop(ray, videos, tqdm(total=len(videos), unit="video", disable=not self.progress,
                                         file=sys.stderr, dynamic_ncols=True))
        finally:
            if self.started_ray:
                ray.shutdown()  # ends our actors too

    def _loop(self, ray, videos, bar):
        todo = collections.deque(videos)
        segments = collections.deque()  # (video, first_clip, stop_clip) of started videos
        decoding = {}  # info ref -> (video, first_clip, frames ref, args)
        embed_queue = collections.deque()  # (video, first_clip, frames ref, n)
        embedding = {}  # result ref -> (actor index, [(video, first_clip)])
        actor_load = [0] * len(self.actors)
        commits, last_flush, last_save = [], time.monotonic(), time.monotonic()
        clips_done, t0 = 0, time.monotonic()

        def submit(video, first, stop):
            args = (video.cand.abspath, video.video_id, first, stop, self.preprocess_json,
                    (video.old or {}).get("content_hash") if first == 0 else None, video.cand.size)
            info_ref, frames_ref = self.decode_task.remote(*args)
            decoding[info_ref] = (video, first, frames_ref, args)
            video.planned.add(first)

        while todo or segments or decoding or embed_queue or embedding or commits:
            while len(decoding) + len(embed_queue) < self.max_inflight and (segments or todo):
                if segments:
                    submit(*segments.popleft())
                else:
                    video = todo.popleft()
                    submit(video, 0, SEGMENT_CLIPS)
            queued = sum(n for *_, n in embed_queue)
            while embed_queue and (queued >= BATCH_FRAMES or min(actor_load) == 0 or not decoding):
                actor = int(np.argmin(actor_load))
                if actor_load[actor] >= ACTOR_QUEUE:
                    break
                batch, count = [], 0
                while embed_queue and count < BATCH_FRAMES:
                    item = embed_queue.popleft()
                    batch.append(item)
                    count += item[3]
                queued -= count
                ref = self.actors[actor].embed.remote(*[item[2] for item in batch])
                embedding[ref] = (actor, [(item[0], item[1]) for item in batch])
                actor_load[actor] += 1
            refs = list(decoding) + list(embedding)
            ready = ray.wait(refs, num_returns=1, timeout=0.2)[0] if refs else []
            for ref in ready:
                if ref in decoding:
                    video, first, frames_ref, args = decoding.pop(ref)
                    info = self._get(ray, ref, video, first)
                    if info is None:  # the task was lost for good: try it once more
                        info_ref, frames_ref = self.decode_task.remote(*args)
                        decoding[info_ref] = (video, first, frames_ref, args)
                        continue
                    self.summary.nodes[info.get("node")] = self.summary.nodes.get(info.get("node"), 0) + 1
                    if video.queued:
                        continue
                    segments.extend(self._on_decoded(video, first, info))
                    if info.get("error") or info.get("unchanged"):
                        video.queued = True
                        commits.append(video)
                    elif info["n"] > 0:
                        embed_queue.append((video, first, frames_ref, info["n"]))
                    elif video.done():
                        video.queued = True
                        commits.append(video)
                else:
                    actor, items = embedding.pop(ref)
                    actor_load[actor] -= 1
                    vectors = ray.get(ref)
                    for (video, first), vecs in zip(items, vectors):
                        video.vectors[first] = vecs
                        if not video.queued and video.done():
                            video.queued = True
                            commits.append(video)
            now = time.monotonic()
            if commits and (now - last_flush >= FLUSH_SECONDS or not (todo or segments or decoding or embedding)):
                clips_done += self._commit(commits)
                bar.update(len(commits))
                bar.set_postfix(clips=clips_done, clips_per_s=f"{clips_done / max(now - t0, 1e-6):.1f}")
                commits, last_flush = [], time.monotonic()
                if now - last_save >= FAISS_SAVE_SECONDS:
                    self.lib.save_faiss(self.faiss)
                    last_save = time.monotonic()
        bar.close()

    def _get(self, ray, ref, video, first):
        try:
            return ray.get(ref)
        except Exception as err:  # noqa: BLE001 - Ray gave up on the task (node lost too often)
            video.lost += 1
            if video.lost > 2:
                return {"video_id": video.video_id, "first_clip": first, "n": 0,
                        "error": f"decode task lost: {_first_line(err)}"}
            return None

    def _on_decoded(self, video: _Video, first: int, info: dict) -> list:
        """Record a segment's info; returns the follow-up segments to decode (after the first one)."""
        video.infos[first] = info
        if info.get("error") or info.get("unchanged"):
            return []
        if info.get("total_clips") is not None:
            video.total_clips = info["total_clips"] if video.total_clips is None else min(video.total_clips,
                                                                                         info["total_clips"])
            video.end_time = info["end_time"] if video.end_time is None else min(video.end_time, info["end_time"])
        if first != 0 or info.get("total_clips") is not None:
            return []
        # The first segment ended before the end: plan the rest from the container's duration estimate.
        estimate = max(num_clips(info.get("est_duration") or 0.0), SEGMENT_CLIPS + 1)
        starts = list(range(SEGMENT_CLIPS, estimate, SEGMENT_CLIPS))
        follow = [(video, s, starts[i + 1] if i + 1 < len(starts) else None) for i, s in enumerate(starts)]
        video.planned.update(s for _, s, _ in follow)
        return follow

    def _commit(self, videos: list[_Video]) -> int:
        """Write finished videos (one transaction each) in one short DuckDB session; then update FAISS."""
        from model.pseudo_events import pseudo_event_clip_spans
        import torch

        clips = 0
        with self.lib.session():
            for video in videos:
                first = video.infos[0]
                old = video.old or {}
                old_counts = (old.get("n_clips") or 0, old.get("n_events") or 0)
                stat = {"size": video.cand.size, "mtime": video.cand.mtime, "content_hash": first.get("content_hash")}
                error = next((i["error"] for i in video.infos.values() if i.get("error")), None)
                if first.get("unchanged"):
                    self.lib.touch(video.video_id, video.cand.size, video.cand.mtime)
                    self.summary.unchanged += 1
                    continue
                if error is None:
                    vectors = np.concatenate([video.vectors[s] for s in sorted(video.vectors)])
                    if video.total_clips is None or len(vectors) < video.total_clips:
                        error = f"decoding stopped early ({len(vectors)} of {video.total_clips} clips)"
                if error is not None:
                    self.lib.commit_failed(video.video_id, stat, error)
                    self.faiss.remove(video.video_id, old_counts)
                    self.summary.new_failures += 1
                    continue
                vectors = vectors[: video.total_clips]
                duration = float(video.end_time)
                clip_spans = _clip_spans(len(vectors), duration)
                spans = pseudo_event_clip_spans(torch.from_numpy(vectors))
                event_spans, event_clips, event_vectors = _events(spans, vectors, duration)
                stat.update(duration=duration, fps=first.get("fps"), width=first.get("width"),
                            height=first.get("height"))
                self.lib.commit_video(video.video_id, stat, clip_spans, vectors, event_spans, event_clips,
                                      event_vectors)
                self.faiss.replace(video.video_id, old_counts, vectors, event_vectors)
                self.summary.indexed += 1
                self.summary.clips += len(vectors)
                clips += len(vectors)
                video.vectors.clear()
        return clips


def _clip_spans(n: int, duration: float) -> np.ndarray:
    """f32 [n, 2] seconds: clip i = [2i, 2i+2), the last one ends at the video's end."""
    starts = np.arange(n, dtype=np.float64) * CLIP_SECONDS
    ends = starts + CLIP_SECONDS
    ends[-1] = max(duration, starts[-1])
    return np.stack([starts, ends], axis=1)


def _events(spans: list[tuple[int, int]], vectors: np.ndarray, duration: float):
    """Pseudo-event clip spans -> (seconds [E, 2], clips [E, 2] first..last inclusive, embeddings [E, D]).

    Event i covers clips b_i .. b_{i+1}-1 (the last one through the final clip, and ends at the video's end);
    its embedding is the normalised mean of its clips.
    """
    n = len(vectors)
    seconds, clips, embs = [], [], []
    for i, (a, b) in enumerate(spans):
        last = i == len(spans) - 1
        end_clip = n - 1 if last else max(a, b - 1)
        seconds.append((a * CLIP_SECONDS, duration if last else b * CLIP_SECONDS))
        clips.append((a, end_clip))
        mean = vectors[a: end_clip + 1].mean(axis=0)
        embs.append(mean / max(np.linalg.norm(mean), 1e-12))
    return (np.asarray(seconds, np.float64), np.asarray(clips, np.int64),
            np.asarray(embs, np.float32).reshape(len(spans), vectors.shape[1]))


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # Ray wraps the worker's exception; its last line is usually "SomeError: message".
    for line in reversed(lines):
        if "Error" in line and ":" in line:
            return line[:300]
    return (lines[0] if lines else type(err).__name__)[:300]
