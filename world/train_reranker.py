"""Train the test world's tiny LLMEPET reranker with `vmr train` on an index of world videos.

    python -m world.train_reranker [--work DIR] [--videos 80] [--out world/world_reranker.pt]

Builds a training world (its own seed: its sentences and videos are not the test library's), indexes it with the
real ingest (world CLIP), and trains with model.train on that index through retriever.provider (what
`vmr train --index` does), using the architecture and schedule in ``world_reranker.json`` (random, tiny LLM
blocks). The shipped world_reranker.pt: 84 videos (230 sentences, 207 train / 23 val), 120 epochs, ~12 min on
one busy CPU core; val R1@0.5 = R1@0.7 = 91.3, mIoU 88.3 (its optimizer state stripped). ``--synthetic`` indexes synthetic clip vectors instead of decoded videos (world/synthetic.py), for
when decoding is too slow. TEST WORLD ONLY.
"""
from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS, WORLD_DIR, WORLD_RERANKER
from world.generator import build_world, write_jsonl

RERANKER_CONFIG = WORLD_DIR / "world_reranker.json"
TRAIN_SEED = 1000  # the test libraries use small seeds; this world is disjoint in seeds (videos, placements)


def index_world(videos_dir, index_dir, workers: int | None = None):
    from indexer.ingest import run_ingest

    summary = run_ingest(str(videos_dir), str(index_dir), clip_model=str(WORLD_CLIP_CONFIG),
                         clip_pretrained=str(WORLD_CLIP_WEIGHTS), device="cpu", ray_address=None, workers=workers,
                         rebuild_faiss=False)
    if summary.failed:
        raise RuntimeError(f"world videos failed to index: {summary.failed[:3]}")
    return summary


def train_reranker(work_dir, out=WORLD_RERANKER, n_videos: int = 80, synthetic: bool = False,
                   overrides: list[str] = (), device: str = "cpu") -> dict:
    """Build + index a training world under ``work_dir`` and train the reranker into ``out``. Returns the summary."""
    from model.train import train_from_cli
    from retriever.provider import IndexFeatureProvider

    work_dir = Path(work_dir)
    index_dir = work_dir / "index"
    videos, rows = build_world(work_dir, n_videos=n_videos, seed=TRAIN_SEED, long_videos=max(1, n_videos // 20),
                               write=not synthetic)
    if synthetic:
        from world.synthetic import write_library
        from model.features import ClipEncoder

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
    # what `vmr train --index --val` does next: fit the ranking rule on the validation sentences
    from retriever.fit_score import describe_fit, fit_checkpoint

    summary["score_rule"] = fit_checkpoint(index_dir, str(out), rows[:n_val], device=device)
    print(describe_fit(summary["score_rule"]))
    strip_optimizer(out)
    return summary


def strip_optimizer(path) -> None:
    """Drop the training state (optimizer, scheduler: the shipped file stays small; the negatives used and the
    ranking rule stay in the model config)."""
    import torch

    from model.checkpoint import read_checkpoint

    ckpt = read_checkpoint(str(path))
    ckpt.pop("train_state", None)
    torch.save(ckpt, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="keep the training world here (default: a temp dir)")
    parser.add_argument("--videos", type=int, default=80)
    parser.add_argument("--out", default=str(WORLD_RERANKER))
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and ~15x faster on a busy shared machine
    if args.work:
        print(train_reranker(args.work, args.out, args.videos, args.synthetic, args.overrides))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            print(train_reranker(tmp, args.out, args.videos, args.synthetic, args.overrides))


if __name__ == "__main__":
    main()
