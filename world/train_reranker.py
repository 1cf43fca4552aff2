"""Train the test world's tiny LLMEPET reranker with `vmr train` on an index of world videos.

    python -m world.train_reranker [--work DIR] [--videos 1000] [--decoded] [--out world/world_reranker.pt]

Builds a training world (its own seed: its sentences and videos are not the test library's), indexes it
(synthetic clip vectors, world/synthetic.py; ``--decoded``: real videos through the real ingest, slow) and trains
with model.training.train on that index through retriever.provider (what `vmr train --index` does), using the
architecture and recipe in ``world_reranker.json`` (random, tiny LLM blocks; negative windows 1 per sentence,
hard ones from the coarse stage drawn twice as often; the relevance head). Then its ranking rule is fit on
FIT_QUERIES unambiguous validation queries of other libraries (fit_world_rule).

The shipped world_reranker.pt: 1050 synthetic-vector videos (2604 training sentences, 289 validation), 24 epochs,
~30 min on one busy core of the 2-core machine; val MR R1@0.5 / R1@0.7 97.9 / 96.2; rule relevance_confidence +
0.5 x coarse, fit on 144 queries (VCMR R1@0.7 96.5, the model's own score alone 91.0). Why negatives and the
relevance head: a reranker trained without them (84 decoded videos) ranks by the coarse cosine only
(bench/results/search.md compares the two).
TEST WORLD ONLY.
"""
from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from pathlib import Path

from indexer.ingest import run_ingest
from model.inference.checkpoint import read_checkpoint, write_checkpoint
from model.inference.features import ClipEncoder
from model.training.train import train_from_cli
from retriever.fit_score import describe_fit, fit_checkpoint_sets
from retriever.provider import IndexFeatureProvider
from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS, WORLD_DIR, WORLD_RERANKER
from world.generator import build_world, write_jsonl
from world.synthetic import target_libraries, write_library

RERANKER_CONFIG = WORLD_DIR / "world_reranker.json"
TRAIN_SEED = 1000  # the test libraries use small seeds; this world is disjoint in seeds (videos, placements)
FIT_SEED, FIT_VIDEOS, FIT_QUERIES = 1001, 1000, 144  # the ranking rule's validation libraries (not bench's seeds)


def index_world(videos_dir, index_dir, workers: int | None = None, reranker=None):
    """Index world videos with the world CLIP; ``reranker``: a checkpoint recorded in the index (search and serve
    use it without --checkpoint)."""
    summary = run_ingest(str(videos_dir), str(index_dir), clip_model=str(WORLD_CLIP_CONFIG),
                         clip_pretrained=str(WORLD_CLIP_WEIGHTS), device="cpu", ray_address=None, workers=workers,
                         rebuild_faiss=False, reranker=None if reranker is None else str(reranker))
    if summary.failed:
        raise RuntimeError(f"world videos failed to index: {summary.failed[:3]}")
    return summary


def train_reranker(work_dir, out=WORLD_RERANKER, n_videos: int = 1000, synthetic: bool = True,
                   overrides: list[str] = (), device: str = "cpu") -> dict:
    """Build + index a training world under ``work_dir`` and train the reranker into ``out``. Returns the summary."""
    work_dir = Path(work_dir)
    index_dir = work_dir / "index"
    videos, rows = build_world(work_dir, n_videos=n_videos, seed=TRAIN_SEED, long_videos=max(1, n_videos // 20),
                               write=not synthetic)
    if synthetic:
        encoder = ClipEncoder.load(str(WORLD_CLIP_CONFIG), str(WORLD_CLIP_WEIGHTS), device="cpu")
        write_library(index_dir, videos, encoder, seed=TRAIN_SEED, progress=True)
    else:
        index_world(work_dir / "videos", index_dir)
    random.Random(0).shuffle(rows)
    n_val = max(8, len(rows) // 10)
    write_jsonl(rows[n_val:], work_dir / "train.jsonl")
    write_jsonl(rows[:n_val], work_dir / "val.jsonl")
    provider = IndexFeatureProvider(index_dir, device=device)
    summary = train_from_cli(train_path=str(work_dir / "train.jsonl"), val_path=str(work_dir / "val.jsonl"),
                             index_dir=str(index_dir), features_dir=None, out_path=str(out), dataset="custom",
                             config_path=str(RERANKER_CONFIG), overrides=list(overrides), device=device,
                             provider=provider)
    provider.library.close()
    summary["score_rule"] = fit_world_rule(work_dir / "fit", out, device=device)
    strip_optimizer(out, trained_on=f"synthetic TEST world (world/train_reranker.py, seed {TRAIN_SEED}), "
                                    f"{len(videos)} {'synthetic-vector' if synthetic else 'decoded'} videos, "
                                    f"{len(rows) - n_val} sentences")
    return summary


def fit_world_rule(work_dir, checkpoint, device: str = "cpu") -> dict:
    """What `vmr train --index --val` does after training: fit the ranking rule on validation queries, here
    FIT_QUERIES unambiguous ones from libraries of FIT_VIDEOS (world.synthetic.target_libraries, the fit seed).
    The training world's own validation sentences cannot serve: each names objects that 3-4 of its videos show,
    so which video is "the" answer is ill-defined and R@1 over them is capped near 35%."""
    encoder = ClipEncoder.load(str(WORLD_CLIP_CONFIG), str(WORLD_CLIP_WEIGHTS), device="cpu")
    sets, n = [], 0
    libraries = target_libraries(Path(work_dir) / f"fit{FIT_VIDEOS}", FIT_VIDEOS, encoder, seed=FIT_SEED)
    while n < FIT_QUERIES:
        index, queries = next(libraries)
        keep = Path(work_dir) / f"fit_library{len(sets)}"
        if keep.exists():
            shutil.rmtree(keep)
        shutil.copytree(index, keep)  # the generator removes its copy when asked for the next
        sets.append((keep, queries[:FIT_QUERIES - n]))
        n += len(sets[-1][1])
    libraries.close()
    stored = fit_checkpoint_sets(str(checkpoint), sets, device=device)
    print(describe_fit(stored))
    return stored


def strip_optimizer(path, trained_on: str | None = None) -> None:
    """Drop the training state (optimizer, scheduler: the shipped file stays small; the negatives used and the
    ranking rule stay in the model config); ``trained_on`` recorded in the model config's extra."""
    ckpt = read_checkpoint(str(path))  # memory-mapped: written back through a new file, never in place
    ckpt.pop("train_state", None)
    if trained_on:
        ckpt["model_config"].setdefault("extra", {})["trained_on"] = trained_on
    write_checkpoint(ckpt, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="keep the training world here (default: a temp dir)")
    parser.add_argument("--videos", type=int, default=1000)
    parser.add_argument("--out", default=str(WORLD_RERANKER))
    parser.add_argument("--decoded", action="store_true", help="write and decode real videos (slow)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--fit-only", action="store_true", help="only (re)fit --out's ranking rule")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and ~15x faster on a busy shared machine
    if args.fit_only:
        with tempfile.TemporaryDirectory() as tmp:
            print(fit_world_rule(args.work or tmp, args.out))
        return
    if args.work:
        print(train_reranker(args.work, args.out, args.videos, not args.decoded, args.overrides))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            print(train_reranker(tmp, args.out, args.videos, not args.decoded, args.overrides))


if __name__ == "__main__":
    main()
