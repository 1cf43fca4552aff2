"""`vmr demo`: the whole pipeline on the synthetic TEST world, offline, in a few minutes on 2 cores.

1. build a small world library (h264 videos of coloured shapes, one of them 10 minutes long) with its sentences;
2. index it with the real ingest (Ray, world CLIP model from world);
3. load the world's reranker (world/world_reranker.pt, trained by world/train_reranker.py with
   `vmr train` on a separate world), or train one on the spot when it is missing;
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


def run_demo(work_dir: str | None = None, n_videos: int = 10, n_shown: int = 5) -> dict:
    """Run the demo in ``work_dir`` (a temp dir when None). Returns the corpus metrics it printed."""
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="vmr-demo-") as tmp:
            return run_demo(tmp, n_videos, n_shown)

    work = Path(work_dir)
    click.echo("vmr demo - synthetic TEST world (coloured shapes; not a model for real videos)")
    t0 = time.time()
    videos, rows = build_world(work / "world", n_videos=n_videos, seed=DEMO_SEED, long_videos=1)
    click.echo(f"[1/4] built {len(videos)} videos ({sum(v.duration for v in videos) / 60:.0f} min, one 10-min) "
               f"with {len(rows)} sentences in {time.time() - t0:.0f}s -> {work / 'world'}")
    t0 = time.time()
    index_dir = work / "index"
    summary = index_world(work / "world" / "videos", index_dir)
    click.echo(f"[2/4] indexed in {time.time() - t0:.0f}s: {summary.describe().splitlines()[0]}")
    checkpoint = WORLD_RERANKER
    if not checkpoint.is_file():
        checkpoint = work / "world_reranker.pt"
        click.echo("[3/4] no shipped world reranker: training one (a few minutes)...")
        train_reranker(work / "train", out=checkpoint, n_videos=40, synthetic=True)
    else:
        click.echo(f"[3/4] reranker: {checkpoint} (trained with `vmr train` on another world)")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny world models: one thread is as fast, and far faster on a busy machine
    try:
        return _answer(index_dir, checkpoint, rows, n_shown)
    finally:
        torch.set_num_threads(threads)


def _answer(index_dir, checkpoint, rows, n_shown) -> dict:
    # No ingest runs beside the demo's queries, so one read connection serves them all.
    with SearchEngine(index_dir, checkpoint=str(checkpoint), device="cpu") as engine, engine.library.session():
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
    click.echo(f"\nNext: ask it yourself - vmr search \"{rows[0]['query']}\" --index {index_dir} --checkpoint "
               f"{checkpoint}\n(a temporary demo folder is deleted on exit: keep one with `vmr demo --out DIR`)")
    return {m["mode"]: m for m in metrics}
