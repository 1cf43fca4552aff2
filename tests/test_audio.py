"""A video's audio for Whisper (indexer/audio.py) on PyAV-written files: resampling, offsets, and the reasons a video
has no audio to transcribe."""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

from indexer.audio import SAMPLE_RATE, decode_audio
from world.videos import AUDIO_RATE, make_video


def test_track_comes_back_at_16k_mono(tmp_path):
    t = np.arange(int(3.0 * AUDIO_RATE)) / AUDIO_RATE
    tone = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    make_video(tmp_path / "a.mp4", duration=3.0, audio_samples=tone)
    audio = decode_audio(str(tmp_path / "a.mp4"))
    assert audio.state is None and audio.reason is None
    assert abs(audio.seconds - 3.0) < 0.2 and audio.samples.dtype == np.float32
    assert 0.2 < float(np.abs(audio.samples).max()) < 0.4 and audio.offset < 0.1
    assert SAMPLE_RATE == 16_000


def test_no_audio_silence_and_garbage_have_reasons(tmp_path):
    make_video(tmp_path / "mute.mp4", duration=2.0)
    make_video(tmp_path / "silent.mp4", duration=2.0, audio_samples=np.zeros(2 * AUDIO_RATE, np.float32))
    with av.open(str(tmp_path / "garbage.mkv"), mode="w", format="matroska") as out:
        video = out.add_stream("mpeg4", rate=5)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("mp3", rate=AUDIO_RATE)
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            for packet in video.encode(frame):
                out.mux(packet)
            packet = av.Packet(np.random.default_rng(i).integers(0, 256, 200, dtype=np.uint8).tobytes())
            packet.stream, packet.pts, packet.dts, packet.time_base = audio, i * 1152, i * 1152, Fraction(1, AUDIO_RATE)
            out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
    assert (decode_audio(str(tmp_path / "mute.mp4")).state, decode_audio(str(tmp_path / "mute.mp4")).reason) == (
        "no_audio", "no audio stream")
    assert decode_audio(str(tmp_path / "silent.mp4")).reason == "silent audio"
    broken = decode_audio(str(tmp_path / "garbage.mkv"))
    assert broken.state == "failed" and broken.reason.startswith("audio stream undecodable"), broken
    assert decode_audio(str(tmp_path / "missing.mp4")).state == "failed"
