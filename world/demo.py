"""`vmr demo`: the whole pipeline on the synthetic TEST world, offline, in a few minutes on 2 cores.

1. build a small world library (h264 videos of coloured shapes, one of them 10 minutes long) with its sentences;
2. take the world's reranker (world/world_reranker.pt, trained by world/train_reranker.py with
   `vmr train` on a separate world), or train one on the spot when it is missing;
3. index the library with the real ingest (Ray, world CLIP model from world), recording that reranker in the index,
   so `vmr search` and `vmr serve` on it rerank without --checkpoint;
4. answer a few sentences, printing what was found next to the ground truth, then the corpus metrics of all the
   world's sentences: coarse stage alone vs coarse + rerank.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from retriever.search import SearchEngine
from world import WORLD_RERANKER
from world.corpus import describe_corpus_metrics, engine_metrics
from world.generator import build_world
from world.train_reranker import index_world, train_reranker

DEMO_SEED = 7


def _fmt(a: float, b: float) -> str:
    return f"{a:6.1f}-{b:6.1f}s"


def run_demo(work_dir: str | None = None, n_videos: int = 10, n_shown: int = 5, long_videos: int = 1) -> dict:
    """Run the demo in ``work_dir`` (a temp dir when None). Returns the corpus metrics it printed."""
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="vmr-demo-") as tmp:
            return _run(Path(tmp), n_videos, n_shown, long_videos, kept=False)
    return _run(Path(work_dir), n_videos, n_shown, long_videos, kept=True)


def _run(work: Path, n_videos: int, n_shown: int, long_videos: int, kept: bool) -> dict:
    click.echo("vmr demo - synthetic TEST world (coloured shapes; not a model for real videos)")
    t0 = time.time()
    videos, rows = build_world(work / "world", n_videos=n_videos, seed=DEMO_SEED, long_videos=long_videos)
    click.echo(f"[1/4] built {len(videos)} videos ({sum(v.duration for v in videos) / 60:.0f} min, "
               f"{long_videos} 10-min) with {len(rows)} sentences in {time.time() - t0:.0f}s -> {work / 'world'}")
    checkpoint = WORLD_RERANKER
    if not checkpoint.is_file():
        checkpoint = work / "world_reranker.pt"
        click.echo("[2/4] no shipped world reranker: training one (a few minutes)...")
        train_reranker(work / "train", out=checkpoint, n_videos=40, synthetic=True)
    else:
        click.echo(f"[2/4] reranker: {checkpoint} (trained with `vmr train` on another world)")
    t0 = time.time()
    index_dir = work / "index"
    summary = index_world(work / "world" / "videos", index_dir, reranker=checkpoint)
    click.echo(f"[3/4] indexed in {time.time() - t0:.0f}s, reranker recorded: "
               f"{summary.describe().splitlines()[0]}")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny world models: one thread is as fast, and far faster on a busy machine
    try:
        metrics = _answer(index_dir, rows, n_shown)
    finally:
        torch.set_num_threads(threads)
    click.echo(f"\nNext: ask it yourself (the index reranks with its recorded reranker, no --checkpoint):\n"
               f"  vmr search \"{rows[0]['query']}\" --index {index_dir}\n  vmr serve --index {index_dir}"
               + ("" if kept else "\n(this temporary demo folder is deleted on exit: keep one with `vmr demo "
                                  "--out DIR`, then run the lines above on DIR/index)"))
    return metrics


def _answer(index_dir, rows, n_shown) -> dict:
    # No ingest runs beside the demo's queries, so one read connection serves them all. No checkpoint given: the
    # engine takes the reranker recorded in the index, as `vmr serve` on it will.
    with SearchEngine(index_dir, device="cpu") as engine, engine.library.session():
        if engine.reranker is None:
            raise RuntimeError(f"the demo index {index_dir} serves coarse-only: its reranker was not recorded")
        click.echo(f"[4/4] queries ({n_shown} of {len(rows)} shown; the 10-min video's are last; * = the "
                   "sentence's own video)")
        shown = rows[: n_shown - 2] + [r for r in rows if "long" in r["vid"]][:2]
        for row in shown:
            found = engine.search(row["query"], top_k=3).moments
            gt = row["relevant_windows"][0]
            click.echo(f'\n  "{row["query"]}"\n    truth  {row["vid"]:<18} {_fmt(*gt)}')
            for r in found:
                mark = "*" if Path(r["path"]).stem == row["vid"] else " "
                click.echo(f"  {mark} found  {Path(r['path']).stem:<18} {_fmt(r['start'], r['end'])}  "
                           f"score {r['score']:.3f} (coarse {r['coarse_score']:.3f})")
        metrics = [engine_metrics(engine, rows, "coarse"), engine_metrics(engine, rows, "rerank")]
    click.echo(f"\nAll {len(rows)} sentences, video recall and VCMR recall (%):")
    click.echo(describe_corpus_metrics(metrics))
    return {m["mode"]: m for m in metrics}
