"""What the speech and on-screen text benches share: the phrase vocabulary, edit distance, this machine's own Ray,
a timed ingest of one set of channels, and recall over queries with its table.

Both worlds draw their queries from one small vocabulary, so many share words with others (word matching alone does
not find one); each bench puts its own words around them.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from bench.search import bootstrap

ADJ = "red green blue silver golden wooden tiny heavy quiet broken shiny frozen".split()
NOUN = "kettle bicycle lantern piano ladder suitcase umbrella teapot violin rocket tractor mirror".split()
VERB = "rolls waits sleeps spins floats falls shines hides".split()
METRICS = ("VCMR_R1@0.5", "VCMR_R5@0.5", "VCMR_R1@0.7", "VCMR_R5@0.7")


def unique_texts(n: int, rng: np.random.Generator, make: Callable[[np.random.Generator], str]) -> list[str]:
    """``n`` distinct texts drawn with ``make(rng)``, in the order first drawn."""
    out, seen = [], set()
    while len(out) < n:
        text = make(rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def word_errors(ref: list, hyp: list) -> int:
    """Levenshtein distance between two sequences (words for WER, characters for CER)."""
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[-1]


def own_ray() -> None:
    """This machine's own local Ray: never another user's cluster found running here."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)


def timed_ingest(videos_dir, index_dir: str, channels: list[str]):
    """(IngestSummary, wall seconds) of one `vmr index` run of ``channels`` with the test world's CLIP."""
    from indexer.ingest import run_ingest
    from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS

    t = time.perf_counter()
    summary = run_ingest(str(videos_dir), index_dir, clip_model=str(WORLD_CLIP_CONFIG),
                         clip_pretrained=str(WORLD_CLIP_WEIGHTS), device="cpu", progress=False, channels=channels)
    return summary, time.perf_counter() - t


def recall_over_queries(index_dir: str, rows: list[dict], configs: dict, moment: Callable[[dict], tuple],
                        on_found: Callable[[str, dict, dict], None] | None = None) -> dict:
    """VCMR R@{1,5} at IoU {0.5,0.7} of every row's text as a query, per search config.

    configs: {name: (channels or None for all, FusionConfig or None for the index's own)}; moment(row) -> the
    (start, end) the query should find in row["path"]; on_found(name, row, hits) sees every query's hits.
    Returns {"recall": {name: {metric: [mean, lo, hi]}}, "text_search_ms_p50": p50 of the "fused" config's text stage}.
    """
    from retriever.search import SearchEngine
    from retriever.vcmr import query_hits

    hits, text_ms = {}, []
    with SearchEngine(index_dir, rerank=False, device="cpu") as engine:
        ids = {v["path"]: int(v["id"]) for v in engine.library.videos()}
        shipped = engine.fusion
        for row in rows:
            for name, (channels, fusion) in configs.items():
                engine.fusion = fusion or shipped
                result = engine.search(row["text"], top_k=5, channels=channels)
                if name == "fused":
                    text_ms.append(result.timings["text_search"] * 1e3)
                found = query_hits(result.moments, ids[row["path"]], [moment(row)], (1, 5), (0.5, 0.7))
                for key, ok in found.items():
                    hits.setdefault(name, {m: [] for m in METRICS})[key].append(ok)
                if on_found:
                    on_found(name, row, found)
        engine.fusion = shipped
    rng = np.random.default_rng(0)
    return {"recall": {name: bootstrap(h, rng) for name, h in hits.items()},
            "text_search_ms_p50": round(float(np.median(text_ms)), 2)}


def recall_table(recall: dict) -> list[str]:
    """Markdown lines: a row per config, each metric as mean [95% interval]."""
    lines = ["| row | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, rec in recall.items():
        lines.append(f"| {name} | " + " | ".join(f"{rec[m][0]:.1f} [{rec[m][1]:.1f}, {rec[m][2]:.1f}]"
                                                  for m in METRICS) + " |")
    return lines
