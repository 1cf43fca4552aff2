"""The exhaustive baselines that library search is measured against: the reranker over every window of every video.

- full: every half-overlapping window (``model.spans.tile_windows``) of every indexed video is scored as the coarse
  stage scores its candidates and reranked; the moments are ranked by the product's final-score rule and merge
  (``retriever.search.rank_moments``). This is a single-video tool run over the whole library; its latency grows
  linearly with the library.
- pruned: the same top-k without reranking the windows that provably cannot reach it (``pruned_moments``), so its
  QUALITY can be measured on every query at 10^4 videos where the full baseline takes ~1 min a query.

    python -m bench.baselines INDEX --checkpoint CKPT --queries ANNOTATIONS.jsonl [--limit 4]

checks on an index that the pruned baseline returns exactly the full one's top-10, under the checkpoint's ranking rule
and a coarse-led one, and that it reranks fewer windows where the bounds allow (exit status 1 if not).
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

# A coarse weight under which windows' bounds differ enough for pruning to skip some (fit_score's grid reaches it).
COARSE_LED = 16.0


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


def window_bound(window: Window, rule: ScoreRule) -> float:
    """The best ranking score any reranked moment of ``window`` can get under ``rule``.

    score = model score + w * coarse (retriever.merge.ScoreRule). Every model score is at most 1 (confidence is a
    probability, span saliency a mean of sigmoids, "both" their geometric mean), and a moment's coarse score is
    the mean cosine of some of the window's clips, so between the window's lowest and highest clip cosine.
    """
    w = rule.coarse_weight
    return 1.0 + max(w * float(np.max(window.clip_scores)), w * float(np.min(window.clip_scores)))


def pruned_moments(reranker, windows: list[Window], tokens: np.ndarray, top_k: int,
                   rule: ScoreRule | None = None, batch: int = 64) -> tuple[list[Moment], int]:
    """(reranked moments of ``windows`` sufficient for the exact final top_k, number of windows reranked).

    Windows are reranked in order of their ``window_bound``; once the next bound is below the top_k-th score after
    the merge, no remaining window can enter or change the top_k (NMS only removes a moment for a better one of the
    same video). The moments come back in the order of ``windows`` (the full baseline's order), so moments with
    equal scores meet the merge in the same order as there: nms_merge(result, top_k) equals the merge over every
    window, ties included. What this saves depends on the rule: with a small coarse weight every bound is about 1,
    above any real score, and every window gets reranked.
    """
    rule = rule or reranker.score_rule
    position = {(w.video_id, w.start, w.end): i for i, w in enumerate(windows)}
    order = sorted(windows, key=lambda w: -window_bound(w, rule))
    moments: list[Moment] = []
    done = 0
    for done in range(0, len(order), batch):
        if done and len(moments) >= top_k:
            kept = nms_merge(moments, top_k=top_k)
            if len(kept) >= top_k and window_bound(order[done], rule) < kept[-1].score:
                break
        new = reranker.moments(order[done: done + batch], tokens)
        for m in new:
            m.score = rule.score(m)
        moments += new
    else:
        done = len(order)
    moments.sort(key=lambda m: position[(m.video_id, *m.window)])  # stable: a window's moments keep their order
    return moments, done


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
        moments, reranked = pruned_moments(engine.reranker, windows, tokens, top_k, rule)
    else:
        moments, reranked = engine.reranker.moments(windows, tokens), len(windows)
    t4 = time.perf_counter()
    ranked = rank_moments(moments, top_k, rule or engine.reranker.score_rule)
    timings["rerank"], timings["merge"] = t4 - t3, time.perf_counter() - t4
    timings["total"] = time.perf_counter() - t0
    return SearchResult(ranked, timings, [w.video_id for w in windows],
                        rerank_depth={"windows": len(windows), "reranked": reranked})


def check_pruned(engine, queries: list[str], top_k: int = 10) -> tuple[list[str], list[str]]:
    """(problems, notes): the pruned baseline must return the full one's top_k on every query, under the
    checkpoint's ranking rule and under a coarse-led one (coarse weight ``COARSE_LED``, where bounds differ between
    windows), and under the coarse-led rule rerank fewer windows than there are on a small top_k (top 3, batches of
    2). Notes: windows reranked per query and rule."""
    problems, notes = [], []
    own = engine.reranker.score_rule
    for rule in (own, ScoreRule(own.model, COARSE_LED)):
        counts = []
        for query in queries:
            full = exhaustive_search(engine, query, top_k, rule=rule)
            pruned = exhaustive_search(engine, query, top_k, pruned=True, rule=rule)
            if pruned.moments != full.moments:
                problems.append(f"pruned top-{top_k} differs from the full baseline for {query!r} under {rule}")
            counts.append(f"{pruned.rerank_depth['reranked']}/{full.rerank_depth['windows']}")
        notes.append(f"{rule}: windows reranked by the pruned top-{top_k} {', '.join(counts)}")
    rule = ScoreRule(own.model, COARSE_LED)
    pooled, tokens = engine.encode_query(queries[0])
    with engine.library.session():
        windows = all_windows(engine.library, pooled, engine.clip_seconds)
    pruned, reranked = pruned_moments(engine.reranker, windows, tokens, top_k=3, rule=rule, batch=2)
    full = engine.reranker.moments(windows, tokens)
    for m in full:
        m.score = rule.score(m)
    # the same moments in the same order, scores equal up to float32 rounding (a forward of 2 windows and one of
    # all of them take different matmul paths: ~1e-8 apart)
    key = lambda ms: [(m.video_id, m.start, m.end) for m in ms]  # noqa: E731
    a, b = nms_merge(pruned, top_k=3), nms_merge(full, top_k=3)
    if key(a) != key(b) or not np.allclose([m.score for m in a], [m.score for m in b], rtol=0, atol=1e-6):
        problems.append(f"pruned_moments top-3 differs from the merge over every window under {rule}")
    notes.append(f"{rule}: pruned top-3 in batches of 2 reranked {reranked} of {len(windows)} windows")
    if reranked >= len(windows):
        problems.append(f"pruning reranked all {len(windows)} windows under {rule}")
    return problems, notes


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
        problems, notes = check_pruned(engine, queries)
    for note in notes:
        print(note)
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    print(f"pruned baseline {'differs' if problems else 'identical'} on {len(queries)} queries")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
