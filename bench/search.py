"""Library search benchmark: VCMR recall of coarse only vs the reranker's own score vs the fused rule, with 95%
bootstrap intervals, and per-stage latency (optionally the exhaustive baseline).

    python -m bench.search --out DIR [--sizes 100,1000,10000] [--queries 200] [--seed S] [--exhaustive] [--quick]

Ranking evaluation (issue 9): for each size, libraries are made from seed S until ``--queries`` held-out
queries are collected (each library has N_TARGETS target videos with unique objects; the world vocabulary allows
~33 unambiguous queries per library, so 200 queries take several libraries per size; a size's distractor videos
are written once and each library adds its own targets to a copy of them: world.synthetic.target_libraries). The world reranker never saw
these libraries (it trains on world.train_reranker's seed) and its ranking rule was fit on validation queries of
libraries from another seed (world.train_reranker.fit_world_rule). Rows: coarse only (the coarse stage's moments), model (the reranker's own score, coarse weight 0) and
fused (the checkpoint's fitted rule); one rerank pass per query serves both reranked rows. Intervals: 95%
percentile bootstrap over queries (BOOTSTRAP resamples).

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
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import machine_line
from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS, WORLD_RERANKER
from world.generator import annotations
from world.synthetic import random_videos, split_objects, target_libraries

SIZES, QUICK_SIZES = (100, 1000, 10000), (30,)
N_TARGETS = 12  # target videos (each 1-3 events = queries) per library
EXHAUSTIVE_QUERIES = {100: 1000, 1000: 12, 10000: 4}  # queries the baseline answers per size (others: all)
BOOTSTRAP = 1000
RANK_KEYS = [f"VCMR_R{k}@{t}" for t in (0.5, 0.7) for k in (1, 5, 10)]


def make_library(index_dir, n_videos: int, encoder, seed: int = 0):
    """Write a synthetic library of ``n_videos``; returns the query annotations (target events)."""
    from world.synthetic import write_library

    rng = np.random.default_rng(seed)
    target_objects, distractor_objects = split_objects(rng)
    n_targets = min(N_TARGETS, n_videos)
    videos = random_videos(rng, "t", n_targets, target_objects)
    videos += random_videos(rng, "d", n_videos - n_targets, distractor_objects)
    write_library(index_dir, videos, encoder, seed=seed, progress=n_videos >= 1000)
    return annotations(videos[:n_targets])


def _round(d):
    if isinstance(d, dict):
        return {k: _round(v) for k, v in d.items()}
    return round(d, 5) if isinstance(d, float) else d


def run(out_dir, quick: bool = False, sizes=None, device: str = "cpu", queries: int | None = None, seed: int = 0,
        exhaustive: bool = False, checkpoint=WORLD_RERANKER, work=None) -> dict:
    """Run the benchmark; writes search.json and search.md into ``out_dir``. Returns the results dict."""
    from model.inference.features import ClipEncoder

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = sizes or (QUICK_SIZES if quick else SIZES)
    queries = queries or (30 if quick else 200)
    encoder = ClipEncoder.load(str(WORLD_CLIP_CONFIG), str(WORLD_CLIP_WEIGHTS), device=device)
    results = {"machine": f"{machine_line()}; {device}, torch threads {torch.get_num_threads()}", "seed": seed,
               "queries_asked": queries, "checkpoint": str(checkpoint), "sizes": {}}
    for n in sizes:
        results["sizes"][str(n)] = ranking_size(n, queries, seed, encoder, device, checkpoint, work)
        if exhaustive:
            with tempfile.TemporaryDirectory(prefix=f"vmr-search-bench-{n}-") as tmp:
                results["sizes"][str(n)]["exhaustive_study"] = _run_size(Path(tmp) / "index", n, encoder, device,
                                                                         quick)
        (out_dir / "search.json").write_text(json.dumps(results, indent=2))  # partial results survive a timeout
    (out_dir / "search.md").write_text(describe(results))
    plot(results, out_dir / "search_latency.png")
    return results


def _hit_rows(moments: list[dict], gt_video: int, windows: list) -> dict:
    from retriever.vcmr import query_hits

    return query_hits(moments, gt_video, windows, (1, 5, 10), (0.5, 0.7))


def bootstrap(hits: dict[str, list[bool]], rng: np.random.Generator, resamples: int = BOOTSTRAP) -> dict:
    """{metric: [mean %, low %, high %]} with a 95% percentile bootstrap over queries."""
    out = {}
    for key, values in hits.items():
        arr = np.asarray(values, dtype=np.float64)
        idx = rng.integers(0, len(arr), size=(resamples, len(arr)))
        means = arr[idx].mean(1) * 100
        out[key] = [float(arr.mean() * 100), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return out


def ranking_size(n: int, n_queries: int, seed: int, encoder, device: str, checkpoint=WORLD_RERANKER,
                 work=None) -> dict:
    """Coarse only / model's own score / fused rule on ``n_queries`` held-out queries over libraries of ``n``
    videos (as many libraries from ``seed`` as the queries need; ``work``: keep the distractors there, for a
    second run on the same libraries)."""
    from retriever.merge import ScoreRule
    from retriever.search import SearchEngine, rank_moments

    rows = {name: {k: [] for k in RANK_KEYS} for name in ("coarse", "model", "fused")}
    latency = {name: [] for name in ("coarse", "fused")}
    libraries, build = 0, 0.0
    rule = None
    with tempfile.TemporaryDirectory(prefix=f"vmr-rank-bench-{n}-") as tmp:
        t0 = time.perf_counter()
        where = Path(work) / f"{n}_{seed}" if work else tmp
        for index, queries in target_libraries(where, n, encoder, seed, N_TARGETS):
            build += time.perf_counter() - t0
            libraries += 1
            with SearchEngine(index, checkpoint=str(checkpoint), device=device) as engine, \
                    engine.library.session():
                engine.encoder = encoder
                rule = engine.reranker.score_rule
                own = ScoreRule(rule.model, 0.0)
                engine.search(queries[0]["query"], top_k=10, rerank=False)  # first-call costs are not latency
                for ann in queries[: n_queries - len(rows["fused"][RANK_KEYS[0]])]:
                    gt = engine.library.resolve_vid(ann["vid"])
                    coarse = engine.search(ann["query"], top_k=10, rerank=False)
                    latency["coarse"].append(coarse.timings["total"])
                    t1 = time.perf_counter()
                    pooled, tokens = engine.encode_query(ann["query"])
                    windows = engine.candidates(pooled)
                    moments = engine.reranker.moments(windows, tokens)
                    fused = rank_moments(moments, 10, rule)
                    latency["fused"].append(time.perf_counter() - t1)
                    model = rank_moments(moments, 10, own)
                    for name, ranked in (("coarse", coarse.moments), ("model", model), ("fused", fused)):
                        for k, v in _hit_rows(ranked, gt, ann["relevant_windows"]).items():
                            rows[name][k].append(v)
            if len(rows["fused"][RANK_KEYS[0]]) >= n_queries:
                break
            t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    out = {"videos": n, "queries": len(rows["fused"][RANK_KEYS[0]]), "libraries": libraries,
           "library_build_s": build, "rule": rule.to_dict() if rule else None}
    for name, hits in rows.items():
        out[name] = bootstrap(hits, rng)
    out["latency_p50_ms"] = {k: 1000 * float(np.percentile(v, 50)) for k, v in latency.items()}
    out["latency_p95_ms"] = {k: 1000 * float(np.percentile(v, 95)) for k, v in latency.items()}
    print(f"{n} videos, {out['queries']} queries ({libraries} libraries): " + "; ".join(
        f"{name} R1@0.7 {out[name]['VCMR_R1@0.7'][0]:.1f} R5@0.5 {out[name]['VCMR_R5@0.5'][0]:.1f}"
        for name in rows) + f"; p50 fused {out['latency_p50_ms']['fused']:.0f} ms", flush=True)
    return _round(out)


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


def _run_size(index, n: int, encoder, device: str, quick: bool = False) -> dict:
    """The exhaustive-baseline study of one size (--exhaustive): coarse + rerank vs every window reranked."""
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
    speedup = exhaustive["latency"]["total"]["p50"] / max(fast_same["latency"]["total"]["p50"], 1e-9)
    print(f"{n} videos: coarse+rerank p50 {1000 * fast['latency']['total']['p50']:.1f} ms "
          f"(R@5 IoU.5 {fast['VCMR_R5@0.5']:.1f}), exhaustive p50 {1000 * exhaustive['latency']['total']['p50']:.1f}"
          f" ms (R@5 {exhaustive['VCMR_R5@0.5']:.1f}, pruned identical on {identical}/{limit}), "
          f"speed-up {speedup:.1f}x", flush=True)
    return _round({
        "videos": n, "queries": len(queries), "library_build_s": build,
        "coarse_only": coarse, "coarse_rerank": fast, "exhaustive": exhaustive,
        "coarse_rerank_on_exhaustive_queries": fast_same, "speedup_p50": speedup})


def plot(results: dict, path) -> None:
    """Search p50 latency vs library size: coarse only vs coarse + rerank (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(n) for n in results["sizes"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, label in (("fused", "coarse + rerank"), ("coarse", "coarse only")):
        ax.plot(sizes, [results["sizes"][str(n)]["latency_p50_ms"][name] for n in sizes], "o-", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("videos in the library")
    ax.set_ylabel("query latency p50 (ms)")
    ax.set_title(f"Library search ({results['machine']})", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def describe(results: dict) -> str:
    lines = ["# Library search: does the reranker rank?", "",
             f"Machine: {results['machine']}. Synthetic-vector test-world libraries (seed {results['seed']}), world "
             "CLIP + world reranker; held-out queries (libraries the reranker never saw; its ranking rule fit on "
             "validation queries of other seeds' libraries, world.train_reranker.fit_world_rule). VCMR R@k (%) with "
             "95% bootstrap intervals over queries.", "",
             "| videos | queries | row | " + " | ".join(k.replace("VCMR_", "") for k in RANK_KEYS)
             + " | p50 ms | p95 ms |", "|---|---|---|" + "---|" * (len(RANK_KEYS) + 2)]
    for n, r in results["sizes"].items():
        for name, label in (("coarse", "coarse only"), ("model", "model's own score"),
                            ("fused", f"fused ({r['rule']['model']} + {r['rule']['coarse_weight']:g} x coarse)")):
            lat = {"coarse": "coarse", "model": "fused", "fused": "fused"}[name]
            cells = " | ".join(f"{r[name][k][0]:.1f} [{r[name][k][1]:.1f}, {r[name][k][2]:.1f}]" for k in RANK_KEYS)
            lines.append(f"| {n} | {r['queries']} ({r['libraries']} libraries) | {label} | {cells} "
                         f"| {r['latency_p50_ms'][lat]:.0f} | {r['latency_p95_ms'][lat]:.0f} |")
    lines += ["", "The model's own row ranks the same reranked moments with the coarse weight 0; its latency is "
              "the fused row's.", "", "Ranking checks (computed from the table):"]
    for n, r in results["sizes"].items():
        below = [k.replace("VCMR_", "") for k in RANK_KEYS if r["fused"][k][0] < r["coarse"][k][0]]
        gap = max(r["fused"][k][0] - r["model"][k][0] for k in RANK_KEYS if k.startswith("VCMR_R5"))
        lines.append(f"- {n} videos: fused >= coarse only on {len(RANK_KEYS) - len(below)} of {len(RANK_KEYS)} "
                     f"metrics{' (below on ' + ', '.join(below) + ')' if below else ''}; R1@0.7 "
                     f"{r['fused']['VCMR_R1@0.7'][0] - r['coarse']['VCMR_R1@0.7'][0]:+.1f} points over coarse only; "
                     f"the model's own score at most {gap:.1f} points behind fused on R@5")
    for n, r in results["sizes"].items():
        study = r.get("exhaustive_study")
        if study:
            lines.append(f"- {n} videos, exhaustive baseline: R@5 IoU.5 {study['exhaustive']['VCMR_R5@0.5']:.1f} "
                         f"vs coarse+rerank {study['coarse_rerank']['VCMR_R5@0.5']:.1f}; speed-up "
                         f"{study['speedup_p50']:.1f}x ({study['exhaustive'].get('pruned_identical')} identical)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default=None, help="library sizes, comma-separated (default 100,1000,10000)")
    parser.add_argument("--queries", type=int, default=None, help="held-out queries per size (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exhaustive", action="store_true", help="also the exhaustive-baseline study")
    parser.add_argument("--checkpoint", default=str(WORLD_RERANKER), help="the reranker (default: the world's)")
    parser.add_argument("--work", default=None, help="keep the libraries' distractor videos here (reused by a rerun)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny world models: one thread is as fast, far faster on a busy machine
    sizes = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else None
    run(args.out, quick=args.quick, sizes=sizes, queries=args.queries, seed=args.seed, exhaustive=args.exhaustive,
        checkpoint=args.checkpoint, work=args.work)


if __name__ == "__main__":
    main()
