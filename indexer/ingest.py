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

Feature kinds (store.kinds): every run computes the kinds the index records plus those of ``features``. A new or
changed video gets all of them from one decode, committed with its rows; an indexed, unchanged video that lacks a
non-coarse kind (``slowfast`` added to a CLIP index) gets only that one (Library.commit_features).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field

from indexer.discover import Candidate, discover
from indexer.pipeline import Pipeline, Video
from indexer import ocr, speech
from indexer.stop_signals import recording_stop_signals
from indexer.text_channel import run_steps
from indexer.workers import CLIPChoice
from indexer.writer import Writer
from model.errors import ModelError, WeightsNotFound
from model.spans import CLIP_SECONDS
from store import db, kinds, vectors
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
    added: dict = field(default_factory=dict)  # kind -> indexed videos that gained it (no other kind recomputed)
    feature_failures: list = field(default_factory=list)  # [{"path", "kind", "error"}]: kept as they were
    message: str = ""
    channels: dict = field(default_factory=dict)  # text channel -> its step's {videos, seconds, states, audio_s |
    # video_s} (indexer.text_channel)

    @property
    def speech(self) -> dict | None:
        """The speech step's summary, None when speech was not asked for."""
        return self.channels.get("speech")

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        if self.message:
            return self.message
        lines = [f"indexed {self.indexed}, unchanged {self.unchanged}, failed {len(self.failed)}, removed "
                 f"{self.removed} ({self.clips} clips in {self.seconds:.1f} s, {self.clips_per_second:.1f} clips/s) "
                 f"-> {self.index_dir}"]
        lines += [f"added '{kind}' features to {n} indexed videos" for kind, n in sorted(self.added.items())]
        for channel, done in self.channels.items():
            states = ", ".join(f"{n} {state}" for state, n in sorted(done["states"].items())) or "nothing new"
            media = (f"{done['audio_s']:.0f} s of audio" if "audio_s" in done
                     else f"{done.get('video_s', 0):.0f} s of video")
            lines.append(f"{channel}: {done['videos']} videos {CHANNEL_VERBS[channel]} ({states}; {media} in "
                         f"{done['seconds']:.1f} s)")
        if self.failed:
            lines.append("failed files:")
            lines += [f"  {f['path']}: {f['error']}" for f in self.failed]
        lines += [f"  {f['path']}: no '{f['kind']}' features: {f['error']}" for f in self.feature_failures]
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
    unchanged_files: list[Candidate] = field(default_factory=list)


def plan_run(lib: Library, root: str, index_dir: str) -> Plan:
    """Discover the files under ``root`` and decide what to (re)index; new files get their ids now."""
    candidates = discover(root, exclude=[index_dir])
    states = lib.file_states()
    seen = {c.path for c in candidates}
    work, unreadable, unchanged = [], [], []
    for cand in candidates:
        old = states.get(cand.path)
        if old and old["status"] in ("indexed", "failed") and old["size"] == cand.size and old["mtime"] == cand.mtime:
            unchanged.append(cand)
        elif cand.error:
            unreadable.append(cand)
        else:
            work.append(cand)
    new_ids = lib.add_pending([(c.path, c.size, c.mtime) for c in candidates if c.path not in states])
    ids = {**{p: s["id"] for p, s in states.items()}, **new_ids}
    gone = [s for p, s in states.items() if p not in seen]
    return Plan(work, gone, unreadable, states, ids, len(unchanged), unchanged)


DEFAULT_CLIP = ("ViT-B-32", "openai")  # open_clip model and weights of a new index when none are given
CHANNELS = ("visual", "speech", "ocr")
CHANNEL_VERBS = {"speech": "transcribed", "ocr": "read"}
# Speech and ocr are opt-in: on 2 CPU cores Whisper tiny.en takes ~3.1 s per video-minute, about ViT-B-32's ~2.7 s
# again (bench/results/speech.md), RapidOCR at one frame per 2-s clip ~23 s per minute of 640x360 video, ~8x that
# (bench/results/ocr.md), and each needs its extra; a library of talks or slides adds them incrementally.
DEFAULT_CHANNELS = ("visual",)
INDEX_FILES = (db.DB_FILE, db.DB_FILE + ".wal", vectors.STATE_FILE, *(f"{table}.faiss" for table in vectors.TABLES))


def run_ingest(video_dir, index_dir, clip_model: str | None = None, clip_pretrained: str | None = None,
               device: str = "auto", ray_address: str | None = None, workers: int | None = None,
               rebuild_faiss: bool = False, allow_random: bool = False, progress: bool = True,
               reranker: str | None = None, features: list[str] | None = None,
               slowfast_weights: str | None = None, channels=DEFAULT_CHANNELS, speech_model: str | None = None,
               speech_language: str | None = None) -> IngestSummary:
    """Index every video under ``video_dir`` into ``index_dir`` (incremental). See the module docstring.

    clip_model/clip_pretrained: None = the CLIP the index records (a re-index), else DEFAULT_CLIP.
    features: kinds to compute besides the ones the index holds (store.kinds.KINDS; "clip" always);
    slowfast_weights: the SlowFast weights file (either layout, model.inference.slowfast_weights), else the one the
    index records, else the cache folder's.
    reranker: an LLMEPET checkpoint recorded in the index (meta ``reranker``): search and serve use it when given
    no --checkpoint. channels: CHANNELS to index ("visual" always; "speech": indexer.speech, with ``speech_model``
    (None: the packaged Whisper) and ``speech_language`` (None: detected); "ocr": indexer.ocr, the packaged
    RapidOCR models). A run that fails before storing any
    video leaves no index behind; one stopped later (Ctrl-C,
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
    channels = tuple(c.strip() for c in channels if c.strip())
    unknown = [c for c in channels if c not in CHANNELS]
    if unknown or "visual" not in channels:
        raise VmrError(f"--channels {','.join(channels)}: give visual (the clip grid every channel is placed on) "
                       f"and any of {', '.join(CHANNELS[1:])}, comma-separated")
    steps = ([speech.channel_step(speech.resolve_whisper(speech_model, speech_language, device))]
             if "speech" in channels else [])
    steps += [ocr.channel_step(ocr.resolve_ocr(device))] if "ocr" in channels else []
    existed = {name for name in INDEX_FILES if os.path.exists(os.path.join(index_dir, name))}
    made_folder = not os.path.isdir(index_dir)
    summary = IngestSummary(index_dir)
    with ingest_lock(index_dir):
        try:
            with recording_stop_signals() as stops:
                _ingest(root, index_dir, summary, stops, clip_model, clip_pretrained, device, ray_address,
                        workers, allow_random, progress, reranker, (features, slowfast_weights), steps)
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
            progress, reranker, kinds_asked, steps) -> None:
    # lazy: torch (open_clip), loaded once the run starts, not to refuse a bad argument
    from model.inference.features import model_embed_dim, resolve_weights

    start_time = time.monotonic()
    recorded = _recorded_meta(index_dir)
    if not recorded and not discover(root, exclude=[index_dir]):
        raise VmrError(f"no video files under {root} (looked for video extensions such as .mp4/.mkv/.webm and "
                       "video signatures): point vmr index at the folder that holds the videos")
    clip = choose_clip(CLIPSource.recorded(recorded), clip_model, clip_pretrained, device, allow_random)
    wanted = wanted_kinds(recorded, kinds_asked[0])
    clip_len = _clip_len(recorded.get("clip_seconds", CLIP_SECONDS), wanted)
    try:
        sf_path, sf_record = slowfast_source(recorded, kinds_asked[1], clip_len, index_dir) if \
            kinds.SLOWFAST_KIND in wanted else (None, None)
        _, model_id, _, _ = resolve_weights(clip.model, clip.pretrained, clip.allow_random)  # fail fast
        embed_dim = model_embed_dim(clip.model)
        reranker = _check_reranker(reranker, model_id) if reranker else None
    except WeightsNotFound:
        raise
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
        writer = Writer(lib, lib.open_faiss(), summary, float(meta["clip_seconds"]), {kinds.SLOWFAST_KIND: sf_record})
        writer.settle(plan)
        stops.check()
        computed = tuple(k for k in kinds.KINDS if k in wanted)
        todo = [Video(c, plan.ids[c.path], plan.states.get(c.path), computed) for c in plan.work]
        todo += _lacking_kinds(lib, plan, wanted)
        summary.unchanged -= len(todo) - len(plan.work)
        if todo:
            pipeline = Pipeline(clip, writer, stops, ray_address, workers, progress, sf_path, clip_len)
            try:
                pipeline.run(todo, model_id)
            finally:
                summary.nodes = pipeline.nodes
        writer.save()
        summary.channels = run_steps(lib, root, steps, stops, ray_address, progress)
        stops.check()  # a signal during the last commits or the save: still a stop (exit 1), work kept
        summary.failed = [{"path": v["path"], "error": v["error"]} for v in lib.videos(status="failed")]
    finally:
        lib.close()
    summary.seconds = time.monotonic() - start_time


def wanted_kinds(meta: dict, asked: list[str] | None) -> set[str]:
    """The kinds a run computes: those the index holds, those asked for, and always the coarse ``clip``."""
    unknown = [k for k in asked or [] if k not in kinds.KINDS]
    if unknown:
        raise VmrError(f"--features {','.join(asked)}: unknown kind {unknown[0]!r} (known: {', '.join(kinds.KINDS)})")
    return {kinds.CLIP_KIND, *kinds.feature_kinds(meta), *(asked or [])}


def _clip_len(clip_seconds, wanted: set[str]) -> int:
    if kinds.SLOWFAST_KIND in wanted and float(clip_seconds) != int(float(clip_seconds)):
        raise VmrError(f"this index cuts {clip_seconds}-s clips; SlowFast's recipe needs whole seconds: use a new "
                       "--index")
    return int(float(clip_seconds))


def slowfast_source(meta: dict, given: str | None, clip_len: int, index_dir: str) -> tuple[str, dict]:
    """(weights file, kind record) of the run's SlowFast: the given file, else the recorded one, else the cached
    one (model.inference.slowfast_weights.find_slowfast_weights); refused now if the index holds SlowFast features
    of other weights (its record names their sha256)."""
    from model.inference.slowfast_weights import find_slowfast_weights, weights_layout  # lazy: torch

    path = find_slowfast_weights(given, kinds.recorded_weights_path(meta, kinds.SLOWFAST_KIND))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    record = kinds.slowfast_kind_record(path, digest.hexdigest(), weights_layout(path), clip_len)
    kinds.check_record(kinds.feature_kinds(meta).get(kinds.SLOWFAST_KIND), record, kinds.SLOWFAST_KIND, index_dir)
    return path, record


def _lacking_kinds(lib: Library, plan: Plan, wanted: set[str]) -> list[Video]:
    """Indexed, unchanged videos lacking a non-coarse kind of ``wanted``: only those kinds are computed for them."""
    extra = [k for k in kinds.KINDS if k in wanted and k != kinds.CLIP_KIND]
    if not extra:
        return []
    held = lib.kinds_by_video()
    out = []
    for cand in plan.unchanged_files:
        state = plan.states[cand.path]
        missing = tuple(k for k in extra if k not in held.get(state["id"], []))
        if state["status"] == "indexed" and missing:
            out.append(Video(cand, state["id"], state, missing))
    return out


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
