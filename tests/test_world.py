"""The synthetic test world: generated videos hold what their annotations say, and the world CLIP aligns them."""
from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS
from world.generator import build_world, read_jsonl
from world.scene import ALL_OBJECTS, COLORS, POSITION_X, render_frame


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    videos, rows = build_world(out, n_videos=3, seed=3, long_videos=1, long_duration=300)
    return out, videos, rows


@pytest.fixture(scope="module")
def encoder():
    from model.inference.features import ClipEncoder

    return ClipEncoder.load(str(WORLD_CLIP_CONFIG), str(WORLD_CLIP_WEIGHTS), device="cpu")


def test_annotations_match_videos(world):
    out, videos, rows = world
    assert read_jsonl(out / "annotations.jsonl") == rows
    assert len(rows) == sum(len(v.events) for v in videos) >= 6
    assert len({r["query"] for r in rows}) == len(rows)  # each sentence names one moment in the library
    for r in rows:
        st, ed = r["relevant_windows"][0]
        assert 0 <= st < ed <= r["duration"] and st % 2 == 0 and ed % 2 == 0
        assert r["relevant_clip_ids"] == list(range(int(st // 2), int(ed // 2)))
    long_rows = [r for r in rows if "long" in r["vid"]]
    assert long_rows and all(r["relevant_windows"][0][0] >= 150 for r in long_rows)


def test_decoded_frames_show_the_event(world):
    """The frame sampled at an event's middle clip shows its colour at its position; before the event it does not."""
    out, videos, _ = world
    video = videos[0]
    event = video.events[0]
    with av.open(str(out / "videos" / f"{video.vid}.mp4")) as container:
        stream = container.streams.video[0]
        frames = {round(float(f.pts * stream.time_base), 2): f.to_ndarray(format="rgb24") for f in container.decode(stream)}
    assert abs(max(frames) + 0.5 - video.duration) < 1e-6
    mid = 2 * ((event.start + event.end) // 4)
    x = POSITION_X[event.obj.position]
    colour = np.array(COLORS[event.obj.color], dtype=float)
    # the centre pixel of the object (all four shapes cover their centre)
    assert np.abs(frames[mid][30:35, x - 2:x + 3].reshape(-1, 3).mean(0) - colour).max() < 40
    if not video.objects_at(event.start - 2):
        assert np.abs(frames[event.start - 2][30:35, x - 2:x + 3].reshape(-1, 3).mean(0) - colour).max() > 80


def test_world_clip_weights_are_small_and_load(encoder):
    assert WORLD_CLIP_WEIGHTS.stat().st_size < 5e6
    assert encoder.model_id == "world_clip:world_clip.pt"
    assert encoder.embed_dim == 32 and encoder.text_width == 32


def test_world_clip_aligns_sentences_and_frames(encoder):
    """Rendered single-object frames retrieve their own sentence among all 72 (top-1 for >= 90% of objects)."""
    rng = np.random.default_rng(11)
    frames = torch.stack([encoder.preprocess_frame(render_frame([o], rng)) for o in ALL_OBJECTS])
    img = encoder.encode_images(frames)
    txt = encoder.encode_text([o.sentence() for o in ALL_OBJECTS])
    top1 = (img @ txt.T).argmax(1)
    assert (top1 == np.arange(len(ALL_OBJECTS))).mean() >= 0.9
    tokens = encoder.encode_text_tokens([ALL_OBJECTS[0].sentence()])[0]
    assert tokens.shape == (len(ALL_OBJECTS[0].sentence().split()) + 2, encoder.text_width)
