"""Clip export (server/clips.py) on videos generated with PyAV: a scene video whose colour changes every second and
whose keyframes fall every 2 s, so a clip that opened at the wrong frame would show the wrong colour.

Each cut is decoded again with PyAV: its length is within two frames of end - start, its first frame has the
colour of the source frame shown at start, its audio track lasts as long. Bounds are refused with one sentence.
"""
from __future__ import annotations

import av
import numpy as np
import pytest

from server.clips import MAX_CLIP_SECONDS, ClipError, check_bounds, clip_filename, cut_clip
from world.videos import make_video

FPS = 10


@pytest.fixture(scope="module")
def scene_video(tmp_path_factory):
    """10 s, 10 fps, a new colour each second, keyframes at 0, 2, 4, 6, 8 s, an AAC track."""
    path = tmp_path_factory.mktemp("clips") / "scenes.mp4"
    make_video(path, duration=10.0, fps=FPS, scene_seconds=1.0, gop=2 * FPS, audio=True)
    assert keyframe_times(path) == [0.0, 2.0, 4.0, 6.0, 8.0]
    return path


def keyframe_times(path) -> list[float]:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        return [round(float(p.pts * v.time_base), 3) for p in c.demux(v) if p.is_keyframe and p.pts is not None]


def decoded(path) -> tuple[list, float | None]:
    """(video frames, seconds of audio samples or None) of a file, decoded."""
    with av.open(str(path)) as c:
        frames = list(c.decode(c.streams.video[0]))
    with av.open(str(path)) as c:
        if not c.streams.audio:
            return frames, None
        stream = c.streams.audio[0]
        samples = sum(f.samples for f in c.decode(stream))
        return frames, samples / stream.codec_context.sample_rate


def mean_colour(frame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24").reshape(-1, 3).mean(axis=0)


def frame_shown_at(path, t: float):
    """The source frame on screen at ``t``: the last one that began at or before it."""
    shown = None
    with av.open(str(path)) as c:
        for frame in c.decode(c.streams.video[0]):
            if frame.time > t + 1e-6:
                break
            shown = frame
    return shown


def assert_is_the_moment(src, out, start: float, end: float, frame_seconds: float, slack_frames: int = 2) -> None:
    frames, _ = decoded(out)
    length = frames[-1].time + frame_seconds - frames[0].time
    assert abs(length - (end - start)) <= slack_frames * frame_seconds + 1e-6, (length, start, end)
    assert frames[0].time == pytest.approx(0.0, abs=1e-6)
    want, got = mean_colour(frame_shown_at(src, start)), mean_colour(frames[0])
    assert np.abs(want - got).max() < 12, (want, got)
    before = mean_colour(frame_shown_at(src, start - 1.0))  # the scene before: a clip opened early shows it
    assert np.abs(before - got).max() > 60


def test_a_cut_at_a_keyframe_is_a_stream_copy(scene_video, tmp_path):
    out = tmp_path / "copy.mp4"
    report = cut_clip(str(scene_video), 4.0, 7.0, str(out))
    assert report.method == "copy" and (report.start, report.end) == (4.0, 7.0) and report.audio
    assert_is_the_moment(scene_video, out, 4.0, 7.0, 1 / FPS)
    with av.open(str(out)) as c:
        assert [s.codec_context.name for s in c.streams] == ["h264", "aac"]
    _, audio_seconds = decoded(out)
    assert abs(audio_seconds - 3.0) < 0.1
    assert "stream copy" in report.describe()


def test_a_cut_off_a_keyframe_is_re_encoded_from_the_frame_at_start(scene_video, tmp_path):
    """5.0 s is a scene change but not a keyframe (4.0 is): a copy would open on the previous colour."""
    for start, end in ((5.0, 8.5), (5.05, 6.0)):  # on a frame; between two frames (the one shown at 5.0 opens it)
        out = tmp_path / f"reencoded_{start}.mp4"
        report = cut_clip(str(scene_video), start, end, str(out))
        assert report.method == "reencode" and report.audio
        assert_is_the_moment(scene_video, out, start, end, 1 / FPS)
        _, audio_seconds = decoded(out)
        assert abs(audio_seconds - (end - start)) < 0.1


def test_audio_that_mp4_cannot_hold_is_re_encoded(tmp_path, monkeypatch):
    """A stream copy of the video with its audio decoded, trimmed to the moment and encoded as AAC."""
    import server.clips

    src = tmp_path / "tone.mp4"
    make_video(src, duration=6.0, fps=FPS, scene_seconds=1.0, gop=2 * FPS, audio=True)
    monkeypatch.setattr(server.clips, "COPY_AUDIO", set())
    out = tmp_path / "out.mp4"
    report = cut_clip(str(src), 2.0, 4.5, str(out))
    assert report.method == "copy"
    _, audio_seconds = decoded(out)
    assert abs(audio_seconds - 2.5) < 0.1


def test_an_end_past_the_video_is_cut_there_and_bad_bounds_are_refused(scene_video, tmp_path):
    out = tmp_path / "tail.mp4"
    report = cut_clip(str(scene_video), 8.0, 99.0, str(out))
    assert report.end == pytest.approx(10.0) and report.method == "copy"
    assert_is_the_moment(scene_video, out, 8.0, 10.0, 1 / FPS)
    for start, end, said in ((-1.0, 2.0, "start >= 0"), (3.0, 2.0, "must be after start"),
                             (12.0, 13.0, "past the video's end"), (1.0, 1.05, "at least"),
                             (float("nan"), 2.0, "must be seconds")):
        bad = tmp_path / "bad.mp4"
        with pytest.raises(ClipError, match=said):
            cut_clip(str(scene_video), start, end, str(bad))
        assert not bad.exists()
    with pytest.raises(ClipError, match="at most"):
        check_bounds(0.0, MAX_CLIP_SECONDS + 1, duration=None)  # a long video: the moment itself is too long
    assert clip_filename("trips/beach day.mkv", 12.0, 31.46) == "beach day_12.0-31.5.mp4"
