"""A video's audio track, decoded once with PyAV and resampled to what Whisper reads (16 kHz mono float32).

    decode_audio(path) -> Audio(samples f32 [N] or None, offset seconds, state, reason)

``offset`` places sample 0 on the video's clock (seconds from the video stream's start, the clock the clips are
cut on, indexer.decode): an audio stream that starts later than the video shifts every word by it. ``state`` is
None when there is audio to transcribe, else a store.transcripts state ("no_audio", "no_speech", "failed") with
its one-line reason. A stream that breaks part way keeps what decoded before the break (``reason`` says where).
"""
from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np

SAMPLE_RATE = 16_000
# Peak amplitude (full scale 1.0) under which a track counts as silent: ~-54 dBFS, below a quiet room recorded
# through any consumer microphone; a silent track is settled without loading it into Whisper.
SILENCE_PEAK = 2e-3


@dataclass
class Audio:
    samples: np.ndarray | None  # f32 [N] at SAMPLE_RATE, mono
    offset: float = 0.0  # seconds on the video's clock of sample 0
    state: str | None = None  # None: transcribe; else why not (store.transcripts.STATES)
    reason: str | None = None

    @property
    def seconds(self) -> float:
        return 0.0 if self.samples is None else len(self.samples) / SAMPLE_RATE


def _first_line(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text.split(": '")[0][:200]


def decode_audio(path: str) -> Audio:
    """The first audio stream of ``path`` as Whisper's input (module docstring); never raises for a bad file."""
    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, OSError) as err:
        return Audio(None, state="failed", reason=f"audio unreadable: {_first_line(err)}")
    try:
        if not container.streams.audio:
            return Audio(None, state="no_audio", reason="no audio stream")
        stream = container.streams.audio[0]
        video = container.streams.video[0] if container.streams.video else None
        video_start = (float(video.start_time * video.time_base) if video is not None and video.start_time is not None
                       else 0.0)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks, first_time, broken, damaged = [], None, None, 0
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    damaged += 1
                    continue  # a damaged packet: skipped, as ffmpeg does
                for frame in frames:
                    if first_time is None and frame.pts is not None:
                        first_time = float(frame.pts * frame.time_base)
                    chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
        except (av.FFmpegError, OSError, ValueError) as err:
            broken = _first_line(err)
    finally:
        container.close()
    samples = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    offset = max(0.0, (first_time or 0.0) - video_start)
    if not len(samples) and (broken or damaged):
        return Audio(None, state="failed", reason=f"audio stream undecodable: {broken or f'{damaged} damaged packets'}")
    if not len(samples):
        return Audio(None, state="no_speech", reason="empty audio stream")
    if float(np.abs(samples).max()) < SILENCE_PEAK:
        return Audio(None, offset, state="no_speech", reason="silent audio")
    reason = f"audio stream broke at {len(samples) / SAMPLE_RATE:.1f} s ({broken}): transcribed to there" \
        if broken else None
    return Audio(samples, offset, reason=reason)


__all__ = ["SAMPLE_RATE", "Audio", "decode_audio"]
