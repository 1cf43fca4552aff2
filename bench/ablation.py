"""Pseudo-event regulation ablation (issue 9): the world reranker's recipe trained with and without the event loss
on several seeds, moment retrieval measured on held-out sentences, mean +- sd over seeds.

    python -m bench.ablation [--seeds 5] [--videos 40] [--heldout 40] [--epochs 40] [--out bench/results]

A training world and a held-out world (other seeds, other videos and placements) are written as synthetic-vector
indexes (world/synthetic.py). For each seed and variant, `vmr train --index` on the training world (what
world/train_reranker.py does: world_reranker.json, negatives on by default) with a shorter schedule
(``--epochs``, learning rate dropped 10x at 3/4), then `vmr predict` on every held-out sentence (its own video:
moment retrieval, the part the regulation is meant to help) and the official metrics. Variants:

- with: ``event_coef`` as configured (0.1: the paper's weight), the event head regresses pseudo-events computed
  on the input clip features;
- without: ``event_coef=0`` (no event loss; the event head is unused).

Reported: MR R1@0.5, R1@0.7, mIoU (%) mean +- sd over seeds, and the paired difference (with - without) per seed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.report import machine_line
from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS, WORLD_DIR

TRAIN_SEED, HELDOUT_SEED = 2000, 3000  # neither the shipped reranker's (1000) nor the search bench's worlds
METRICS = ("MR-full-R1@0.5", "MR-full-R1@0.7", "MR-full-mIoU")
VARIANTS = {"with": [], "without": ["event_coef=0"]}


def write_world(work: Path, name: str, n_videos: int, seed: int, encoder) -> tuple[Path, list[dict]]:
    """A synthetic-vector world index under ``work/name``; returns (index dir, annotation rows)."""
    from world.generator import build_world
    from world.synthetic import write_library

    videos, rows = build_world(work / name, n_videos=n_videos, seed=seed, long_videos=max(1, n_videos // 20),
                               write=False)
    write_library(work / name / "index", videos, encoder, seed=seed)
    return work / name / "index", rows


def train_and_eval(train_index, train_path, heldout_provider, heldout_rows, overrides, out_path) -> dict:
    """One training run (model.training.train, as `vmr train --index`) and its held-out metrics."""
    from model.inference.metrics import evaluate
    from model.inference.predict import predict_annotations
    from model.training.train import build_run
    from retriever.provider import IndexFeatureProvider

    provider = IndexFeatureProvider(train_index, device="cpu")
    trainer = build_run(str(train_path), None, None, str(out_path), "custom",
                        str(WORLD_DIR / "world_reranker.json"), overrides, device="cpu", provider=provider)
    t0 = time.process_time()
    trainer.fit()
    cpu = time.process_time() - t0
    provider.library.close()
    rows = predict_annotations(trainer.model, heldout_rows, heldout_provider, trainer.data_cfg, "custom",
                               device="cpu", progress=False)
    brief = evaluate(rows, heldout_rows)["brief"]
    return {**{k: float(brief[k]) for k in METRICS}, "train_cpu_s": cpu}


def run(out_dir, seeds: int = 5, n_videos: int = 40, n_heldout: int = 40, epochs: int = 40,
        work: str | None = None) -> dict:
    from model.inference.features import ClipEncoder
    from world.generator import write_jsonl
    from retriever.provider import IndexFeatureProvider

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="vmr-ablation-")
        work = tmp.name
    work = Path(work)
    encoder = ClipEncoder.load(str(WORLD_CLIP_CONFIG), str(WORLD_CLIP_WEIGHTS), device="cpu")
    train_index, train_rows = write_world(work, "train", n_videos, TRAIN_SEED, encoder)
    write_jsonl(train_rows, work / "train.jsonl")
    heldout_index, heldout_rows = write_world(work, "heldout", n_heldout, HELDOUT_SEED, encoder)
    heldout = IndexFeatureProvider(heldout_index, device="cpu", encoder=encoder)
    schedule = [f"n_epoch={epochs}", f"eval_epoch={epochs}", f"lr_drop={max(1, epochs * 3 // 4)}",
                "progress=false"]
    results = {"machine": f"{machine_line()}; cpu, torch threads {torch.get_num_threads()}",
               "train_sentences": len(train_rows), "heldout_sentences": len(heldout_rows), "epochs": epochs,
               "schedule": schedule, "runs": []}
    for seed in range(seeds):
        for variant, extra in VARIANTS.items():
            got = train_and_eval(train_index, work / "train.jsonl", heldout, heldout_rows,
                                 schedule + [f"seed={seed}"] + extra, work / f"{variant}_{seed}.pt")
            results["runs"].append({"seed": seed, "variant": variant, **got})
            print(f"seed {seed} {variant}: " + ", ".join(f"{k} {got[k]:.1f}" for k in METRICS)
                  + f" ({got['train_cpu_s']:.0f} s CPU)", flush=True)
            (out_dir / "ablation.json").write_text(json.dumps(summarize(results), indent=2))
    heldout.library.close()
    results = summarize(results)
    (out_dir / "ablation.json").write_text(json.dumps(results, indent=2))
    (out_dir / "ablation.md").write_text(describe(results))
    if tmp is not None:
        tmp.cleanup()
    return results


def summarize(results: dict) -> dict:
    """Mean +- sd per variant and of the paired per-seed difference (with - without)."""
    by = {v: {r["seed"]: r for r in results["runs"] if r["variant"] == v} for v in VARIANTS}
    summary = {}
    for variant, runs in by.items():
        summary[variant] = {k: _mean_sd([r[k] for r in runs.values()]) for k in METRICS}
    paired = sorted(set(by["with"]) & set(by["without"]))
    summary["with_minus_without"] = {k: _mean_sd([by["with"][s][k] - by["without"][s][k] for s in paired])
                                     for k in METRICS}
    return {**results, "summary": summary, "seeds_paired": len(paired)}


def _mean_sd(values: list[float]) -> list[float]:
    if not values:
        return [float("nan"), float("nan")]
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def describe(results: dict) -> str:
    s = results["summary"]
    lines = ["# Pseudo-event regulation ablation", "",
             f"Machine: {results['machine']}. World reranker recipe (world/world_reranker.json, negatives on), "
             f"{results['epochs']} epochs ({', '.join(results['schedule'][:3])}), trained on "
             f"{results['train_sentences']} sentences of a synthetic-vector training world; moment retrieval on "
             f"{results['heldout_sentences']} held-out sentences of another world; {results['seeds_paired']} seeds "
             "per variant, mean +- sd.", "",
             "| variant | " + " | ".join(k.replace("MR-full-", "") for k in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for variant, label in (("with", "with pseudo-event regulation (event_coef 0.1)"),
                           ("without", "without (event_coef 0)"),
                           ("with_minus_without", "paired difference, with - without")):
        lines.append(f"| {label} | " + " | ".join(f"{s[variant][k][0]:+.1f} +- {s[variant][k][1]:.1f}"
                                                    if variant == "with_minus_without" else
                                                    f"{s[variant][k][0]:.1f} +- {s[variant][k][1]:.1f}"
                                                    for k in METRICS) + " |")
    lines += ["", "Per run:", "", "| seed | variant | " + " | ".join(METRICS) + " | train CPU s |",
              "|---|---|" + "---|" * (len(METRICS) + 1)]
    for r in results["runs"]:
        lines.append(f"| {r['seed']} | {r['variant']} | " + " | ".join(f"{r[k]:.1f}" for k in METRICS)
                     + f" | {r['train_cpu_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--videos", type=int, default=40, help="videos of the training world")
    parser.add_argument("--heldout", type=int, default=40, help="videos of the held-out world")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--work", default=None, help="keep the worlds and checkpoints here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is as fast, far faster on a busy machine
    run(args.out, args.seeds, args.videos, args.heldout, args.epochs, args.work)


if __name__ == "__main__":
    main()
