"""The Ray part of an ingest run: decode tasks -> model actors (CLIP, SlowFast) -> finished videos to the driver.

    decode tasks (one per <=SEGMENT_CLIPS clips of a video, SLOWFAST_SEGMENT_CLIPS when it computes SlowFast,
    SPREAD over the nodes) return resized uint8 frames: CLIP's one a clip, SlowFast's 32-frame windows, both from
    one decode (indexer.workers.decode_segment);
    the frames go by object reference straight to a model actor of their kind, batched across videos (a Stage each:
    BATCH_FRAMES CLIP frames, SLOWFAST_BATCH_CLIPS windows a call);
    a video whose segments are all embedded (or that failed, or is unchanged) goes to ``writer.commit`` at most
    every FLUSH_SECONDS, and ``writer.save`` runs every FAISS_SAVE_SECONDS.

In-flight work is bounded (decode tasks + frames awaiting a model <= 2 x workers, ACTOR_QUEUE calls an actor), so
memory stays flat with library size and, as long videos are cut into segments, with video length. Ray retries tasks of a lost node (and rebuilds lost frame objects from lineage); actors restart elsewhere.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field


from tqdm import tqdm

from indexer.actors import Stage, file_stamp, first_line, launch_actors
from indexer.discover import Candidate
from indexer.stop_signals import StopSignals, ray_keeps_our_handlers
from indexer.workers import CLIPChoice, CLIPWorker, SlowFastWorker, decode_segment
from model.spans import num_clips
from store.errors import VmrError

SEGMENT_CLIPS = 128  # clips per decode task: ~19 MB of 224x224 frames; long videos split into several tasks
# With SlowFast a clip is 32 frames (4.8 MB): 8 clips a task (38 MB). Each later segment re-decodes from the keyframe
# before it (half a GOP on average), cheap beside SlowFast's compute.
SLOWFAST_SEGMENT_CLIPS = 8
BATCH_FRAMES = 64  # frames per CLIP call (across videos)
SLOWFAST_BATCH_CLIPS = 8  # windows per SlowFast call (across videos; the actor runs them SLOWFAST_BATCH at a time)
FLUSH_SECONDS = 0.5  # commit finished videos at most this often (the DuckDB file is locked only meanwhile)
FAISS_SAVE_SECONDS = 30.0
# CLIP actors kept between runs of one process when the CALLER owns the Ray session (tests, notebooks, long-lived
# services): loading a model into a fresh worker costs seconds. Key: (Ray job, CLIP choice, actors).
ACTOR_CACHE: dict = {}
SLOWFAST_ACTOR_CACHE: dict = {}  # the same for the SlowFast actors


@dataclass
class Video:
    """One video in flight."""
    cand: Candidate
    video_id: int
    old: dict | None  # its row before this run (None: new)
    kinds: tuple = ("clip",)  # what to compute: "clip" (with the video's rows) and/or "slowfast"
    infos: dict = field(default_factory=dict)  # first_clip -> decode info
    vectors: dict = field(default_factory=dict)  # first_clip -> f32 [n, D]
    sf_vectors: dict = field(default_factory=dict)  # first_clip -> f32 [m, 2304] (clips first_clip ..)
    sf_total: int | None = None  # SlowFast clips of the video, once decoding reached its end
    planned: set = field(default_factory=set)  # first_clip of every segment submitted
    total_clips: int | None = None
    end_time: float | None = None
    lost: int = 0  # decode tasks Ray gave up on
    queued: bool = False  # handed to the writer (late results are ignored)

    @property
    def segment_clips(self) -> int:
        return SLOWFAST_SEGMENT_CLIPS if "slowfast" in self.kinds else SEGMENT_CLIPS

    def done(self) -> bool:
        if self.total_clips is None or set(self.infos) != self.planned:
            return False
        if "slowfast" in self.kinds and (self.sf_total is None or not all(
                first in self.sf_vectors or self.infos[first]["sf_n"] == 0 for first in self.planned)):
            return False
        return "clip" not in self.kinds or all(first in self.vectors or self.infos[first]["n"] == 0
                                               for first in self.planned)


@dataclass
class ClusterShape:
    """How the cluster is used: CLIP actors (count, Ray options, the CLIP they load, torch threads), the CPUs a
    decode task reserves, and the SlowFast actors (count, Ray options, device, torch threads; 0 without SlowFast)."""
    n_actors: int
    actor_options: dict
    clip: CLIPChoice  # with the actors' device
    threads: int | None
    decode_cpus: float
    slowfast_actors: int = 0
    slowfast_options: dict = field(default_factory=dict)
    slowfast_device: str = "cpu"
    slowfast_threads: int | None = None


def cluster_shape(clip: CLIPChoice, cpus: int, gpus: int, slowfast: bool = False) -> ClusterShape:
    """CLIP (and, with ``slowfast``, SlowFast) actors and decode task size for ``cpus`` CPUs and ``gpus`` GPUs."""
    if clip.device != "cpu" and gpus > 0:
        # decoding feeds the GPUs: as many decode tasks as the cores allow; SlowFast shares each GPU with CLIP
        share = 0.5 if slowfast else 1
        return ClusterShape(gpus, {"num_gpus": share, "num_cpus": 1}, dataclasses.replace(clip, device="cuda"), None,
                            0.5, gpus if slowfast else 0, {"num_gpus": share, "num_cpus": 1}, "cuda", None)
    if clip.device == "cuda":
        raise VmrError("--device cuda asked for, but the Ray cluster has no GPU")
    # One CPU actor per 8 CPUs, reserving half a CPU: its torch threads use the cores the decode tasks leave. Its
    # thread count is explicit: Ray sets OMP_NUM_THREADS=1 in a fractional-CPU actor, which kept CLIP on one core.
    # Decoding is ~10% of the CPU encoder's work, so a decode task reserves a whole CPU (where there are two; a
    # 1-CPU cluster still runs both at half): fewer decode worker processes, each of which pays the torch/open_clip
    # imports (~5 s CPU) when it starts. Measured on 2 cores, 480 clips, ViT-B-32 (encoder alone 11.6 clips/s):
    # 5.7 clips/s with neither, 8.0 with the threads, 11.1 with both. SlowFast (~50 GMAC a clip, ~20x CLIP's) gets
    # the same: half a CPU and every core's threads, since it is then the run's bottleneck.
    n_actors = max(1, cpus // 8)
    threads = max(1, min(8, cpus // n_actors))
    return ClusterShape(n_actors, {"num_cpus": 0.5}, dataclasses.replace(clip, device="cpu"), threads,
                        1 if cpus >= 2 else 0.5, n_actors if slowfast else 0, {"num_cpus": 0.5}, "cpu", threads)


class Pipeline:
    """Runs the decode -> model flow of one ingest over Ray; ``writer`` stores what comes out.

    writer: ``commit(videos: list[Video]) -> clips stored`` (called with finished videos) and ``save()`` (persist
    the FAISS files now and then). slowfast_weights: the SlowFast weights file (None: no video asks for SlowFast);
    clip_len: seconds per clip. ``nodes``: Ray node id -> decode tasks run there.
    """

    def __init__(self, clip: CLIPChoice, writer, stops: StopSignals, ray_address: str | None = None,
                 workers: int | None = None, progress: bool = True, slowfast_weights: str | None = None,
                 clip_len: int = 2):
        self.clip, self.writer, self.stops = clip, writer, stops
        self.ray_address, self.workers, self.progress = ray_address, workers, progress
        self.slowfast_weights, self.clip_len = slowfast_weights, int(clip_len)
        self.nodes: dict = {}

    def run(self, videos: list[Video], model_id: str) -> None:
        """Decode and embed ``videos``; stops (KeyboardInterrupt) at the first safe point after a stop signal."""
        ray = self._start_ray()
        try:
            self.stops.check()
            self._start_actors(ray, model_id, {kind for v in videos for kind in v.kinds})
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

    def _start_actors(self, ray, model_id: str, kinds: set) -> None:
        resources = ray.cluster_resources()
        cpus = max(1, int(resources.get("CPU", 1)))
        shape = cluster_shape(self.clip, cpus, int(resources.get("GPU", 0)), slowfast="slowfast" in kinds)
        self.clip_stage = Stage("CLIP", [], BATCH_FRAMES)
        self.sf_stage = Stage("SlowFast", [], SLOWFAST_BATCH_CLIPS)
        self.preprocess_json = "{}"
        if "clip" in kinds:
            actors, described = self._actors(ray, ACTOR_CACHE, CLIPWorker, "clip", shape.n_actors,
                                             shape.actor_options, (shape.clip, shape.threads),
                                             [shape.clip.model, shape.clip.pretrained, shape.clip.device,
                                              shape.clip.allow_random])
            if described[0]["model_id"] != model_id:
                raise VmrError(f"CLIP worker loaded {described[0]['model_id']}, expected {model_id}")
            self.preprocess_json = json.dumps(described[0]["preprocess"], sort_keys=True)
            self.clip_stage = Stage("CLIP", actors, BATCH_FRAMES)
        if "slowfast" in kinds:
            actors, _ = self._actors(ray, SLOWFAST_ACTOR_CACHE, SlowFastWorker, "slowfast", shape.slowfast_actors,
                                     shape.slowfast_options,
                                     (self.slowfast_weights, shape.slowfast_device, shape.slowfast_threads),
                                     [self.slowfast_weights, shape.slowfast_device, file_stamp(self.slowfast_weights)])
            self.sf_stage = Stage("SlowFast", actors, SLOWFAST_BATCH_CLIPS)
        self.decode_task = ray.remote(num_cpus=shape.decode_cpus, max_retries=5, num_returns=3,
                                      scheduling_strategy="SPREAD")(decode_segment)
        self.max_inflight = max(2, 2 * int(self.workers or cpus))

    def _actors(self, ray, cache: dict, worker_cls, name: str, n: int, options: dict, args: tuple, tag: list):
        """Start (or reuse: see ACTOR_CACHE) ``n`` actors of ``worker_cls``; returns (actors, what each loaded)."""
        key = (ray.get_runtime_context().get_job_id(), name, n, json.dumps(tag, default=str))
        cached = None if self.started_ray else cache.get(key)
        if cached is not None:
            return cached
        launched = launch_actors(ray, worker_cls, name, n, options, args, tag)
        if not self.started_ray:
            cache.clear()  # one model of each kind resident at a time
            cache[key] = launched
        return launched

    # ---- the loop ----------------------------------------------------------------------------------------------
    def _loop(self, ray, videos: list[Video], bar) -> None:
        self.todo = collections.deque(videos)
        self.segments = collections.deque()  # (video, first_clip, stop_clip) of started videos
        self.decoding = {}  # info ref -> (video, first_clip, frames ref, windows ref, args)
        stages = (self.clip_stage, self.sf_stage)
        commits, last_flush, last_save = [], time.monotonic(), time.monotonic()
        clips_done, t0 = 0, time.monotonic()

        def busy() -> bool:
            return bool(self.todo or self.segments or self.decoding or any(st.queue or st.running for st in stages))

        while busy() or commits:
            self.stops.check()
            self._submit_decodes()
            for stage in stages:
                stage.embed(bool(self.decoding))
            refs = list(self.decoding) + [ref for st in stages for ref in st.running]
            for ref in ray.wait(refs, num_returns=1, timeout=0.2)[0] if refs else []:
                if ref in self.decoding:
                    commits += self._on_decoded(ray, ref)
                else:
                    commits += self._on_embedded(ray, ref)
            now = time.monotonic()
            if commits and (now - last_flush >= FLUSH_SECONDS or not busy()):
                clips_done += self.writer.commit(commits)
                bar.update(len(commits))
                bar.set_postfix(clips=clips_done, clips_per_s=f"{clips_done / max(now - t0, 1e-6):.1f}")
                commits, last_flush = [], time.monotonic()
                if now - last_save >= FAISS_SAVE_SECONDS:
                    self.writer.save()
                    last_save = time.monotonic()
        bar.close()

    def _submit(self, video: Video, first: int, stop: int | None) -> None:
        stored_hash = (video.old or {}).get("content_hash") if first == 0 and "clip" in video.kinds else None
        args = (video.cand.abspath, video.video_id, first, stop, self.preprocess_json, stored_hash, video.cand.size,
                video.kinds, self.clip_len)
        info_ref, frames_ref, windows_ref = self.decode_task.remote(*args)
        self.decoding[info_ref] = (video, first, frames_ref, windows_ref, args)
        video.planned.add(first)

    def _submit_decodes(self) -> None:
        """Decode tasks up to the in-flight bound: the started videos' next segments first, then new videos."""
        def in_flight() -> int:
            return len(self.decoding) + len(self.clip_stage.queue) + len(self.sf_stage.queue)

        while in_flight() < self.max_inflight and (self.segments or self.todo):
            if self.segments:
                self._submit(*self.segments.popleft())
            else:
                video = self.todo.popleft()
                self._submit(video, 0, video.segment_clips)

    def _on_decoded(self, ray, ref) -> list[Video]:
        """A decode task finished: queue its frames for the models, plan the video's other segments; returns the
        videos now finished."""
        video, first, frames_ref, windows_ref, args = self.decoding.pop(ref)
        info = self._get(ray, ref, video, first)
        if info is None:  # the task was lost for good: try it once more
            info_ref, frames_ref, windows_ref = self.decode_task.remote(*args)
            self.decoding[info_ref] = (video, first, frames_ref, windows_ref, args)
            return []
        self.nodes[info.get("node")] = self.nodes.get(info.get("node"), 0) + 1
        if video.queued:
            return []
        self.segments.extend(_record_segment(video, first, info))
        if info.get("error") or info.get("unchanged"):
            video.queued = True
            return [video]
        if info["n"] > 0 and "clip" in video.kinds:
            self.clip_stage.queue.append((video, first, frames_ref, info["n"]))
        if info.get("sf_n", 0) > 0:
            self.sf_stage.queue.append((video, first, windows_ref, info["sf_n"]))
        return self._finished([video])

    def _on_embedded(self, ray, ref) -> list[Video]:
        """A model call finished: store its vectors; returns the videos now finished."""
        stage = self.clip_stage if ref in self.clip_stage.running else self.sf_stage
        results = stage.done(ray, ref)
        for video, first, vecs in results:
            (video.vectors if stage is self.clip_stage else video.sf_vectors)[first] = vecs
        return self._finished([video for video, _, _ in results])

    @staticmethod
    def _finished(videos: list[Video]) -> list[Video]:
        finished = []
        for video in videos:
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
                return {"video_id": video.video_id, "first_clip": first, "n": 0, "sf_n": 0,
                        "error": f"decode task lost: {first_line(err)}"}
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


def _record_segment(video: Video, first: int, info: dict) -> list:
    """Record a segment's info; returns the follow-up segments to decode (after the first one)."""
    video.infos[first] = info
    if info.get("error") or info.get("unchanged"):
        return []
    if info.get("sf_total") is not None:
        video.sf_total = info["sf_total"] if video.sf_total is None else min(video.sf_total, info["sf_total"])
    if info.get("total_clips") is not None:
        video.total_clips = info["total_clips"] if video.total_clips is None else min(video.total_clips,
                                                                                     info["total_clips"])
        video.end_time = info["end_time"] if video.end_time is None else min(video.end_time, info["end_time"])
    if first != 0 or info.get("total_clips") is not None:
        return []
    # The first segment ended before the end: plan the rest from the container's duration estimate.
    size = video.segment_clips
    estimate = max(num_clips(info.get("est_duration") or 0.0), size + 1)
    starts = list(range(size, estimate, size))
    follow = [(video, s, starts[i + 1] if i + 1 < len(starts) else None) for i, s in enumerate(starts)]
    video.planned.update(s for _, s, _ in follow)
    return follow
