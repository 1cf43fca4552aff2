"""Corpus metrics of library search (video corpus moment retrieval, VCMR) on annotated queries.

- video recall@k: the ground-truth video is among the first k distinct videos of the coarse candidate ranking;
- VCMR R@k, IoU≥t: one of the top k moments of the final ranking lies in the ground-truth video and overlaps one
  of its ground-truth windows by temporal IoU ≥ t (the TVR / VCMR convention);
- per-stage latency p50/p95 (seconds) from the engine's stage timings.

``corpus_metrics(engine, annotations, mode)`` with mode "coarse" (no rerank), "rerank" (coarse candidates +
reranker), "exhaustive" (the reranker over every window of every video: the single-video tool run over the
whole library, scored with the same final-score rule) or "exhaustive_pruned" (the same top-10 as "exhaustive",
computed without reranking windows that provably cannot reach it: exhaustive quality at a fraction of its cost).
"""
from __future__ import annotations

import numpy as np

KS = (1, 5, 10)
IOUS = (0.5, 0.7)
EXHAUSTIVE_ARG = {"coarse": False, "rerank": False, "exhaustive": True, "exhaustive_pruned": "pruned"}
LATENCY_KEYS = ("text_encode", "coarse", "windows", "rerank", "merge", "total")


def _iou(a, b) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def moment_hits(results: list[dict], gt_video: int, gt_windows: list, iou: float) -> list[bool]:
    """Per ranked moment: does it match the ground truth at this IoU?"""
    return [r["video_id"] == gt_video and any(_iou((r["start"], r["end"]), w) >= iou for w in gt_windows)
            for r in results]


def percentiles(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    if len(arr) == 0:
        return {"p50": None, "p95": None}
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95))}


def corpus_metrics(engine, annotations: list[dict], mode: str = "rerank", ks=KS, ious=IOUS,
                   warmup: int = 1, keep_results: list | None = None, **search_kw) -> dict:
    """Metrics of ``engine`` (retriever.search.SearchEngine) over ``annotations`` (jsonl rows with vid,
    query, relevant_windows). Percentages in [0, 100]; latencies in seconds. keep_results: a list that receives
    each annotation's ranked results, in order (to compare two modes without searching again)."""
    if mode not in EXHAUSTIVE_ARG:
        raise ValueError(f"unknown mode {mode!r}")
    exhaustive = EXHAUSTIVE_ARG[mode]
    rerank = mode != "coarse"
    if rerank and engine.reranker is None:
        raise ValueError(f"mode {mode!r} needs a reranker checkpoint")
    for ann in annotations[:warmup]:  # first-call costs (lazy imports, FAISS file load) are not query latency
        engine.search(ann["query"], top_k=max(ks), exhaustive=exhaustive, rerank=rerank)
    vid_of = {}
    with engine.library.session():
        for ann in annotations:
            if ann["vid"] not in vid_of:
                vid_of[ann["vid"]] = engine.library.resolve_vid(ann["vid"])
    hits = {(k, t): 0 for k in ks for t in ious}
    video_hits = {k: 0 for k in ks}
    timings = {key: [] for key in LATENCY_KEYS}
    for ann in annotations:
        gt_video = vid_of[ann["vid"]]
        results = engine.search(ann["query"], top_k=max(ks), exhaustive=exhaustive, rerank=rerank,
                                **search_kw)
        if keep_results is not None:
            keep_results.append(results)
        for key in LATENCY_KEYS:
            timings[key].append(engine.last_timings.get(key, 0.0))
        videos = list(dict.fromkeys(engine.last_window_videos))
        for k in ks:
            video_hits[k] += gt_video in videos[:k]
        for t in ious:
            ok = moment_hits(results, gt_video, ann["relevant_windows"], t)
            for k in ks:
                hits[(k, t)] += any(ok[:k])
    n = max(len(annotations), 1)
    out = {"mode": mode, "queries": len(annotations)}
    out.update({f"video_R@{k}": 100.0 * video_hits[k] / n for k in ks})
    out.update({f"VCMR_R{k}@{t}": 100.0 * hits[(k, t)] / n for k in ks for t in ious})
    out["latency"] = {key: percentiles(v) for key, v in timings.items()}
    return out


def describe_corpus_metrics(rows: list[dict]) -> str:
    """Side-by-side table of several modes' metrics."""
    keys = [k for k in rows[0] if k.startswith(("video_R", "VCMR"))]
    lines = [f"{'metric':<16}" + "".join(f"{r['mode']:>12}" for r in rows)]
    for k in keys:
        lines.append(f"{k:<16}" + "".join(f"{r[k]:>12.1f}" for r in rows))
    lines.append(f"{'p50 total (ms)':<16}" + "".join(f"{1000 * r['latency']['total']['p50']:>12.1f}" for r in rows))
    return "\n".join(lines)
