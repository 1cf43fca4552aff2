"""Corpus metrics of library search (video corpus moment retrieval, VCMR) on annotated sentences.

- video recall@k: the ground-truth video is among the first k distinct videos of the coarse candidate ranking;
- VCMR R@k, IoU≥t: one of the top k moments of the final ranking lies in the ground-truth video and overlaps one
  of its ground-truth windows by temporal IoU ≥ t (the TVR / VCMR convention; retriever.vcmr);
- per-stage latency p50/p95 (seconds) from the search's stage timings.

The search under test is any callable ``search(query, top_k) -> retriever.search.SearchResult``: the engine's own
search (coarse alone or coarse + rerank) for the demo and the tests, the exhaustive baselines in bench/.
"""
from __future__ import annotations

import numpy as np

from retriever.vcmr import vcmr_recall

KS = (1, 5, 10)
IOUS = (0.5, 0.7)
LATENCY_KEYS = ("text_encode", "coarse", "windows", "rerank", "merge", "total")


def percentiles(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    if len(arr) == 0:
        return {"p50": None, "p95": None}
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95))}


def corpus_metrics(search, annotations: list[dict], resolve_vid, mode: str, ks=KS, ious=IOUS, warmup: int = 1,
                   keep_results: list | None = None) -> dict:
    """Metrics of ``search`` over ``annotations`` (jsonl rows with vid, query, relevant_windows).

    resolve_vid: annotation vid -> index video id (``Library.resolve_vid``); mode: the row's name in the report.
    Percentages in [0, 100]; latencies in seconds. keep_results: a list that receives each annotation's ranked
    moments, in order (to compare two searches without searching again)."""
    for ann in annotations[:warmup]:  # first-call costs (lazy imports, FAISS file load) are not query latency
        search(ann["query"], max(ks))
    vid_of = {ann["vid"]: resolve_vid(ann["vid"]) for ann in annotations}
    judged = []  # (ranked moments, gt video, gt windows) per annotation
    video_hits = {k: 0 for k in ks}
    timings = {key: [] for key in LATENCY_KEYS}
    for ann in annotations:
        gt_video = vid_of[ann["vid"]]
        result = search(ann["query"], max(ks))
        if keep_results is not None:
            keep_results.append(result.moments)
        for key in LATENCY_KEYS:
            timings[key].append(result.timings.get(key, 0.0))
        videos = list(dict.fromkeys(result.window_videos))
        for k in ks:
            video_hits[k] += gt_video in videos[:k]
        judged.append((result.moments, gt_video, ann["relevant_windows"]))
    n = max(len(annotations), 1)
    out = {"mode": mode, "queries": len(annotations)}
    out.update({f"video_R@{k}": 100.0 * video_hits[k] / n for k in ks})
    out.update(vcmr_recall(judged, ks, ious))
    out["latency"] = {key: percentiles(v) for key, v in timings.items()}
    return out


def engine_metrics(engine, annotations: list[dict], mode: str, **kw) -> dict:
    """``corpus_metrics`` of a ``SearchEngine``'s own search: mode "coarse" (no rerank) or "rerank"."""
    if mode not in ("coarse", "rerank"):
        raise ValueError(f"unknown mode {mode!r}")
    if mode == "rerank" and engine.reranker is None:
        raise ValueError("mode 'rerank' needs a reranker checkpoint")
    rule = kw.pop("rule", None)  # a retriever.merge.ScoreRule other than the checkpoint's
    extra = {} if rule is None else {"rule": rule}

    def search(query, top_k):
        return engine.search(query, top_k=top_k, rerank=mode == "rerank", **extra)

    with engine.library.session():  # one read connection for all of them (no writer runs beside a benchmark)
        return corpus_metrics(search, annotations, engine.library.resolve_vid, mode, **kw)


def describe_corpus_metrics(rows: list[dict]) -> str:
    """Side-by-side table of several modes' metrics."""
    keys = [k for k in rows[0] if k.startswith(("video_R", "VCMR"))]
    lines = [f"{'metric':<16}" + "".join(f"{r['mode']:>12}" for r in rows)]
    for k in keys:
        lines.append(f"{k:<16}" + "".join(f"{r[k]:>12.1f}" for r in rows))
    lines.append(f"{'p50 total (ms)':<16}" + "".join(f"{1000 * r['latency']['total']['p50']:>12.1f}" for r in rows))
    return "\n".join(lines)
