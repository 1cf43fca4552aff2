"""Tiny test videos written with PyAV: the good (several codecs/containers, odd but valid files) and the bad.

Every good video is a sequence of flat-coloured "scenes" (one colour per scene, a small moving square so that
consecutive frames differ), so clip features change at scene cuts and the pseudo-events have something to find.
Sizes and frame rates are tiny so that a whole library encodes in about a second.

    make_video(path, duration=6.0, fps=5, size=(64, 48), codec="libx264")  -> VideoSpec
    make_library(root)  -> Library (good: dict name -> VideoSpec, bad: dict name -> path)
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np

# Scene palette: distinct RGB colours (scene i uses PALETTE[i % len]).
PALETTE = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230], [240, 220, 30], [200, 40, 220], [30, 220, 220],
                    [250, 250, 250], [20, 20, 20], [250, 140, 20], [120, 80, 40]], dtype=np.uint8)

AUDIO_RATE = 16_000  # Hz of the generated audio tracks

# Per codec: (container format, pixel format, encoder options).
CODECS = {
    "libx264": ("mp4", "yuv420p", {"preset": "ultrafast", "tune": "zerolatency"}),
    "libx264rgb": ("mp4", "yuv444p", {"preset": "ultrafast"}),  # yuv444 allows odd frame sizes
    "libvpx-vp9": ("webm", "yuv420p", {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}),
    "mpeg4": ("matroska", "yuv420p", {}),
}


@dataclass
class VideoSpec:
    """What a generated video is, as a test expects to read it back."""
    path: Path
    duration: float  # seconds of video (last frame end)
    fps: float
    width: int  # as displayed (after rotation)
    height: int
    scene_seconds: float
    frame_times: list[float] = field(default_factory=list)

    @property
    def n_scenes(self) -> int:
        return int(np.ceil(self.duration / self.scene_seconds))


def frame_image(t: float, width: int, height: int, scene_seconds: float) -> np.ndarray:
    """RGB uint8 [height, width, 3] shown at time t: the scene colour plus a moving dark square."""
    scene = int(t // scene_seconds)
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = PALETTE[scene % len(PALETTE)]
    side = max(2, min(width, height) // 4)
    x = int((t * 7) % max(1, width - side))
    img[: side, x: x + side] = 0
    return img


def make_video(path, duration: float = 6.0, fps: float = 5, size: tuple[int, int] = (64, 48),
               codec: str = "libx264", container_format: str | None = None, scene_seconds: float = 2.0,
               rotation: int = 0, frame_times: list[float] | None = None, audio: bool = False,
               gop: int | None = None, audio_samples: np.ndarray | None = None,
               overlay: Callable[[float, np.ndarray], np.ndarray] | None = None) -> VideoSpec:
    """Encode a scene video. ``frame_times`` (seconds, increasing) gives a variable frame rate instead of fps.

    ``size`` = (width, height) of the stored frames; ``rotation`` (degrees, counter-clockwise) goes into the
    display matrix, so a player (and the indexer) shows a (height, width) picture for 90/270. ``audio``: a quiet
    tone; ``audio_samples`` f32 [N] at AUDIO_RATE: that track instead (world.speech's talking tracks).
    ``overlay(t, rgb [H, W, 3]) -> rgb``: drawn over each frame (world.screen_text's captions).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt, pix_fmt, options = CODECS[codec]
    encoder = "libx264" if codec == "libx264rgb" else codec
    width, height = size
    if frame_times is None:
        n = max(1, int(round(duration * fps)))
        frame_times = [i / fps for i in range(n)]
    time_base = Fraction(1, 1000)
    with av.open(str(path), mode="w", format=container_format or fmt) as out:
        stream = out.add_stream(encoder, rate=Fraction(fps).limit_denominator(1000) if fps else 25)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        stream.options = dict(options)
        if gop:
            stream.codec_context.gop_size = gop
        if rotation:
            stream.set_display_rotation(rotation)
        astream = None
        if audio or audio_samples is not None:
            astream = out.add_stream("aac", rate=AUDIO_RATE)
        for t in frame_times:
            image = frame_image(t, width, height, scene_seconds)
            image = overlay(t, image) if overlay is not None else image
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = int(round(t * 1000))
            frame.time_base = time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if astream is not None:
            _write_audio(out, astream, duration, audio_samples)
    last_gap = frame_times[-1] - frame_times[-2] if len(frame_times) > 1 else 1 / (fps or 25)
    shown_w, shown_h = (height, width) if rotation % 180 == 90 else (width, height)
    return VideoSpec(path, frame_times[-1] + last_gap, fps, shown_w, shown_h, scene_seconds, list(frame_times))


def _write_audio(out, astream, duration: float, track: np.ndarray | None = None) -> None:
    """``track`` f32 [N] (at the stream's rate), or a quiet sine tone of ``duration`` seconds."""
    rate, chunk = astream.rate, 1024
    t0 = 0
    layout = "mono"
    total = len(track) if track is not None else duration * rate
    while t0 < total:
        if track is not None:
            samples = np.zeros((1, chunk), np.float32)
            part = track[t0: t0 + chunk]
            samples[0, : len(part)] = part
        else:
            t = (np.arange(chunk) + t0) / rate
            samples = (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = t0
        for packet in astream.encode(frame):
            out.mux(packet)
        t0 += chunk
    for packet in astream.encode():
        out.mux(packet)


def make_audio_only(path, duration: float = 3.0) -> Path:
    """An mp4 holding only an AAC track."""
    path = Path(path)
    with av.open(str(path), mode="w", format="mp4") as out:
        _write_audio(out, out.add_stream("aac", rate=16000), duration)
    return path


def vfr_times(duration: float, seed: int = 0) -> list[float]:
    """Irregular frame times: gaps from 0.05 s to 0.9 s (one long freeze), strictly increasing, from 0."""
    rng = np.random.default_rng(seed)
    times, t = [], 0.0
    while t < duration:
        times.append(round(t, 3))
        t += float(rng.choice([0.05, 0.1, 0.2, 0.4, 0.9]))
    return times


@dataclass
class Library:
    root: Path
    good: dict  # name -> VideoSpec
    bad: dict  # name -> Path (each must be recorded as failed)


def make_library(root, long_hours: float = 0.0, bad: bool = True) -> Library:
    """A folder with one video of each kind (non-ASCII, spaces and subfolders in the paths) and the bad files.

    ``long_hours`` > 0 adds a very long, 16x16, 0.25-fps video.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    good = {
        "h264": make_video(root / "h264.mp4", duration=8.0),
        "vp9": make_video(root / "sub" / "vp9.webm", duration=6.0, codec="libvpx-vp9"),
        "mpeg4": make_video(root / "sub" / "mpeg4.mkv", duration=5.0, codec="mpeg4"),
        "mov": make_video(root / "clip.mov", duration=4.5, container_format="mov", audio=True),
        "odd": make_video(root / "odd size.mp4", duration=4.0, size=(97, 61), codec="libx264rgb"),
        "rotated": make_video(root / "rotated.mp4", duration=4.0, size=(64, 32), rotation=90),
        "vfr": make_video(root / "vfr.mp4", frame_times=vfr_times(7.0), fps=0, duration=7.0),
        "unicode": make_video(root / "dossier été" / "vidéo 日本 1.mp4", duration=3.0),
        "no_ext": make_video(root / "noextension", duration=2.5, container_format="mp4"),
    }
    if long_hours:
        good["long"] = make_video(root / "long.mkv", duration=long_hours * 3600, fps=0.25, size=(16, 16),
                                  codec="mpeg4", scene_seconds=600.0, gop=600)
    (root / "notes.txt").write_text("not a video and not named like one: ignored\n")
    bad_files = {}
    if bad:
        bad_files = make_bad_files(root / "bad")
    return Library(root, good, bad_files)


def make_bad_files(folder) -> dict:
    """Files that look like videos (by name) but cannot be indexed. Returns name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    files["zero"] = folder / "zero.mp4"
    files["zero"].write_bytes(b"")
    whole = make_video(folder / "whole.tmp", duration=4.0, container_format="mp4").path
    data = whole.read_bytes()
    files["truncated"] = folder / "truncated.mp4"
    files["truncated"].write_bytes(data[: len(data) // 2])  # mp4 with its moov atom (at the end) cut off
    whole.unlink()
    files["not_video"] = folder / "text.mp4"
    files["not_video"].write_text("hello, I am text\n" * 20)
    files["audio_only"] = make_audio_only(folder / "audio only.mp4")
    files["broken_link"] = folder / "broken.mkv"
    if files["broken_link"].is_symlink():
        files["broken_link"].unlink()
    os.symlink(folder / "does-not-exist.mkv", files["broken_link"])
    files["unreadable"] = folder / "unreadable.webm"
    shutil.copyfile(__file__, files["unreadable"])  # content irrelevant: it cannot be opened (unless root)
    os.chmod(files["unreadable"], 0)
    return files
