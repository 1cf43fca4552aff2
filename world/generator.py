"""Write a test-world library: small h264 videos where shapes appear at known times, plus their sentences.

Each video has a noisy dark background and a few events; an event is one object (colour, shape, position) that is
visible during [start, end) seconds, both on the 2-s clip grid. Events may overlap in time at different positions.
Within one library every object is used by at most one event while the vocabulary lasts (72 objects), so each
sentence has exactly one right moment in the library and corpus metrics have unambiguous ground truth.

Annotations use the QVHighlights jsonl fields: qid, query, vid (the file stem), duration, relevant_windows,
relevant_clip_ids, saliency_scores.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from world.scene import ALL_OBJECTS, FRAME_SIZE, WorldObject, render_frame

FPS = 2  # frames per second of the written videos; the 2-s clip samples (t = 0, 2, 4, ...) fall on frames
CLIP_SECONDS = 2


@dataclass
class WorldEvent:
    obj: WorldObject
    start: float  # seconds, on the 2-s grid
    end: float  # exclusive

    def visible(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass
class WorldVideo:
    vid: str
    duration: float
    background: int
    events: list[WorldEvent] = field(default_factory=list)

    def objects_at(self, t: float) -> list[WorldObject]:
        return [e.obj for e in self.events if e.visible(t)]


class ObjectPool:
    """Hands out objects, each once while the vocabulary lasts (then starts over: sentences become ambiguous)."""

    def __init__(self, rng: np.random.Generator, exclude: set[WorldObject] | None = None):
        self.rng = rng
        self.exclude = exclude or set()
        self._left: list[WorldObject] = []

    def take(self, avoid_positions: set[str]) -> WorldObject:
        if not self._left:
            self._left = [o for o in ALL_OBJECTS if o not in self.exclude]
            self.rng.shuffle(self._left)
        for i, obj in enumerate(self._left):
            if obj.position not in avoid_positions:
                return self._left.pop(i)
        return self._left.pop()  # all remaining at busy positions: the caller skips overlap then


def sample_video(rng: np.random.Generator, vid: str, duration: float, pool: ObjectPool,
                 max_events: int = 3, first_start: float = 0.0) -> WorldVideo:
    """Place up to ``max_events`` events after ``first_start``; about a third overlap the previous one."""
    video = WorldVideo(vid=vid, duration=float(duration), background=int(rng.integers(25, 60)))
    t = first_start + 2 * int(rng.integers(1, 8))
    for _ in range(max_events):
        length = 2 * int(rng.integers(4, 16))  # 8..30 s
        if t + length > duration:
            break
        busy = {e.obj.position for e in video.events if e.end > t}
        obj = pool.take(busy)
        if obj.position in busy:  # no free position: wait until the others end
            t = max(e.end for e in video.events)
            if t + length > duration:
                break
        video.events.append(WorldEvent(obj, float(t), float(t + length)))
        if rng.random() < 0.35 and length >= 12:  # the next event starts while this one is visible
            t = t + 2 * int(rng.integers(2, length // 2))
        else:
            t = t + length + 2 * int(rng.integers(2, 12))
    return video


def write_video(video: WorldVideo, path: Path, seed: int) -> None:
    """Encode ``video`` as h264 (yuv420p) at FPS frames/s with PyAV."""
    import av

    rng = np.random.default_rng(seed)
    n_frames = int(round(video.duration * FPS))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width = stream.height = FRAME_SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for k in range(n_frames):
            rgb = render_frame(video.objects_at(k / FPS), rng, background=video.background)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def annotations(videos: list[WorldVideo], first_qid: int = 0) -> list[dict]:
    """One annotation per event, in QVHighlights' jsonl fields."""
    rows = []
    for video in videos:
        for event in video.events:
            clip_ids = list(range(int(event.start // CLIP_SECONDS), int(event.end // CLIP_SECONDS)))
            # Edge clips are transitions: rated lower, as QVHighlights annotators rate partial views.
            scores = [[2, 2, 2] if i in (clip_ids[0], clip_ids[-1]) else [4, 4, 4] for i in clip_ids]
            rows.append({"qid": first_qid + len(rows), "query": event.obj.sentence(), "vid": video.vid,
                         "duration": video.duration, "relevant_windows": [[event.start, event.end]],
                         "relevant_clip_ids": clip_ids, "saliency_scores": scores})
    return rows


def build_world(out_dir: str | Path, n_videos: int = 16, seed: int = 0, long_videos: int = 1,
                min_duration: int = 60, max_duration: int = 150, long_duration: int = 600,
                prefix: str = "world", exclude: set[WorldObject] | None = None,
                write: bool = True) -> tuple[list[WorldVideo], list[dict]]:
    """Write ``n_videos`` short videos (+ ``long_videos`` of ``long_duration`` s whose events all lie past 150 s)
    into ``out_dir/videos`` and their annotations into ``out_dir/annotations.jsonl``.

    Returns: (videos, annotation rows). ``write=False`` only samples (for synthetic-vector benchmarks).
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    pool = ObjectPool(rng, exclude)
    videos = []
    for i in range(n_videos):
        duration = 2 * int(rng.integers(min_duration // 2, max_duration // 2 + 1))
        videos.append(sample_video(rng, f"{prefix}_{seed}_{i:04d}", duration, pool))
    for j in range(long_videos):
        first = 160.0 + 2 * int(rng.integers(0, max(1, (long_duration - 160) // 6)))  # past 150 s, room left
        videos.append(sample_video(rng, f"{prefix}_{seed}_long{j}", long_duration, pool, max_events=3,
                                   first_start=first))
    rows = annotations(videos)
    if write:
        (out_dir / "videos").mkdir(parents=True, exist_ok=True)
        for i, video in enumerate(videos):
            write_video(video, out_dir / "videos" / f"{video.vid}.mp4", seed=seed * 100_003 + i)
        write_jsonl(rows, out_dir / "annotations.jsonl")
    return videos, rows


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
