"""`vmr index`: folder -> frames (Ray decode tasks) -> CLIP (Ray actors) -> pseudo-events -> DuckDB + FAISS.

The driver plans and writes (this module); Ray does the heavy work (indexer.pipeline):
  1. plan: discover files; compare size+mtime (then content hash, in the task) with the index: new, changed,
     unchanged, gone. New files get their ids up front (sorted by path) as 'pending' rows, so ids do not depend on
     timing and a crashed run resumes them. Gone files and files that cannot be read are settled at once.
  2. the pipeline decodes and embeds the rest (see indexer.pipeline).
  3. commit: the driver assembles a video's clip embeddings, computes its pseudo-events, and commits the video in
     ONE DuckDB transaction, then updates the in-memory FAISS indexes (saved every FAISS_SAVE_SECONDS and at the
     end).
Clips and events are stored on the 2-s grid (model.spans.CLIP_SECONDS), recorded as meta ``clip_seconds``;
Library.prepare refuses an index that records another length.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import numpy as np

from indexer.discover import Candidate, discover
from indexer.pipeline import Pipeline, Video
from indexer.rows import video_rows
from indexer.speech import resolve_whisper, run_channel
from indexer.stop_signals import recording_stop_signals
from indexer.workers import CLIPChoice
from model.errors import ModelError
from model.spans import CLIP_SECONDS
from store import db, vectors
from store.clip_source import CLIPSource
from store.errors import VmrError
from store.library import Library
from store.lock import ingest_lock, lock_path
from store.status import library_status


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
    speech: dict | None = None  # the speech step's {videos, audio_s, seconds, states} (indexer.speech)

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        if self.message:
            return self.message
        lines = [f"indexed {self.indexed}, unchanged {self.unchanged}, failed {len(self.failed)}, removed "
                 f"{self.removed} ({self.clips} clips in {self.seconds:.1f} s, {self.clips_per_second:.1f} clips/s) "
                 f"-> {self.index_dir}"]
        if self.speech is not None:
            states = ", ".join(f"{n} {state}" for state, n in sorted(self.speech["states"].items())) or "nothing new"
            lines.append(f"speech: {self.speech['videos']} videos transcribed ({states}; "
                         f"{self.speech['audio_s']:.0f} s of audio in {self.speech['seconds']:.1f} s)")
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


DEFAULT_CLIP = ("ViT-B-32", "openai")  # open_clip model and weights of a new index when none are given
CHANNELS = ("visual", "speech")
# Speech is opt-in: on 2 CPU cores Whisper tiny.en takes ~3.1 s per video-minute, about ViT-B-32's ~2.7 s again
# (bench/results/speech.md), and needs the speech extra; a library of talks adds it incrementally.
DEFAULT_CHANNELS = ("visual",)
INDEX_FILES = (db.DB_FILE, db.DB_FILE + ".wal", vectors.STATE_FILE, *(f"{table}.faiss" for table in vectors.TABLES))


def run_ingest(video_dir, index_dir, clip_model: str | None = None, clip_pretrained: str | None = None,
               device: str = "auto", ray_address: str | None = None, workers: int | None = None,
               rebuild_faiss: bool = False, allow_random: bool = False, progress: bool = True,
               reranker: str | None = None, channels=DEFAULT_CHANNELS, speech_model: str | None = None,
               speech_language: str | None = None) -> IngestSummary:
    """Index every video under ``video_dir`` into ``index_dir`` (incremental). See the module docstring.

    clip_model/clip_pretrained: None = the CLIP the index records (a re-index), else DEFAULT_CLIP.
    reranker: an LLMEPET checkpoint recorded in the index (meta ``reranker``): search and serve use it when given
    no --checkpoint. channels: CHANNELS to index ("visual" always; "speech": indexer.speech, with ``speech_model``
    (None: the packaged Whisper) and ``speech_language`` (None: detected)). A run that fails before storing any video leaves no index behind; one stopped later (Ctrl-C,
    SIGTERM) keeps what it stored and the next run resumes the rest.
    """
    root = os.path.abspath(os.fspath(video_dir))
    index_dir = os.path.abspath(os.fspath(index_dir))
    if not os.path.isdir(root):
        raise VmrError(f"not a folder: {video_dir}")
    if os.path.exists(index_dir) and not os.path.isdir(index_dir):
        raise VmrError(f"--index {index_dir} is a file: give a folder for the index (created if missing)")
    if rebuild_faiss:
        return _rebuild_faiss(index_dir)
    channels = tuple(channels)
    unknown = [c for c in channels if c not in CHANNELS]
    if unknown or "visual" not in channels:
        raise VmrError(f"--channels {','.join(channels)}: give visual (the clip grid every channel is placed on) "
                       f"and any of {', '.join(CHANNELS[1:])}, comma-separated")
    speech = resolve_whisper(speech_model, speech_language, device) if "speech" in channels else None
    existed = {name for name in INDEX_FILES if os.path.exists(os.path.join(index_dir, name))}
    made_folder = not os.path.isdir(index_dir)
    summary = IngestSummary(index_dir)
    with ingest_lock(index_dir):
        try:
            with recording_stop_signals() as stops:
                _ingest(root, index_dir, summary, stops, clip_model, clip_pretrained, device, ray_address,
                        workers, allow_random, progress, reranker, speech)
        except (Exception, KeyboardInterrupt) as err:
            if db.DB_FILE not in existed and summary.indexed == 0:
                _remove_new_index(index_dir, existed, made_folder)  # nothing was stored: leave no half index
            if isinstance(err, KeyboardInterrupt):
                raise VmrError(f"interrupted: {_progress_line(index_dir)}; re-run `vmr index {video_dir} --index "
                               f"{index_dir}` to finish") from None
            raise
    return summary


def _progress_line(index_dir: str) -> str:
    """'N of M videos indexed (K not yet)' of an index after a stopped run."""
    try:
        info = library_status(index_dir)
    except VmrError:
        return "no video indexed"
    return f"{info['indexed']} of {info['videos']} videos indexed ({info['pending']} not yet)"


def _ingest(root, index_dir, summary, stops, clip_model, clip_pretrained, device, ray_address, workers, allow_random,
            progress, reranker, speech) -> None:
    # lazy: torch (open_clip), loaded once the run starts, not to refuse a bad argument
    from model.inference.features import model_embed_dim, resolve_weights

    start_time = time.monotonic()
    recorded = _recorded_meta(index_dir)
    if not recorded and not discover(root, exclude=[index_dir]):
        raise VmrError(f"no video files under {root} (looked for video extensions such as .mp4/.mkv/.webm and "
                       "video signatures): point vmr index at the folder that holds the videos")
    clip = choose_clip(CLIPSource.recorded(recorded), clip_model, clip_pretrained, device, allow_random)
    try:
        _, model_id, _, _ = resolve_weights(clip.model, clip.pretrained, clip.allow_random)  # fail fast
        embed_dim = model_embed_dim(clip.model)
        reranker = _check_reranker(reranker, model_id) if reranker else None
    except ModelError as err:
        raise VmrError(str(err)) from None
    lib = Library(index_dir, read_only=False)
    try:
        meta = lib.prepare(model_id, embed_dim, root, clip_seconds=CLIP_SECONDS, clip_source=clip.source())
        if reranker:
            with lib.session() as con:
                db.write_meta(con, {"reranker": reranker})
        plan = plan_run(lib, root, index_dir)
        stops.check()
        summary.unchanged = plan.unchanged
        writer = Writer(lib, lib.open_faiss(), summary, float(meta["clip_seconds"]))
        writer.settle(plan)
        stops.check()
        if plan.work:
            pipeline = Pipeline(clip, writer, stops, ray_address, workers, progress)
            try:
                pipeline.run([Video(c, plan.ids[c.path], plan.states.get(c.path)) for c in plan.work], model_id)
            finally:
                summary.nodes = pipeline.nodes
        writer.save()
        summary.speech = run_channel(lib, root, speech, stops, ray_address, progress)
        stops.check()  # a signal during the last commits or the save: still a stop (exit 1), work kept
        summary.failed = [{"path": v["path"], "error": v["error"]} for v in lib.videos(status="failed")]
    finally:
        lib.close()
    summary.seconds = time.monotonic() - start_time


def choose_clip(recorded: CLIPSource, clip_model: str | None, clip_pretrained: str | None, device: str,
                allow_random: bool) -> CLIPChoice:
    """The CLIP of a run: what was given; what is not given comes from the index's record (meta ``clip_source``,
    so a re-index needs no CLIP options), else from DEFAULT_CLIP. Random weights only where allowed (tests) or
    where the index itself was built with them."""
    model = clip_model or recorded.model or DEFAULT_CLIP[0]
    same_model = recorded.model and CLIPSource.of(model, None, recorded.precision).model == recorded.model
    # the index's embeddings share one precision: a re-index keeps the recorded one, a new index gets the fastest
    # accurate one of this device (model.inference.precision.clip_precision)
    precision = recorded.precision if recorded.model else _clip_precision(device)
    if clip_pretrained is None and not allow_random:
        if same_model:
            return CLIPChoice(model, recorded.pretrained, device, not recorded.pretrained, precision)
        clip_pretrained = DEFAULT_CLIP[1]
    return CLIPChoice(model, clip_pretrained, device, allow_random, precision)


def _clip_precision(device: str) -> str:
    from model.inference.features import resolve_device  # lazy: torch, loaded once the run starts
    from model.inference.precision import clip_precision, detect_hardware  # lazy: torch, loaded once the run starts

    return clip_precision("auto", detect_hardware(resolve_device(device)))


def _recorded_meta(index_dir: str) -> dict:
    """The meta of an existing index ({} when there is none yet)."""
    if not os.path.isfile(db.db_path(index_dir)):
        return {}
    try:
        with Library(index_dir, read_only=True) as lib:
            return lib.meta()
    except VmrError as err:
        if "no meta" in str(err):  # an index whose first run stopped before writing its schema
            return {}
        raise


def _check_reranker(path: str, model_id: str) -> str:
    """An LLMEPET checkpoint usable on this index's features; returns its absolute path."""
    from model.inference.checkpoint import read_checkpoint  # lazy: torch, loaded once the run starts

    ckpt = read_checkpoint(path)
    trained_on = (ckpt.get("feature_spec") or {}).get("clip_model")
    if trained_on and trained_on != model_id:
        raise VmrError(f"reranker {path} was trained on {trained_on} features, this index holds {model_id}: give a "
                       "checkpoint trained on this index (`vmr train --index`)")
    return os.path.abspath(path)


def _remove_new_index(index_dir: str, existed: set, made_folder: bool) -> None:
    for path in [os.path.join(index_dir, name) for name in set(INDEX_FILES) - existed] + [lock_path(index_dir)]:
        with contextlib.suppress(OSError):
            os.remove(path)
    if made_folder:
        with contextlib.suppress(OSError):
            os.rmdir(index_dir)


def _rebuild_faiss(index_dir: str) -> IngestSummary:
    """`vmr index --rebuild-faiss`: the FAISS files again from the DuckDB vectors."""
    if not os.path.isfile(db.db_path(index_dir)):
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
        clip_spans, event_spans, event_clips, event_vectors = video_rows(vectors, duration, self.clip_seconds)
        stat.update(duration=duration, fps=first.get("fps"), width=first.get("width"), height=first.get("height"))
        self.lib.commit_video(video.video_id, stat, clip_spans, vectors, event_spans, event_clips, event_vectors)
        self.faiss.replace(video.video_id, old_counts, vectors, event_vectors)
        self.summary.indexed += 1
        self.summary.clips += len(vectors)
        video.vectors.clear()
        return len(vectors)

