"""Test-world libraries without video files: clip vectors computed from the scene, written through store.Library.

Decoding 10^4 videos is out of reach on a laptop-sized machine, so for library-scale tests and benchmarks each
distinct frame content (the set of visible objects) is rendered once, encoded with the world CLIP, and every clip
showing that content gets that embedding plus a little Gaussian noise (re-normalised), standing in for the
per-frame jitter and compression of real decoded frames. Clip and event rows are made by the same function the
indexer uses (indexer.rows). TEST WORLD ONLY.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from indexer.rows import video_rows
from store.clip_source import CLIPSource
from store.library import Library
from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS
from world.generator import CLIP_SECONDS, ObjectPool, WorldVideo, annotations, sample_video
from world.scene import ALL_OBJECTS, render_frame

CLIP_NOISE = 0.03  # std of the per-dimension noise added to a clip's state embedding (before re-normalising)


class StateEmbedder:
    """Embeddings of frame contents (sorted tuples of objects), rendered and encoded once each."""

    def __init__(self, encoder, seed: int = 0, renders: int = 2):
        self.encoder = encoder
        self.rng = np.random.default_rng(seed)
        self.renders = renders
        self.cache: dict[tuple, np.ndarray] = {}

    def __call__(self, objects) -> np.ndarray:
        key = tuple(sorted(objects, key=lambda o: o.position))
        if key not in self.cache:
            frames = [self.encoder.preprocess_frame(render_frame(list(key), self.rng, background=40))
                      for _ in range(self.renders)]
            emb = self.encoder.encode_images(torch.stack(frames)).mean(0)
            self.cache[key] = (emb / np.linalg.norm(emb)).astype(np.float32)
        return self.cache[key]


def clip_vectors(video: WorldVideo, embed: StateEmbedder, rng: np.random.Generator,
                 noise: float = CLIP_NOISE) -> np.ndarray:
    """np.float32 [T, D]: one vector per 2-s clip (T = duration / 2), sampled at t = 2i."""
    n = max(1, int(round(video.duration / CLIP_SECONDS)))
    base = np.stack([embed(video.objects_at(i * CLIP_SECONDS)) for i in range(n)])
    vecs = base + rng.normal(0, noise, base.shape).astype(np.float32)
    return (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)


def write_library(index_dir, videos: list[WorldVideo], encoder, seed: int = 0, progress: bool = False,
                  embed: StateEmbedder | None = None, root: str = "synthetic") -> None:
    """An index at ``index_dir`` holding ``videos`` as synthetic clip vectors (paths ``<vid>.mp4``); an existing
    one gets them added. ``embed``: a StateEmbedder to share with an earlier write (one frame content, one
    embedding across the writes); ``root``: the folder it stands for (libraries of other roots get other video
    ids, store.ids)."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    embed = embed or StateEmbedder(encoder, seed)
    with Library(index_dir, read_only=False) as lib:
        # Synthetic libraries are world libraries: queries are encoded with the world CLIP (``encoder``).
        lib.prepare(encoder.model_id, encoder.embed_dim, root=root, clip_seconds=CLIP_SECONDS,
                    clip_source=CLIPSource(str(WORLD_CLIP_CONFIG), str(WORLD_CLIP_WEIGHTS)).to_meta())
        ids = lib.add_pending([(f"{v.vid}.mp4", 0, 0.0) for v in videos])
        with lib.session():
            for v in tqdm(videos, desc="synthetic library", disable=not progress):
                vecs = clip_vectors(v, embed, rng)
                clip_spans, ev_secs, ev_clips, ev_vecs = video_rows(vecs, v.duration, CLIP_SECONDS)
                info = {"size": 0, "mtime": 0.0, "content_hash": v.vid, "duration": v.duration, "fps": 2.0,
                        "width": 64, "height": 64}
                lib.commit_video(ids[f"{v.vid}.mp4"], info, clip_spans, vecs, ev_secs, ev_clips, ev_vecs)
        lib.save_faiss(lib.open_faiss(force_rebuild=True))


def split_objects(rng: np.random.Generator) -> tuple[set, set]:
    """(target objects, distractor objects): half of the vocabulary each, so a target's sentence names objects
    no distractor shows."""
    objects = list(ALL_OBJECTS)
    rng.shuffle(objects)
    return set(objects[: len(objects) // 2]), set(objects[len(objects) // 2:])


def random_videos(rng: np.random.Generator, prefix: str, count: int, objects: set) -> list:
    pool = ObjectPool(rng, exclude=set(ALL_OBJECTS) - objects)
    return [sample_video(rng, f"{prefix}{i:05d}", 2 * int(rng.integers(30, 76)), pool) for i in range(count)]


def target_libraries(work, n_videos: int, encoder, seed: int, n_targets: int = 12):
    """Libraries of ``n_videos`` whose queries are unambiguous, one after another: (index dir, query annotations)
    (bench.search's held-out libraries; world.train_reranker's ranking-rule fit, on other seeds).

    The distractor videos of a size are written once; each library is a copy of them plus its own
    ``n_targets`` target videos (new placements and sentences from the target half of the vocabulary), one
    frame content one embedding across all of them. Writing 10^4 distractors per library (~9 libraries for
    200 queries) would take ~an hour on 2 shared cores; copying them takes seconds."""
    import shutil

    work = Path(work)
    base_seed = seed * 100003 + n_videos * 101
    rng = np.random.default_rng(base_seed)
    target_objects, distractor_objects = split_objects(rng)
    embed = StateEmbedder(encoder, base_seed)
    n_targets = min(n_targets, n_videos)
    distractors = work / "distractors"
    videos = random_videos(rng, "d", n_videos - n_targets, distractor_objects)
    if not (distractors / "done").is_file():
        write_library(distractors, videos, encoder, seed=base_seed, progress=n_videos >= 1000, embed=embed)
        (distractors / "done").write_text(f"{n_videos} {seed}\n")
    else:  # a kept work dir holds them already: only replay the embedder, so the targets' frames embed the same
        for v in videos:
            clip_vectors(v, embed, np.random.default_rng(0))
    for k in itertools.count():
        index = work / f"library{k}"
        if index.exists():
            shutil.rmtree(index)
        shutil.copytree(distractors, index)
        lib_rng = np.random.default_rng(base_seed + 1 + k)
        targets = random_videos(lib_rng, "t", n_targets, target_objects)
        write_library(index, targets, encoder, seed=base_seed + 1 + k, embed=embed)
        yield index, annotations(targets)
        shutil.rmtree(index)
