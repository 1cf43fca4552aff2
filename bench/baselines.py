"""The exhaustive baselines that library search is measured against: the reranker over every window of every video.

- full: every half-overlapping window (``model.spans.tile_windows``) of every indexed video is scored as the coarse
  stage scores its candidates and reranked; the moments are ranked by the product's final-score rule and merge
  (``retriever.search.rank_moments``). This is a single-video tool run over the whole library; its latency grows
  linearly with the library.
- pruned: the same top-k without reranking the windows that provably cannot reach it (``pruned_moments``), so its
  QUALITY can be measured on every query at 10^4 videos where the full baseline takes ~1 min a query.

    python -m bench.baselines INDEX --checkpoint CKPT --queries ANNOTATIONS.jsonl [--limit 4]

checks on an index that the pruned baseline returns exactly the full one's top-10 while reranking fewer windows
(exit status 1 if not).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from model.spans import tile_windows
from retriever.coarse import features_of, score_window, with_spans
from retriever.merge import Moment, ScoreRule, nms_merge
from retriever.search import STAGES, SearchResult, rank_moments
from retriever.windows import MAX_WINDOW_CLIPS, Window


def video_table(library) -> dict[int, dict]:
    """video_id -> row (path, duration, n_clips) of the searchable (indexed) videos."""
    return {int(r["id"]): r for r in library.videos() if r.get("status", "indexed") == "indexed"}


def preload_features(engine) -> dict[int, tuple]:
    """Every indexed video's (clip embeddings, pseudo-event clip spans), read once for many exhaustive queries (no
    writer runs beside a benchmark, so they cannot go stale)."""
    with engine.library.session():
        return features_of(engine.library, list(video_table(engine.library)), engine.clip_seconds)


def all_windows(library, query: np.ndarray, clip_seconds: float, videos: dict[int, dict] | None = None,
                features: dict | None = None) -> list[Window]:
    """Every half-overlapping window of every indexed video, scored as the coarse stage scores its candidates.

    features: optional preloaded ``features_of`` per video id (else each video is read on its own, as a
    single-video tool run over the library would).
    """
    videos = video_table(library) if videos is None else videos
    windows = []
    for vid, video in videos.items():
        if features is not None and vid in features:
            feats, spans = features[vid]
        else:
            feats, spans = with_spans(library.clip_embeddings(vid), library.events(vid), clip_seconds)
        if len(feats) == 0:
            continue
        scores = feats @ query
        for first, end in tile_windows(len(feats), MAX_WINDOW_CLIPS):
            window = Window(vid, video["path"], float(video["duration"]), first, end - first, clip_seconds)
            windows.append(score_window(window, feats, scores, spans))
    windows.sort(key=lambda w: -w.score)
    return windows


def pruned_moments(reranker, windows: list[Window], tokens: np.ndarray, top_k: int,
                   rule: ScoreRule | None = None, batch: int = 64) -> list[Moment]:
    """Reranked moments of ``windows`` sufficient for the exact final top_k (scored), skipping hopeless windows.

    A moment's score is model score + w * coarse (``rule``, default the reranker's) with a model score ≤ 1 (a
    probability or a mean of them) and coarse the mean
    cosine of clips inside its window, so ≤ the window's best clip cosine: 1 + w * max(clip_scores) bounds every
    moment a window can give. Windows are reranked in order of that bound; once the next bound is below the
    top_k-th score after the merge, no remaining window can enter or change the top_k (NMS only removes a moment
    for a better one of the same video). So nms_merge(result, top_k) equals the merge over all windows, ties aside.
    """
    rule = rule or reranker.score_rule
    coarse_weight = rule.coarse_weight
    if coarse_weight < 0:
        raise ValueError("pruning needs a non-negative coarse weight")
    order = sorted(windows, key=lambda w: -float(np.max(w.clip_scores)))
    moments: list[Moment] = []
    for start in range(0, len(order), batch):
        if start and len(moments) >= top_k:
            kept = nms_merge(moments, top_k=top_k)
            if len(kept) >= top_k and 1.0 + coarse_weight * float(np.max(order[start].clip_scores)) < kept[-1].score:
                break
        new = reranker.moments(order[start: start + batch], tokens)
        for m in new:
            m.score = rule.score(m)
        moments += new
    return moments


def exhaustive_search(engine, query: str, top_k: int = 10, pruned: bool = False, features: dict | None = None,
                      rule: ScoreRule | None = None) -> SearchResult:
    """The baseline's answer to ``query`` with the engine's CLIP and reranker, timed per stage as the engine's own
    search: "coarse" is reading the video table, "windows" scoring every window."""
    if engine.reranker is None:
        raise ValueError("the exhaustive baseline needs a reranker checkpoint")
    timings = dict.fromkeys(STAGES, 0.0)
    t0 = time.perf_counter()
    pooled, tokens = engine.encode_query(query)
    timings["text_encode"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    with engine.library.session():
        videos = video_table(engine.library)
        t2 = time.perf_counter()
        windows = all_windows(engine.library, pooled, engine.clip_seconds, videos, features)
        t3 = time.perf_counter()
    timings["coarse"], timings["windows"] = t2 - t1, t3 - t2
    if pruned:
        moments = pruned_moments(engine.reranker, windows, tokens, top_k, rule)
    else:
        moments = engine.reranker.moments(windows, tokens)
    t4 = time.perf_counter()
    ranked = rank_moments(moments, top_k, rule or engine.reranker.score_rule)
    timings["rerank"], timings["merge"] = t4 - t3, time.perf_counter() - t4
    timings["total"] = time.perf_counter() - t0
    return SearchResult(ranked, timings, [w.video_id for w in windows])


def check_pruned(engine, queries: list[str], top_k: int = 10) -> list[str]:
    """Problems found (empty: none): the pruned baseline must return the full one's top_k on every query, and
    rerank fewer windows on a small top_k (top 3, batches of 2) than there are windows."""
    problems = []
    for query in queries:
        full = exhaustive_search(engine, query, top_k).moments
        if exhaustive_search(engine, query, top_k, pruned=True).moments != full:
            problems.append(f"pruned top-{top_k} differs from the full baseline for {query!r}")
    pooled, tokens = engine.encode_query(queries[0])
    with engine.library.session():
        windows = all_windows(engine.library, pooled, engine.clip_seconds)
    seen = []
    real = engine.reranker.moments
    engine.reranker.moments = lambda ws, t: seen.extend(ws) or real(ws, t)
    try:
        pruned = pruned_moments(engine.reranker, windows, tokens, top_k=3, batch=2)
    finally:
        engine.reranker.moments = real
    full = real(windows, tokens)
    for m in full:
        m.score = engine.reranker.score_rule.score(m)
    key = lambda ms: [(m.video_id, m.start, m.end, round(m.score, 6)) for m in ms]  # noqa: E731
    if key(nms_merge(pruned, top_k=3)) != key(nms_merge(full, top_k=3)):
        problems.append("pruned_moments top-3 differs from the merge over every window")
    if len(seen) >= len(windows):
        problems.append(f"pruning reranked all {len(windows)} windows")
    return problems


def main() -> None:
    from retriever.search import SearchEngine

    parser = argparse.ArgumentParser(description="Check that the pruned exhaustive baseline equals the full one.")
    parser.add_argument("index")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--queries", required=True, help="annotations jsonl (field 'query')")
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with open(args.queries) as f:
        queries = [json.loads(line)["query"] for line in f if line.strip()][: args.limit]
    with SearchEngine(args.index, checkpoint=args.checkpoint, device=args.device) as engine:
        problems = check_pruned(engine, queries)
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    print(f"pruned baseline {'differs' if problems else 'identical'} on {len(queries)} queries")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
