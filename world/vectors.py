"""CLIP-like random clip vectors and text-like queries, with exact top-k ground truth (no video, no model).

Clip vectors of a video library share a modality mean, a topic, a video and a scene component plus per-clip noise,
with cosines calibrated to ViT-B/32 (unrelated images ~0.5, two clips of one video ~0.85-0.95, as the public
features of shared/data/real_video). Queries are *text-like*: a different modality mean (the CLIP modality gap)
plus the content of one scene plus noise, so they are not drawn from the base set and their best cosine is ~0.3,
as for real text->image queries. Used by the store's index tests and the coarse-index benchmark.

    clip_like_library(n, n_queries, seed) -> (vectors [n, DIM], ids [n], queries [Q, DIM])
    exact_top_k(vectors, ids, queries, k) -> ids [Q, k];  recall_at_k(found, truth) -> float
"""
from __future__ import annotations

import numpy as np

DIM = 512
K = 100
CLIPS_PER_VIDEO = 75  # 150-s videos at 2 s a clip, as QVHighlights
SCENES_PER_VIDEO = 5
# Squared weights of the components of an image vector (sum 1 before noise normalisation):
# modality mean, topic, video, scene, per-clip noise. Unrelated images: cos ~ W_MEAN = 0.5; same video ~0.88.
W_MEAN, W_TOPIC, W_VIDEO, W_SCENE, W_NOISE = 0.50, 0.15, 0.13, 0.10, 0.12
# Text queries: text modality mean, scene content, noise. cos(text mean, image mean) ~ 0.3 (modality gap).
Q_MEAN, Q_CONTENT, Q_NOISE, MEAN_COS = 0.55, 0.10, 0.35, 0.3


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clip_like_library(n: int, n_queries: int, seed: int = 0, dim: int = DIM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors f32 [n, dim] unit rows, ids int64 [n] (video*2**20 + clip), text-like queries f32 [Q, dim] unit rows)."""
    rng = np.random.default_rng(seed)
    n_videos = max(1, -(-n // CLIPS_PER_VIDEO))
    n_topics = max(8, n_videos // 20)
    g_img = _unit(rng.standard_normal(dim))
    other = _unit(rng.standard_normal(dim) - (rng.standard_normal(dim) @ g_img) * g_img)
    other = _unit(other - (other @ g_img) * g_img)
    g_txt = MEAN_COS * g_img + np.sqrt(1 - MEAN_COS ** 2) * other
    # A video's topic is a random mix of 2 base topics (a continuum, not clean clusters: harder for IVF).
    base = _unit(rng.standard_normal((n_topics, dim)))
    pick = rng.integers(0, n_topics, (n_videos, 2))
    mix = rng.dirichlet([1.0, 1.0], n_videos)
    topics = _unit(np.einsum("vk,vkd->vd", mix, base[pick])).astype(np.float32)
    video_topic = np.arange(n_videos)
    videos = _unit(rng.standard_normal((n_videos, dim))).astype(np.float32)
    scenes = _unit(rng.standard_normal((n_videos * SCENES_PER_VIDEO, dim))).astype(np.float32)

    clip_video = np.arange(n) // CLIPS_PER_VIDEO
    clip_idx = np.arange(n) % CLIPS_PER_VIDEO
    clip_scene = clip_video * SCENES_PER_VIDEO + clip_idx * SCENES_PER_VIDEO // CLIPS_PER_VIDEO
    vectors = np.empty((n, dim), np.float32)
    sq = np.sqrt
    for lo in range(0, n, 65536):  # chunks keep the temporaries small at 1e6 x 512
        hi = min(n, lo + 65536)
        v, s = clip_video[lo:hi], clip_scene[lo:hi]
        noise = _unit(rng.standard_normal((hi - lo, dim), dtype=np.float32))
        x = (sq(W_MEAN) * g_img.astype(np.float32) + sq(W_TOPIC) * topics[video_topic[v]]
             + sq(W_VIDEO) * videos[v] + sq(W_SCENE) * scenes[s] + sq(W_NOISE) * noise)
        vectors[lo:hi] = _unit(x)
    ids = (clip_video.astype(np.int64) << 20) + clip_idx

    target_scene = rng.integers(0, n_videos * SCENES_PER_VIDEO, n_queries)
    target_video = target_scene // SCENES_PER_VIDEO
    content = _unit(sq(W_TOPIC) * topics[video_topic[target_video]] + sq(W_VIDEO) * videos[target_video]
                    + sq(W_SCENE) * scenes[target_scene])
    q_noise = _unit(rng.standard_normal((n_queries, dim)))
    queries = _unit(sq(Q_MEAN) * g_txt + sq(Q_CONTENT) * content + sq(Q_NOISE) * q_noise).astype(np.float32)
    return vectors, ids, queries


def exact_top_k(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """Exact top-k ids [Q, k] by brute-force matmul (the ground truth recall is measured against)."""
    k = min(k, len(vectors))
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for lo in range(0, len(vectors), 262144):
        s = queries @ vectors[lo:lo + 262144].T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
        best_i = np.concatenate([best_i, ids[lo:lo + 262144][part]], 1)
        keep = np.argsort(-best_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth|."""
    return float(np.mean([len(np.intersect1d(f[f >= 0], t)) / len(t) for f, t in zip(found, truth)]))
