"""The Ray part of an ingest run: decode tasks -> CLIP actors -> finished videos handed back to the driver.

    decode tasks (one per <=SEGMENT_CLIPS clips of a video, SPREAD over the nodes) return resized uint8 frames;
    the frames go by object reference straight to a CLIP actor, batched across videos (BATCH_FRAMES);
    a video whose segments are all embedded (or that failed, or is unchanged) goes to ``writer.commit`` at most
    every FLUSH_SECONDS, and ``writer.save`` runs every FAISS_SAVE_SECONDS.

In-flight work is bounded (decode tasks + frames awaiting CLIP <= 2 x workers), so memory stays flat with library
size. Ray retries tasks of a lost node (and rebuilds lost frame objects from lineage); actors restart elsewhere.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from tqdm import tqdm

from indexer.discover import Candidate
from indexer.stop_signals import StopSignals, ray_keeps_our_handlers
from indexer.workers import CLIPChoice, CLIPWorker, decode_segment
from model.spans import num_clips
from store.errors import VmrError

SEGMENT_CLIPS = 128  # clips per decode task: ~19 MB of 224x224 frames; long videos split into several tasks
BATCH_FRAMES = 64  # frames per CLIP call (across videos)
FLUSH_SECONDS = 0.5  # commit finished videos at most this often (the DuckDB file is locked only meanwhile)
FAISS_SAVE_SECONDS = 30.0
ACTOR_QUEUE = 2  # CLIP calls in flight per actor
# CLIP actors kept between runs of one process when the CALLER owns the Ray session (tests, notebooks, long-lived
# services): loading a model into a fresh worker costs seconds. Key: (Ray job, CLIP choice, actors).
ACTOR_CACHE: dict = {}


@dataclass
class Video:
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


@dataclass
class ClusterShape:
    """How the cluster is used: CLIP actors (count, Ray options, the CLIP they load, torch threads) and the CPUs a
    decode task reserves."""
    n_actors: int
    actor_options: dict
    clip: CLIPChoice  # with the actors' device
    threads: int | None
    decode_cpus: float


def cluster_shape(clip: CLIPChoice, cpus: int, gpus: int) -> ClusterShape:
    """CLIP actors and decode task size for a cluster of ``cpus`` CPUs and ``gpus`` GPUs."""
    if clip.device != "cpu" and gpus > 0:
        # decoding feeds the GPUs: as many decode tasks as the cores allow
        return ClusterShape(gpus, {"num_gpus": 1, "num_cpus": 1}, dataclasses.replace(clip, device="cuda"), None, 0.5)
    if clip.device == "cuda":
        raise VmrError("--device cuda asked for, but the Ray cluster has no GPU")
    # One CPU actor per 8 CPUs, reserving half a CPU: its torch threads use the cores the decode tasks leave. Its
    # thread count is explicit: Ray sets OMP_NUM_THREADS=1 in a fractional-CPU actor, which kept CLIP on one core.
    # Decoding is ~10% of the CPU encoder's work, so a decode task reserves a whole CPU (where there are two; a
    # 1-CPU cluster still runs both at half): fewer decode worker processes, each of which pays the torch/open_clip
    # imports (~5 s CPU) when it starts. Measured on 2 cores, 480 clips, ViT-B-32 (encoder alone 11.6 clips/s):
    # 5.7 clips/s with neither, 8.0 with the threads, 11.1 with both.
    n_actors = max(1, cpus // 8)
    return ClusterShape(n_actors, {"num_cpus": 0.5}, dataclasses.replace(clip, device="cpu"),
                  max(1, min(8, cpus // n_actors)), 1 if cpus >= 2 else 0.5)


class Pipeline:
    """Runs the decode -> CLIP flow of one ingest over Ray; ``writer`` stores what comes out.

    writer: ``commit(videos: list[Video]) -> clips stored`` (called with finished videos) and ``save()`` (persist
    the FAISS files now and then). ``nodes``: Ray node id -> decode tasks run there.
    """

    def __init__(self, clip: CLIPChoice, writer, stops: StopSignals, ray_address: str | None = None,
                 workers: int | None = None, progress: bool = True):
        self.clip, self.writer, self.stops = clip, writer, stops
        self.ray_address, self.workers, self.progress = ray_address, workers, progress
        self.nodes: dict = {}

    def run(self, videos: list[Video], model_id: str) -> None:
        """Decode and embed ``videos``; stops (KeyboardInterrupt) at the first safe point after a stop signal."""
        ray = self._start_ray()
        try:
            self.stops.check()
            self._start_actors(ray, model_id)
            self.stops.check()
            bar = tqdm(total=len(videos), unit="video", disable=not self.progress, file=sys.stderr,
                       dynamic_ncols=True)
            self._loop(ray, videos, bar)
        finally:
            if self.started_ray:
                ray.shutdown()  # ends our actors too

    # ---- setup -------------------------------------------------------------------------------------------------
    def _start_ray(self):
        ray, self.started_ray = start_ray(self.ray_address, self.stops)
        return ray

    def _start_actors(self, ray, model_id: str) -> None:
        resources = ray.cluster_resources()
        cpus = max(1, int(resources.get("CPU", 1)))
        shape = cluster_shape(self.clip, cpus, int(resources.get("GPU", 0)))
        key = (ray.get_runtime_context().get_job_id(), shape.clip, shape.n_actors)
        cached = None if self.started_ray else ACTOR_CACHE.get(key)
        if cached is not None:
            self.actors, described = cached
        else:
            self.actors, described = _launch_actors(ray, shape)
            if not self.started_ray:
                ACTOR_CACHE.clear()  # one model resident at a time
                ACTOR_CACHE[key] = (self.actors, described)
        if described[0]["model_id"] != model_id:
            raise VmrError(f"CLIP worker loaded {described[0]['model_id']}, expected {model_id}")
        self.preprocess_json = json.dumps(described[0]["preprocess"], sort_keys=True)
        self.decode_task = ray.remote(num_cpus=shape.decode_cpus, max_retries=5, num_returns=2,
                                      scheduling_strategy="SPREAD")(decode_segment)
        self.max_inflight = max(2, 2 * int(self.workers or cpus))

    # ---- the loop ----------------------------------------------------------------------------------------------
    def _loop(self, ray, videos: list[Video], bar) -> None:
        self.todo = collections.deque(videos)
        self.segments = collections.deque()  # (video, first_clip, stop_clip) of started videos
        self.decoding = {}  # info ref -> (video, first_clip, frames ref, args)
        self.embed_queue = collections.deque()  # (video, first_clip, frames ref, n)
        self.embedding = {}  # result ref -> (actor index, [(video, first_clip)])
        self.actor_load = [0] * len(self.actors)
        commits, last_flush, last_save = [], time.monotonic(), time.monotonic()
        clips_done, t0 = 0, time.monotonic()
        while self.todo or self.segments or self.decoding or self.embed_queue or self.embedding or commits:
            self.stops.check()
            self._submit_decodes()
            self._submit_embeds()
            refs = list(self.decoding) + list(self.embedding)
            for ref in ray.wait(refs, num_returns=1, timeout=0.2)[0] if refs else []:
                commits += self._on_decoded(ray, ref) if ref in self.decoding else self._on_embedded(ray, ref)
            now = time.monotonic()
            if commits and (now - last_flush >= FLUSH_SECONDS or
                            not (self.todo or self.segments or self.decoding or self.embedding)):
                clips_done += self.writer.commit(commits)
                bar.update(len(commits))
                bar.set_postfix(clips=clips_done, clips_per_s=f"{clips_done / max(now - t0, 1e-6):.1f}")
                commits, last_flush = [], time.monotonic()
                if now - last_save >= FAISS_SAVE_SECONDS:
                    self.writer.save()
                    last_save = time.monotonic()
        bar.close()

    def _submit(self, video: Video, first: int, stop: int | None) -> None:
        args = (video.cand.abspath, video.video_id, first, stop, self.preprocess_json,
                (video.old or {}).get("content_hash") if first == 0 else None, video.cand.size)
        info_ref, frames_ref = self.decode_task.remote(*args)
        self.decoding[info_ref] = (video, first, frames_ref, args)
        video.planned.add(first)

    def _submit_decodes(self) -> None:
        """Decode tasks up to the in-flight bound: the started videos' next segments first, then new videos."""
        while len(self.decoding) + len(self.embed_queue) < self.max_inflight and (self.segments or self.todo):
            if self.segments:
                self._submit(*self.segments.popleft())
            else:
                self._submit(self.todo.popleft(), 0, SEGMENT_CLIPS)

    def _submit_embeds(self) -> None:
        """Decoded frames to the least loaded actor, BATCH_FRAMES at a time (a smaller batch when an actor idles or
        nothing more is decoding)."""
        queued = sum(n for *_, n in self.embed_queue)
        while self.embed_queue and (queued >= BATCH_FRAMES or min(self.actor_load) == 0 or not self.decoding):
            actor = int(np.argmin(self.actor_load))
            if self.actor_load[actor] >= ACTOR_QUEUE:
                break
            batch, count = [], 0
            while self.embed_queue and count < BATCH_FRAMES:
                item = self.embed_queue.popleft()
                batch.append(item)
                count += item[3]
            queued -= count
            ref = self.actors[actor].embed.remote(*[item[2] for item in batch])
            self.embedding[ref] = (actor, [(item[0], item[1]) for item in batch])
            self.actor_load[actor] += 1

    def _on_decoded(self, ray, ref) -> list[Video]:
        """A decode task finished: queue its frames for CLIP, plan the video's other segments; returns the videos
        now finished."""
        video, first, frames_ref, args = self.decoding.pop(ref)
        info = self._get(ray, ref, video, first)
        if info is None:  # the task was lost for good: try it once more
            info_ref, frames_ref = self.decode_task.remote(*args)
            self.decoding[info_ref] = (video, first, frames_ref, args)
            return []
        self.nodes[info.get("node")] = self.nodes.get(info.get("node"), 0) + 1
        if video.queued:
            return []
        self.segments.extend(_record_segment(video, first, info))
        if info.get("error") or info.get("unchanged"):
            video.queued = True
            return [video]
        if info["n"] > 0:
            self.embed_queue.append((video, first, frames_ref, info["n"]))
        elif video.done():
            video.queued = True
            return [video]
        return []

    def _on_embedded(self, ray, ref) -> list[Video]:
        """A CLIP call finished: store its vectors; returns the videos now finished."""
        actor, items = self.embedding.pop(ref)
        self.actor_load[actor] -= 1
        finished = []
        try:
            results = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - Ray already restarted the actor and retried: give up in one line
            raise VmrError(f"CLIP worker failed: {_first_line(err)}") from None
        for (video, first), vecs in zip(items, results):
            video.vectors[first] = vecs
            if not video.queued and video.done():
                video.queued = True
                finished.append(video)
        return finished

    def _get(self, ray, ref, video: Video, first: int):
        try:
            return ray.get(ref)
        except Exception as err:  # noqa: BLE001 - Ray gave up on the task (node lost too often)
            video.lost += 1
            if video.lost > 2:
                return {"video_id": video.video_id, "first_clip": first, "n": 0,
                        "error": f"decode task lost: {_first_line(err)}"}
            return None


def start_ray(ray_address: str | None, stops: StopSignals):
    """(ray, whether this call started it): joins ``ray_address``, or the caller's running Ray, or starts a local
    one, keeping our stop-signal handlers (indexer.stop_signals)."""
    import ray

    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
        # Ray announces on every start that a local cluster uses token authentication (its default): not news
        # to act on. Only that notice is dropped; a warning that authentication is OFF still shows.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            lambda record: not record.getMessage().startswith("Token authentication is enabled"))
        try:
            with ray_keeps_our_handlers(ray, stops):
                ray.init(address=ray_address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise VmrError(f"cannot start/join Ray ({ray_address or 'local'}): "
                           f"{str(err).splitlines()[0]}") from None
        started = True
    return ray, started


def _launch_actors(ray, shape: ClusterShape) -> tuple[list, list[dict]]:
    """Start (or join: named actors) the CLIP actors; returns (actors, what each loaded)."""
    actor_cls = ray.remote(max_restarts=4, max_task_retries=4, **shape.actor_options)(CLIPWorker)
    # Named actors: another ingest on the same cluster with the same model (a second `vmr index` joined with
    # --ray-address) reuses the loaded model instead of loading its own.
    clip = shape.clip
    tag = hashlib.sha1(json.dumps([clip.model, clip.pretrained, clip.device, clip.allow_random]).encode())
    actors = [actor_cls.options(name=f"vmr-clip-{tag.hexdigest()[:12]}-{i}", namespace="vmr",
                                get_if_exists=True).remote(clip, shape.threads)
              for i in range(shape.n_actors)]
    try:
        described = ray.get([a.describe.remote() for a in actors])
        error = next((d["error"] for d in described if d.get("error")), None)
    except Exception as err:  # noqa: BLE001 - the actor died (out of memory, lost node): its error's last line
        error = f"CLIP worker failed to start: {_first_line(err)}"
    if error is not None:
        for actor in actors:
            ray.kill(actor)
        raise VmrError(error)
    return actors, described


def _record_segment(video: Video, first: int, info: dict) -> list:
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


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # Ray wraps the worker's exception; its last line is usually "SomeError: message".
    for line in reversed(lines):
        if "Error" in line and ":" in line:
            return line[:300]
    return (lines[0] if lines else type(err).__name__)[:300]
