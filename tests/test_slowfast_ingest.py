"""`vmr index --features clip,slowfast`: SlowFast computed at ingest beside CLIP, from one decode, on the session's Ray.

The SlowFast weights are random (world.slowfast_random), saved as a pytorchvideo-layout file that the CLI is given
as a user's would be. Windows and stored vectors are checked against an independent path: the extractor's whole
ffmpeg chain (fps, scale, crop, rgb24) as one libavfilter graph over the whole video, HERO's frame indices on its
30-fps output, through the network directly.
"""
from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner

from cli import main as cli_main
from indexer import slowfast_frames as sf
from indexer.decode import sample_clip_frames
from indexer.frame_stream import decode_kinds
from store.library import Library
from store.status import library_status
from test_ingest import _assert_same_index, _snapshot
from world import CLIP_TINY_CONFIG, videos

ROOT = Path(__file__).resolve().parents[1]
TINY = str(CLIP_TINY_CONFIG)


# the ffmpeg CLI's autorotate: the filters it puts before the chain for a picture shown turned counter-clockwise
AUTOROTATE = {0: [], 90: [("transpose", "cclock")], 180: [("hflip", None), ("vflip", None)],
              270: [("transpose", "clock")]}


def _hero_windows(path) -> np.ndarray:
    """uint8 [clips, 32, 224, 224, 3]: the extractor's whole chain as one libavfilter graph over every decoded frame,
    ``fps=fps=30, scale=W:H:flags=bilinear, crop=224:224:x:y, format=rgb24`` (W, H from the displayed picture, after
    the CLI's autorotate), timestamps counted from the stream start as the ffmpeg CLI counts them, then HERO's
    padding and frame indices on that 30-fps output."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        start, time_base = stream.start_time, stream.time_base
        duration = float(stream.duration * time_base) if stream.duration else None
        fps = math.floor(stream.average_rate)
    first = frames[0]
    rotation = round(first.rotation / 90) % 4 * 90
    h, w = (first.width, first.height) if rotation % 180 else (first.height, first.width)
    out_h, out_w = (int(h * 224 / w), 224) if h >= w else (224, int(w * 224 / h))  # HERO's video_dataflow sizes
    graph = av.filter.Graph()
    node = source = graph.add_buffer(width=first.width, height=first.height, format=first.format,
                                     time_base=time_base)
    for name, args in [*AUTOROTATE[rotation], ("fps", "fps=30"), ("scale", f"{out_w}:{out_h}:flags=bilinear"),
                       ("crop", f"224:224:{int((out_w - 224) / 2)}:{int((out_h - 224) / 2)}"), ("format", "rgb24"),
                       ("buffersink", None)]:
        following = graph.add(name, args) if args else graph.add(name)
        node.link_to(following)
        node = following
    graph.configure()
    ticks = []

    def drain():
        while True:
            try:
                ticks.append(node.pull().to_ndarray())
            except (av.BlockingIOError, av.EOFError):
                return

    for frame in frames:
        frame.pts -= start
        source.push(frame)
        drain()
    source.push(None)
    drain()
    return np.stack(ticks)[sf.clip_frame_ticks(len(ticks), fps, 2, duration)]


def _clip_stand_in(rgb: np.ndarray) -> np.ndarray:
    """A CLIP resize stand-in, rgb uint8 [H, W, 3] -> uint8 [H / 4, W / 4, 3]: any fixed function of the pixels
    shows whether both decoders picked the same frame."""
    return np.ascontiguousarray(rgb[::4, ::4])


STREAM_CASES = {  # name -> make_video arguments: constant rates, odd sizes, a rotated phone video, VFR + late start
    "30fps": dict(duration=2.5, fps=30),
    "24fps_odd": dict(duration=3.3, fps=24, size=(50, 38)),
    "60fps_rotated": dict(duration=2.2, fps=60, size=(64, 36), rotation=90),
    "vfr_late": dict(frame_times=[0.4, 0.5, 0.55, 0.9, 1.6, 1.65, 3.3, 3.4]),
}


@pytest.mark.parametrize("case", sorted(STREAM_CASES))
def test_one_decode_gives_decode_py_clip_frames_and_hero_windows(tmp_path, case):
    """frame_stream's single pass: CLIP frames equal indexer.decode's, SlowFast windows equal the whole-video
    oracle's, and decoding in segments (seeking) gives the same as one pass."""
    path = str(videos.make_video(tmp_path / "v.mp4", **STREAM_CASES[case]).path)

    clips, windows, info = decode_kinds(path, _clip_stand_in)
    expected = _hero_windows(path)
    assert windows.shape == expected.shape and info.slowfast_total == len(expected)
    np.testing.assert_array_equal(windows, expected)
    np.testing.assert_array_equal(clips, sample_clip_frames(path, _clip_stand_in)[0])
    parts = [decode_kinds(path, None, first, stop) for first, stop in ((0, 1), (1, None))]
    assert all(len(c) == 0 for c, _, _ in parts)  # no CLIP frames asked for
    by_clip = {i.slowfast_first + j: w for _, ws, i in parts for j, w in enumerate(ws)}
    assert sorted(by_clip) == list(range(len(expected)))
    np.testing.assert_array_equal(np.stack([by_clip[k] for k in sorted(by_clip)]), expected)


PIXEL_CASES = {  # more sizes (odd, or an odd crop offset), rates and rotations than STREAM_CASES, SlowFast only
    "24fps_odd_size": dict(duration=2.1, fps=24, size=(241, 317), codec="libx264rgb"),  # 4:4:4 takes odd sizes
    "30fps_odd_offset": dict(duration=2.1, fps=30, size=(64, 48)),  # scaled to 298 x 224: crop x = 37
    "60fps_rotated_270": dict(duration=2.1, fps=60, size=(50, 38), rotation=270),
    "29.97fps_rotated_180": dict(duration=2.3, fps=29.97, size=(66, 50), rotation=180),
    "50fps_webm_no_stream_duration": dict(duration=2.1, fps=50, codec="libvpx-vp9"),
    "vfr_late_start_off_grid": dict(frame_times=[0.55, 0.6, 0.71, 0.9, 1.6, 1.65, 2.3, 2.4]),
}


@pytest.mark.parametrize("case", sorted(PIXEL_CASES))
def test_slowfast_windows_are_the_extractor_chain_bit_exact(tmp_path, case):
    """The windows the stream hands to SlowFast equal, bit for bit, the extractor's fps/scale/crop/rgb24 chain run
    by libavfilter over the whole video: the same frames, the same swscale pass (matrix, chroma siting, rounding)."""
    suffix = ".webm" if PIXEL_CASES[case].get("codec") == "libvpx-vp9" else ".mp4"
    path = str(videos.make_video(tmp_path / f"v{suffix}", **PIXEL_CASES[case]).path)
    _, windows, info = decode_kinds(path, None)
    expected = _hero_windows(path)
    assert windows.shape == expected.shape == (info.slowfast_total, 32, 224, 224, 3)
    assert (expected != expected[:1, :1]).any()  # the picture moves: a wrong frame would show
    np.testing.assert_array_equal(windows, expected)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torch

    from model.inference.features import ClipEncoder
    from world.slowfast_random import save_random_slowfast

    folder = tmp_path_factory.mktemp("weights")
    clip = folder / "clip_tiny.pt"
    torch.save(ClipEncoder.load(TINY, None, device="cpu", allow_random=True).model.state_dict(), clip)
    return str(clip), str(save_random_slowfast(folder / "slowfast_random.pyth", seed=18))


def _index(video_dir, index_dir, clip, *extra, env=None):
    return CliRunner().invoke(cli_main, ["index", str(video_dir), "--index", str(index_dir), "--clip-model", TINY,
                                         "--clip-pretrained", clip, *extra], env=env)


def _slowfast(index_dir) -> dict:
    with Library(index_dir) as lib:
        ids = {v["path"]: v["id"] for v in lib.videos(status="indexed")}
        stored = lib.features_many(list(ids.values()), ["slowfast"])
    return {path: stored[vid] for path, vid in ids.items() if vid in stored}


@pytest.fixture(scope="module")
def added(ray_session, tmp_path_factory, weights):
    """A CLIP index of two short videos, then `--features clip,slowfast` on it: (folder, index, snapshots, outputs)."""
    clip, sf_weights = weights
    root = tmp_path_factory.mktemp("videos")
    videos.make_video(root / "a.mp4", duration=3.0, fps=30, size=(64, 48))  # 2 SlowFast clips
    videos.make_video(root / "b.mp4", duration=1.5, fps=24, size=(48, 64))  # 1, padded
    index_dir = tmp_path_factory.mktemp("index") / "lib"
    first = _index(root, index_dir, clip)
    assert first.exit_code == 0, first.output
    clip_only = _snapshot(index_dir)
    second = _index(root, index_dir, clip, "--features", "clip,slowfast", "--slowfast-weights", sf_weights)
    return root, index_dir, clip_only, second


def test_adding_slowfast_computes_only_slowfast(added):
    _, index_dir, clip_only, second = added
    assert second.exit_code == 0, second.output
    assert "indexed 0," in second.output and "added 'slowfast' features to 2 indexed videos" in second.output
    _assert_same_index(_snapshot(index_dir), clip_only)  # CLIP rows, vectors and FAISS untouched
    status = library_status(index_dir)
    assert {k: r["videos"] for k, r in status["feature_kinds"].items()} == {"clip": 2, "slowfast": 2}
    text = CliRunner().invoke(cli_main, ["status", "--index", str(index_dir)]).output
    assert "features 'slowfast': 2304-d float16 by SlowFast-R50 8x8, 2 of 2 videos" in text


def test_stored_slowfast_equals_the_network_on_hero_frames(added, weights):
    from model.inference.slowfast_weights import build_slowfast
    import torch

    root, index_dir, _, _ = added
    stored = _slowfast(index_dir)
    model = build_slowfast(weights[1])
    for name in ("a.mp4", "b.mp4"):
        with torch.inference_mode():
            expected = model(sf.normalise(_hero_windows(root / name))).numpy()
        assert stored[name].shape == expected.shape == ({"a.mp4": 2, "b.mp4": 1}[name], 2304)
        np.testing.assert_allclose(stored[name], expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    with Library(index_dir) as lib:
        record = lib.meta()["feature_kinds"]["slowfast"]
    assert record["weights_path"] == weights[1] and record["layout"] == "pytorchvideo"
    assert record["weights"].startswith("slowfast_random.pyth sha256:") and len(record["weights"].split(":")[1]) == 64


def test_rerun_adds_nothing_and_new_videos_get_both_kinds(added, weights):
    root, index_dir, _, _ = added
    before = _slowfast(index_dir)
    again = _index(root, index_dir, weights[0])  # no --features, no --slowfast-weights: the recorded ones
    assert again.exit_code == 0 and "indexed 0, unchanged 2," in again.output and "added" not in again.output
    videos.make_video(root / "c.mp4", duration=1.0, fps=25)
    third = _index(root, index_dir, weights[0])
    assert third.exit_code == 0 and "indexed 1, unchanged 2," in third.output, third.output
    after = _slowfast(index_dir)
    assert sorted(after) == ["a.mp4", "b.mp4", "c.mp4"] and after["c.mp4"].shape == (1, 2304)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert "indexed 0, unchanged 3," in _index(root, index_dir, weights[0]).output


def test_missing_weights_is_one_line_exit_2_and_leaves_no_index(tmp_path, weights):
    videos.make_video(tmp_path / "v" / "a.mp4", duration=1.0)
    result = _index(tmp_path / "v", tmp_path / "idx", weights[0], "--features", "clip,slowfast",
                    env={"VMR_CACHE": str(tmp_path / "cache")})
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and "SLOWFAST_8x8_R50.pkl" in line and "PySlowFast model zoo" in line
    assert str(tmp_path / "cache" / "slowfast") in line
    assert not (tmp_path / "idx").exists()
    bad = _index(tmp_path / "v", tmp_path / "idx", weights[0], "--features", "clip,vgg")
    assert bad.exit_code == 2 and "known kinds are clip, slowfast" in bad.output


def test_weights_come_from_the_flag_the_record_or_the_cache(tmp_path, monkeypatch):
    from model.errors import WeightsNotFound
    from model.inference.slowfast_weights import find_slowfast_weights

    monkeypatch.setenv("VMR_CACHE", str(tmp_path))
    cached = tmp_path / "slowfast" / "SLOWFAST_8x8_R50.pkl"
    cached.parent.mkdir()
    cached.write_bytes(b"x")
    assert find_slowfast_weights() == str(cached)
    assert find_slowfast_weights(None, str(cached)) == str(cached)
    with pytest.raises(WeightsNotFound, match="are gone: pass --slowfast-weights FILE"):
        find_slowfast_weights(None, str(tmp_path / "moved.pkl"))
    with pytest.raises(WeightsNotFound, match="does not exist"):
        find_slowfast_weights(tmp_path / "nope.pkl")


@pytest.mark.slow
def test_kill_9_during_slowfast_ingest_resumes_to_the_clean_index(added, weights, tmp_path):
    """An ingest with SlowFast in another process (joined to this Ray), killed -9, then resumed: equal to the
    fixture's index (built by adding SlowFast to a CLIP index, then a new video with both kinds)."""
    import ray

    root, clean, _, _ = added
    if not (root / "c.mp4").exists():
        videos.make_video(root / "c.mp4", duration=1.0, fps=25)
        assert _index(root, clean, weights[0]).exit_code == 0
    expected, expected_sf = _snapshot(clean), _slowfast(clean)
    index_dir = tmp_path / "idx"
    cmd = [sys.executable, "-m", "cli", "index", str(root), "--index", str(index_dir), "--clip-model", TINY,
           "--clip-pretrained", weights[0], "--features", "clip,slowfast", "--slowfast-weights", weights[1],
           "--ray-address", ray.get_runtime_context().gcs_address]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_after = random.Random(os.getpid()).uniform(0.0, 6.0)  # seconds after the index file appears
    deadline, seen = time.monotonic() + 300, None
    while proc.poll() is None and time.monotonic() < deadline:
        if seen is None and (index_dir / "library.duckdb").is_file():
            seen = time.monotonic()
        if seen is not None and time.monotonic() - seen >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    resumed = _index(root, index_dir, weights[0], "--features", "clip,slowfast", "--slowfast-weights", weights[1])
    assert resumed.exit_code == 0, resumed.output
    _assert_same_index(_snapshot(index_dir), expected)
    got = _slowfast(index_dir)
    assert sorted(got) == sorted(expected_sf)
    for name, vectors in expected_sf.items():
        np.testing.assert_allclose(got[name], vectors, rtol=2e-3, atol=2e-3 * np.abs(vectors).max())
