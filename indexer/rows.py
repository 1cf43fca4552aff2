"""The rows one video's clip vectors become: its clips' spans and its pseudo-events (spans, clips, embeddings).

One function for every writer of an index (the ingest, and the test world's synthetic libraries), so that a
library made without decoding stores its events exactly as `vmr index` would.
"""
from __future__ import annotations

import numpy as np

from model.spans import clip_bounds, clip_to_seconds


def video_rows(vectors: np.ndarray, duration: float, clip_seconds: float):
    """Clip vectors float32 [N, D] (L2-normalised) of one video of ``duration`` seconds -> (clip spans float64
    [N, 2] seconds, event spans float64 [E, 2] seconds, event clips int64 [E, 2] first..last inclusive, event
    embeddings float32 [E, D]).

    Clip i covers [i, i + 1) x clip_seconds, the last one ending at the video's end. Events come from
    model.pseudo_events: event i covers clips b_i .. b_{i+1}-1 (the last one through the final clip, ending at the
    video's end); its embedding is the normalised mean of its clips.
    """
    import torch

    # lazy: torch: rows are also built where torch is not loaded
    from model.pseudo_events import pseudo_event_clip_spans

    n = len(vectors)
    spans = pseudo_event_clip_spans(torch.from_numpy(vectors))
    seconds, clips, embs = [], [], []
    for i, (a, b) in enumerate(spans):
        last = i == len(spans) - 1
        end_clip = n - 1 if last else max(a, b - 1)
        seconds.append((clip_to_seconds(a, clip_seconds), duration if last else clip_to_seconds(b, clip_seconds)))
        clips.append((a, end_clip))
        mean = vectors[a: end_clip + 1].mean(axis=0)
        embs.append(mean / max(np.linalg.norm(mean), 1e-12))
    return (clip_bounds(n, clip_seconds, duration), np.asarray(seconds, np.float64), np.asarray(clips, np.int64),
            np.asarray(embs, np.float32).reshape(len(spans), vectors.shape[1]))
