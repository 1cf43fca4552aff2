"""Ingest benchmark: whole-pipeline clips/s vs the CLIP image encoder alone on the same frames; peak RSS vs size.

    run(out_dir, quick) -> dict of figures (the BENCH suite puts them in its report)

- encoder_clips_per_s: ClipEncoder.encode_frames_uint8 in batches of BATCH_FRAMES on frames decoded beforehand
  (one process, all cores): the ceiling for the pipeline.
- ingest_clips_per_s: run_ingest on the same library into a fresh index, Ray already up and the CLIP actor warm
  (steady state; Ray/model start-up is reported separately as startup_s).
- ratio = ingest / encoder (target >= 0.8).
- peak_rss_mb_{1,2,4}x: the ingest driver's peak RSS after ingesting 1x, then 2x, then 4x the library (one fresh
  process): flat if the streaming bound works (the FAISS index of a library this size is a few MB).
Throughput: full runs use the ViT-B-32 architecture (random weights: no download; compute is what matters here),
quick runs a tiny config and skips the memory runs. Memory: always the tiny config (the pipeline's memory is the
question).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from world import CLIP_TINY_CONFIG, videos

ROOT = Path(__file__).resolve().parents[1]
TINY = str(CLIP_TINY_CONFIG)
BATCH_FRAMES = 64


def _make_library(folder: Path, n_videos: int, seconds: float) -> list[Path]:
    paths = []
    for i in range(n_videos):
        spec = videos.make_video(folder / f"v{i:03d}.mp4", duration=seconds, fps=5, size=(128, 96),
                                 scene_seconds=4.0 + i % 5)
        paths.append(spec.path)
    return paths


def _encoder_rate(model: str, paths: list[Path]) -> tuple[float, int]:
    from indexer.decode import sample_clip_frames
    from model.inference.features import ClipEncoder, frame_resizer

    enc = ClipEncoder.load(model, None, device="auto", allow_random=True)
    resize = frame_resizer(enc.preprocess_cfg)
    frames = np.concatenate([sample_clip_frames(str(p), resize)[0] for p in paths])
    enc.encode_frames_uint8(frames[:BATCH_FRAMES])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(frames), BATCH_FRAMES):
        enc.encode_frames_uint8(frames[i: i + BATCH_FRAMES])
    return len(frames) / (time.perf_counter() - start), len(frames)


def _ingest_rate(model: str, video_dir: Path, work: Path) -> tuple[float, float, int]:
    import ray

    from indexer.ingest import run_ingest

    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        warm = work / "warm"
        warm.mkdir(exist_ok=True)
        shutil.copy(next(video_dir.iterdir()), warm / "w.mp4")
        run_ingest(warm, work / "idx_warm", model, None, allow_random=True, progress=False)  # Ray + actor up
        startup = time.perf_counter() - t0
        start = time.perf_counter()
        summary = run_ingest(video_dir, work / "idx_bench", model, None, allow_random=True, progress=False)
        elapsed = time.perf_counter() - start
    finally:
        ray.shutdown()
    return summary.clips / elapsed, startup, summary.clips


RSS_SCRIPT = """
import json, resource
import ray
from indexer.ingest import run_ingest
ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
out = {{}}
for factor, folder in {folders!r}:
    s = run_ingest(folder, folder + "_index", {model!r}, None, allow_random=True, progress=False)
    out[factor] = {{"clips": s.clips, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}
ray.shutdown()
print(json.dumps(out))
"""


def _peak_rss(model: str, folders: list[tuple[int, str]]) -> dict:
    """Driver peak RSS after ingesting each library, smallest first, in ONE fresh process (one Ray start).

    ru_maxrss only grows, so equal values across 1x/2x/4x mean the bigger libraries needed no more memory.
    """
    code = RSS_SCRIPT.format(folders=[(f, str(p)) for f, p in folders], model=model)
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def run(out_dir, quick: bool = False) -> dict:
    # Videos and indexes go to a scratch folder removed afterwards: only the figures stay in the report folder.
    out = Path(tempfile.mkdtemp(prefix="vmr-bench-ingest-"))
    try:
        figures = _run(out, quick)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    (Path(out_dir) / "ingest.json").write_text(json.dumps(figures, indent=2))
    return figures


def _run(out: Path, quick: bool) -> dict:
    model = TINY if quick else "ViT-B-32"
    n_videos, seconds = (4, 20.0) if quick else (8, 120.0)
    base = out / "videos_1x"
    paths = _make_library(base, n_videos, seconds)
    encoder_rate, n_frames = _encoder_rate(model, paths)
    _log(f"encoder alone: {encoder_rate:.1f} clips/s ({n_frames} frames, {model})")
    ingest_rate, startup, clips = _ingest_rate(model, base, out)
    _log(f"ingest: {ingest_rate:.1f} clips/s ({clips} clips), start-up {startup:.1f} s")
    figures = {"model": Path(model).name, "videos": n_videos, "clips": clips,
               "encoder_clips_per_s": round(encoder_rate, 1), "ingest_clips_per_s": round(ingest_rate, 1),
               "ratio": round(ingest_rate / encoder_rate, 3), "startup_s": round(startup, 1),
               "rss_model": Path(TINY).name}
    figures["headline"] = (f"ingest {ingest_rate:.1f} clips/s end to end = {ingest_rate / encoder_rate:.2f}x the CLIP "
                           f"encoder alone ({encoder_rate:.1f} clips/s, {Path(model).name}, same frames)")
    if quick:  # the memory runs need a second Ray start and 7x the ingest work: full runs only
        figures["headline"] = (f"ingest smoke run: {ingest_rate:.1f} clips/s end to end, CLIP encoder alone "
                               f"{encoder_rate:.1f} clips/s ({Path(model).name}); no ratio at this size: with the "
                               "tiny model Ray's fixed costs dominate (the full run measures it)")
        figures["peak_rss"] = "full run only"
        return figures
    # Memory: the pipeline's, so the tiny model (a big one adds a constant, not a slope).
    folders = []
    for factor in (1, 2, 4):
        folder = out / f"rss_{factor}x"
        for k in range(factor):  # distinct paths, same content: every copy is indexed
            shutil.copytree(base, folder / f"copy{k}")
        folders.append((factor, folder))
    for factor, measured in _peak_rss(TINY, folders).items():
        figures[f"clips_{factor}x"] = measured["clips"]
        figures[f"peak_rss_mb_{factor}x"] = round(measured["peak_rss_mb"], 1)
    figures["headline"] += ("; driver peak RSS " + " / ".join(f"{figures[f'peak_rss_mb_{f}x']:.0f}" for f in (1, 2, 4))
                            + " MB at 1x/2x/4x the library")
    _log(json.dumps(figures))
    for factor, folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return figures


def _log(message: str) -> None:
    print(f"[bench.ingest] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "out/bench", quick="--quick" in sys.argv), indent=2))
