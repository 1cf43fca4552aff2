"""The talking test world: espeak-ng utterances at known offsets, with noise and silences, muxed into scene videos.

    speak(text) -> f32 [N] at AUDIO_RATE (espeak-ng; ESPEAK_ABSENT names why it cannot run here)
    talking_track(utterances, duration, snr_db=None, seed=0) -> (f32 [N], [Said])
    make_talking_video(path, duration, utterances, snr_db=None, seed=0) -> TalkingVideo

An utterance is (offset seconds, sentence); ``Said`` records where its voice actually is (espeak pads a little
silence either side). Noise is white, scaled to ``snr_db`` against the mean power of the voiced samples.
"""
from __future__ import annotations

import functools
import io
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from world.videos import AUDIO_RATE, make_video

ESPEAK = "espeak-ng"
SPEAK_RATE_WPM = 150  # a little slower than espeak's default 175: clearer for Whisper tiny
VOICED = 0.02  # amplitude above which a sample counts as voice when locating an utterance


def espeak_absent() -> str | None:
    """Why espeak-ng cannot run here (None: it can)."""
    return None if shutil.which(ESPEAK) else f"{ESPEAK} not installed (apt-get install espeak-ng)"


@functools.lru_cache(maxsize=256)
def _spoken(text: str, rate_wpm: int) -> np.ndarray:
    wav = subprocess.run([ESPEAK, "-s", str(rate_wpm), "--stdout", text], check=True, capture_output=True).stdout
    resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
    chunks = []
    with av.open(io.BytesIO(wav)) as container:
        for frame in container.decode(audio=0):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32)


def speak(text: str, rate_wpm: int = SPEAK_RATE_WPM) -> np.ndarray:
    """espeak-ng's voice saying ``text``: f32 [N] at AUDIO_RATE, peak ~0.5."""
    samples = _spoken(text, rate_wpm).copy()
    return samples * (0.5 / max(float(np.abs(samples).max()), 1e-6))


@dataclass
class Said:
    text: str
    start: float  # seconds of the first voiced sample
    end: float  # seconds of the last one


@dataclass
class TalkingVideo:
    path: Path
    duration: float
    said: list[Said] = field(default_factory=list)
    snr_db: float | None = None


def talking_track(utterances: list[tuple[float, str]], duration: float, snr_db: float | None = None,
                  seed: int = 0) -> tuple[np.ndarray, list[Said]]:
    """An audio track of ``duration`` s with each (offset, sentence) spoken from its offset; silence elsewhere,
    white noise over all of it at ``snr_db`` (None: none)."""
    track = np.zeros(int(round(duration * AUDIO_RATE)), np.float32)
    said = []
    for offset, text in utterances:
        voice = speak(text)
        a = int(round(offset * AUDIO_RATE))
        voice = voice[: max(0, len(track) - a)]
        track[a: a + len(voice)] += voice
        loud = np.flatnonzero(np.abs(voice) > VOICED)
        if len(loud):
            said.append(Said(text, (a + loud[0]) / AUDIO_RATE, (a + loud[-1]) / AUDIO_RATE))
    if snr_db is not None and said:
        voiced = np.concatenate([track[int(s.start * AUDIO_RATE): int(s.end * AUDIO_RATE)] for s in said])
        power = float(np.mean(voiced ** 2)) / (10 ** (snr_db / 10))
        track += np.random.default_rng(seed).normal(0.0, np.sqrt(power), len(track)).astype(np.float32)
    return np.clip(track, -1.0, 1.0), said


def make_talking_video(path, duration: float, utterances: list[tuple[float, str]], snr_db: float | None = None,
                       seed: int = 0, size: tuple[int, int] = (64, 48), fps: float = 5,
                       overlay=None) -> TalkingVideo:
    """A scene video (world.videos) whose AAC track says ``utterances``; ``overlay`` as world.videos.make_video's
    (world.screen_text: captions over a talk)."""
    track, said = talking_track(utterances, duration, snr_db, seed)
    spec = make_video(path, duration=duration, fps=fps, size=size, audio_samples=track, overlay=overlay)
    return TalkingVideo(spec.path, spec.duration, said, snr_db)


__all__ = ["espeak_absent", "speak", "talking_track", "make_talking_video", "Said", "TalkingVideo"]
