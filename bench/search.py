"""Library search benchmark: per-stage latency and VCMR recall of coarse + rerank vs the exhaustive baseline.

    python -m bench.search --out DIR [--quick]

For each library size (10^2, 10^3, 10^4 videos; --quick: 30, the baseline's latency on 4 queries) a synthetic-vector test-world library is written
(world/synthetic.py: decoding 10^4 videos is out of reach here): ``N_TARGETS`` target videos whose objects
are unique in the library (the queries: one sentence per target event) among distractor videos drawn from the
other objects. Both systems answer the same queries with the same world CLIP and world reranker:

- coarse + rerank: retriever.search (FAISS candidates -> ≤24 windows -> LLMEPET -> merge);
- exhaustive: the reranker over every window of every video (a single-video tool run over the library), ranked by
  the same final-score rule.

The exhaustive baseline's LATENCY is measured as it is (every window reranked, features read per video) on at most
``EXHAUSTIVE_QUERIES`` queries at the largest sizes: it grows linearly with the library (~60 s a query at 10^4
here). Its QUALITY is measured on every query with the pruned baseline, which returns the identical top-10
without reranking windows that cannot reach it (bench.baselines.pruned_moments); the report states on how many
queries the two were compared and found identical. So R@5 of both systems is compared on the same, full query set.

Reported per size and system: p50/p95 seconds of each stage (text_encode, coarse, windows, rerank, merge, total),
video recall@k and VCMR R@1/5/10 at IoU 0.5/0.7, and the speed-up of the total p50 (same queries). Also, at the
first size: the final-score rule study (coarse weight 0 = model confidence alone ... coarse alone).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS, WORLD_RERANKER
from world.generator import ObjectPool, annotations, sample_video
from world.scene import ALL_OBJECTS

SIZES, QUICK_SIZES = (100, 1000, 10000), (30,)
N_TARGETS = 12  # target videos (each 1-3 events = queries) per library
EXHAUSTIVE_QUERIES = {100: 1000, 1000: 12, 10000: 4}  # queries the baseline answers per size (others: all)
RULE_WEIGHTS = (0.0, 1.0, 2.0, 4.0, 8.0, 1e6)  # coarse weights of the final-score rule study (1e6 ~ coarse only)


def make_library(index_dir, n_videos: int, encoder, seed: int = 0):
    """Write a synthetic library of ``n_videos``; returns the query annotations (target events)."""
    from world.synthetic import write_library

    rng = np.random.default_rng(seed)
    objects = list(ALL_OBJECTS)
    rng.shuffle(objects)
    target_objects = set(objects[: len(objects) // 2])
    distractor_objects = set(objects) - target_objects
    targets_pool = ObjectPool(rng, exclude=distractor_objects)
    distract_pool = ObjectPool(rng, exclude=target_objects)
    n_targets = min(N_TARGETS, n_videos)
    videos = [sample_video(rng, f"t{i:05d}", 2 * int(rng.integers(30, 76)), targets_pool) for i in range(n_targets)]
    videos += [sample_video(rng, f"d{i:05d}", 2 * int(rng.integers(30, 76)), distract_pool)
               for i in range(n_videos - n_targets)]
    write_library(index_dir, videos, encoder, seed=seed, progress=n_videos >= 1000)
    return annotations(videos[:n_targets])


def _round(d):
    if isinstance(d, dict):
        return {k: _round(v) for k, v in d.items()}
    return round(d, 5) if isinstance(d, float) else d


def run(out_dir, quick: bool = False, sizes=None, device: str = "cpu") -> dict:
    """Run the benchmark; writes search.json and search.md into ``out_dir``. Returns the results dict."""
    from model.features import ClipEncoder

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = sizes or (QUICK_SIZES if quick else SIZES)
    encoder = ClipEncoder.load(str(WORLD_CLIP_CONFIG), str(WORLD_CLIP_WEIGHTS), device=device)
    results = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, {device}, torch threads "
                          f"{torch.get_num_threads()}", "sizes": {}}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"vmr-search-bench-{n}-") as tmp:
            results["sizes"][str(n)] = _run_size(Path(tmp) / "index", n, sizes[0], encoder, device, quick)
    (out_dir / "search.json").write_text(json.dumps(results, indent=2))
    (out_dir / "search.md").write_text(describe(results))
    plot(results, out_dir / "search_latency.png")
    return results


def _metrics(engine, queries: list[dict], mode: str, features: dict | None = None, **kw) -> dict:
    """Corpus metrics of one system: "coarse", "rerank" (the engine's search), "exhaustive" or
    "exhaustive_pruned" (bench.baselines, features preloaded or read per video)."""
    from bench.baselines import exhaustive_search
    from world.corpus import corpus_metrics, engine_metrics

    if mode in ("coarse", "rerank"):
        return engine_metrics(engine, queries, mode, **kw)
    pruned = mode == "exhaustive_pruned"

    def search(query, top_k):
        return exhaustive_search(engine, query, top_k, pruned=pruned, features=features)

    with engine.library.session():  # no writer beside the benchmark: one read connection for all queries
        return corpus_metrics(search, queries, engine.library.resolve_vid, mode, **kw)


def _run_size(index, n: int, first_size: int, encoder, device: str, quick: bool = False) -> dict:
    from bench.baselines import preload_features
    from retriever.search import SearchEngine

    t0 = time.perf_counter()
    queries = make_library(index, n, encoder, seed=n)
    build = time.perf_counter() - t0
    with SearchEngine(index, checkpoint=str(WORLD_RERANKER), device=device) as engine:
        engine.encoder = encoder
        fast = _metrics(engine, queries, "rerank")
        coarse = _metrics(engine, queries, "coarse")
        limit = min(4 if quick else EXHAUSTIVE_QUERIES.get(n, len(queries)), len(queries))
        naive_results, exact_results = [], []
        naive = _metrics(engine, queries[:limit], "exhaustive", keep_results=naive_results)
        fast_same = _metrics(engine, queries[:limit], "rerank") if limit < len(queries) else fast
        features = preload_features(engine)  # quality pass: features read once, not per query
        exact = _metrics(engine, queries, "exhaustive_pruned", features, keep_results=exact_results)
        identical = sum(a == b for a, b in zip(naive_results, exact_results))  # the first `limit` queries
        # the baseline row: its quality on every query (identical top-10), its latency as measured without pruning
        exhaustive = {**exact, "mode": "exhaustive", "latency": naive["latency"], "latency_queries": limit,
                      "pruned_identical": f"{identical}/{limit}"}
        rules = {}
        if n == first_size:
            for w in (RULE_WEIGHTS[:2] + RULE_WEIGHTS[-1:] if quick else RULE_WEIGHTS):
                m = _metrics(engine, queries, "rerank", coarse_weight=w)
                rules[str(w)] = {k: v for k, v in m.items() if k.startswith("VCMR")}
    speedup = exhaustive["latency"]["total"]["p50"] / max(fast_same["latency"]["total"]["p50"], 1e-9)
    print(f"{n} videos: coarse+rerank p50 {1000 * fast['latency']['total']['p50']:.1f} ms "
          f"(R@5 IoU.5 {fast['VCMR_R5@0.5']:.1f}), exhaustive p50 {1000 * exhaustive['latency']['total']['p50']:.1f}"
          f" ms (R@5 {exhaustive['VCMR_R5@0.5']:.1f}, pruned identical on {identical}/{limit}), "
          f"speed-up {speedup:.1f}x", flush=True)
    return _round({
        "videos": n, "queries": len(queries), "library_build_s": build,
        "coarse_only": coarse, "coarse_rerank": fast, "exhaustive": exhaustive,
        "coarse_rerank_on_exhaustive_queries": fast_same, "speedup_p50": speedup, "score_rules": rules})


def plot(results: dict, path) -> None:
    """Total p50 latency vs library size, coarse + rerank vs exhaustive (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(n) for n in results["sizes"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, label in (("coarse_rerank", "coarse + rerank"), ("exhaustive", "exhaustive rerank (baseline)"),
                        ("coarse_only", "coarse only")):
        ax.plot(sizes, [1000 * results["sizes"][str(n)][name]["latency"]["total"]["p50"] for n in sizes], "o-",
                label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("videos in the library")
    ax.set_ylabel("query latency p50 (ms)")
    ax.set_title(f"Library search ({results['machine']})", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def decoded_world_study(index_dir, annotations: list[dict], device: str = "cpu") -> dict:
    """Quality on an index of DECODED world videos (real ingest): coarse alone, coarse + rerank, exhaustive, and
    the final-score rule study. Returns {"coarse", "rerank", "exhaustive", "rules"}."""
    from retriever.search import SearchEngine

    out = {}
    with SearchEngine(index_dir, checkpoint=str(WORLD_RERANKER), device=device) as engine:
        for mode in ("coarse", "rerank", "exhaustive"):
            out[mode] = _metrics(engine, annotations, mode)
        out["rules"] = {str(w): {k: v for k, v in _metrics(engine, annotations, "rerank",
                                                           coarse_weight=w).items() if k.startswith("VCMR")}
                        for w in RULE_WEIGHTS}
    return _round(out)


def describe(results: dict) -> str:
    lines = ["# Library search: coarse + rerank vs exhaustive rerank", "",
             f"Machine: {results['machine']}. Synthetic-vector test-world libraries, world CLIP + world reranker.", "",
             "| videos | system | queries | text | coarse | windows | rerank | merge | total p50 | total p95 "
             "| video R@1 | R@1 IoU.5 | R@5 IoU.5 | R@5 IoU.7 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in results["sizes"].items():
        for name in ("coarse_only", "coarse_rerank", "exhaustive"):
            m = r[name]
            lat = m["latency"]
            ms = lambda key, q="p50": f"{1000 * lat[key][q]:.1f}"  # noqa: E731
            asked = (f"{m['queries']} (latency {m['latency_queries']})"
                     if m.get("latency_queries", m["queries"]) != m["queries"] else f"{m['queries']}")
            lines.append(f"| {n} | {name} | {asked} | {ms('text_encode')} | {ms('coarse')} | {ms('windows')} "
                         f"| {ms('rerank')} | {ms('merge')} | {ms('total')} | {ms('total', 'p95')} "
                         f"| {m['video_R@1']:.1f} | {m['VCMR_R1@0.5']:.1f} | {m['VCMR_R5@0.5']:.1f} "
                         f"| {m['VCMR_R5@0.7']:.1f} |")
        lines.append(f"| {n} | speed-up (p50, same queries) | | | | | | | {r['speedup_p50']:.1f}x | | | | | |")
    lines += ["", "Stage latencies in ms (p50). Exhaustive: latency measured with every window reranked on the "
              "first N queries (\"latency N\"); its recall on every query via the pruned exhaustive search, whose "
              "top-10 was checked identical to the full one on those N queries: "
              + ", ".join(f"{n} videos {r['exhaustive'].get('pruned_identical', 'n/a')}"
                          for n, r in results["sizes"].items()) + ".",
              "", "Final-score rule study (coarse weight w in confidence + w * coarse):", ""]
    for n, r in results["sizes"].items():
        for w, m in r["score_rules"].items():
            lines.append(f"- {n} videos, w={w}: " + ", ".join(f"{k} {v:.1f}" for k, v in m.items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run(args.out, quick=args.quick)


if __name__ == "__main__":
    main()
