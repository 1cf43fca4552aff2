"""Frame sampling (ffmpeg fps=0.5 rule), odd-but-valid files, bad files and discovery; no Ray, no model."""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from shared_data import SHARED_DATA

from indexer.decode import DecodeError, sample_clip_frames
from indexer.discover import discover, looks_like_video
from model.spans import num_clips
from world import videos

REAL_VIDEO = SHARED_DATA / "real_video" / "charades.mp4"


def keep(rgb):
    return rgb.copy()


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return videos.make_library(tmp_path_factory.mktemp("lib"), long_hours=1.0)


def _chosen(frames):
    return [int(round(f[16, 16].mean() / 4)) for f in frames]


@pytest.fixture(scope="module")
def indexed_video(tmp_path_factory):
    """Frame i has grey level 4*i (lossless, GOP 7): the decoded pixel tells which frame was chosen."""
    path = tmp_path_factory.mktemp("fi") / "idx.mp4"
    fps, n = 5, 48  # 9.6 s
    time_base = 1000
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv444p"
        stream.options = {"preset": "ultrafast", "qp": "0", "g": "7"}
        stream.codec_context.time_base = stream.time_base = Fraction(1, time_base)
        for i in range(n):
            img = np.full((32, 32, 3), 4 * i, np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = int(i * time_base / fps)
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)
    return path, fps, n


def test_frame_choice_follows_ffmpeg_fps_filter(indexed_video):
    path, fps, n = indexed_video
    frames, info = sample_clip_frames(str(path), keep)
    duration = n / fps
    assert info.total_clips == num_clips(duration) == 5 and info.end_time == pytest.approx(duration)
    # tick k takes the last frame before t = 2k + 1 s: frame index ceil((2k+1)*fps) - 1; the last tick
    # (k=4, t<9 s) -> frame 44.
    expected = [int(np.ceil((2 * k + 1) * fps)) - 1 for k in range(5)]
    assert _chosen(frames) == expected
    # Segments (seeking through the keyframe index) give exactly the same frames.
    a, _ = sample_clip_frames(str(path), keep, 0, 2)
    b, ib = sample_clip_frames(str(path), keep, 2, None)
    assert _chosen(np.concatenate([a, b])) == expected and ib.total_clips == 5
    assert ib.decoded < n  # the later segment did not decode from the start


def test_real_video_gives_15_clips_over_30_7_seconds():
    if not REAL_VIDEO.is_file():
        pytest.skip("shared real video not present")
    frames, info = sample_clip_frames(str(REAL_VIDEO), keep)
    assert info.total_clips == 15 and len(frames) == 15
    assert info.end_time == pytest.approx(30.70, abs=0.01)
    assert (info.width, info.height) == (480, 270)
    assert info.decoded < 460  # the keyframe at 16.7 s let it skip part of the file


@pytest.mark.parametrize("name", ["h264", "vp9", "mpeg4", "mov", "odd", "rotated", "vfr", "unicode", "no_ext", "long"])
def test_good_videos(library, name):
    spec = library.good[name]
    frames, info = sample_clip_frames(str(spec.path), keep)
    assert info.total_clips == num_clips(info.end_time) == len(frames)
    assert info.end_time == pytest.approx(spec.duration, abs=0.25)
    assert (info.width, info.height) == (spec.width, spec.height)  # rotation applied, odd sizes kept
    assert frames.shape[1:] == (spec.height, spec.width, 3)
    # Scene colour of each sampled frame = the scene shown at ~2k+1 s (bottom-right pixel, away from the square).
    for k, frame in enumerate(frames[:6]):
        t = min(2 * k + 1 - 1e-3, spec.frame_times[-1])
        shown = max(ft for ft in spec.frame_times if ft <= t)
        want = videos.PALETTE[int(shown // spec.scene_seconds) % len(videos.PALETTE)]
        assert np.abs(frame[-1, -1].astype(int) - want).max() < 40, (name, k)


def test_long_video_segments_match_whole(library):
    path = str(library.good["long"].path)
    whole, info = sample_clip_frames(path, keep)
    assert info.total_clips == 1800
    parts = [sample_clip_frames(path, keep, a, b)[0] for a, b in ((0, 600), (600, 1200), (1200, None))]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    beyond, info = sample_clip_frames(path, keep, 5000, None)
    assert len(beyond) == 0


@pytest.mark.parametrize("name,reason", [("zero", "not a readable video"), ("truncated", "not a readable video"),
                                         ("not_video", "not a readable video"), ("audio_only", "no video stream"),
                                         ("broken_link", "not found")])
def test_bad_files_raise_one_line(library, name, reason):
    with pytest.raises(DecodeError, match=reason) as err:
        sample_clip_frames(str(library.bad[name]), keep)
    assert "\n" not in str(err.value)


def test_discovery_by_name_and_content(library, tmp_path):
    found = {c.path: c for c in discover(str(library.root), exclude=[str(library.root / "sub")])}
    assert "noextension" in found and looks_like_video(str(library.root / "noextension"))
    assert "notes.txt" not in found
    assert "sub/vp9.webm" not in found  # excluded folder (an index inside the video folder)
    assert "dossier été/vidéo 日本 1.mp4" in found
    assert found["bad/broken.mkv"].error.startswith("broken symlink")
    assert found["bad/zero.mp4"].size == 0 and found["bad/zero.mp4"].error is None
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    assert discover(str(tmp_path))[0].error == "not a regular file"  # never opened (it would block)
