"""SlowFast ingest benchmark, side by side in one run: the whole clip+slowfast ingest vs the SlowFast encoder alone.

    python -m bench.slowfast_ingest [--videos 2] [--seconds 6] [--long-seconds 6] [--out bench/results]

- encoder_clips_per_s: SlowFastR50 (random weights: compute is what matters) on windows decoded beforehand, in
  batches of SLOWFAST_BATCH, in this process with every core: the ceiling for the pipeline.
- ingest_clips_per_s: `run_ingest --features clip,slowfast` on the same videos into a fresh index, Ray up and the
  actors warm (a one-video run first); SlowFast clips stored / wall time. ratio = ingest / encoder (target >= 0.8).
- decode_s_per_video_minute: the one pass that feeds both kinds (indexer/frame_stream.py: every frame decoded, the
  SlowFast windows' frames scaled and cropped by the extractor's libavfilter chain, CLIP's frames by the tiny CLIP's
  resize), and for scale CLIP's seeking decode alone (indexer/decode.py).
- peak_rss_mb_{1,4}x: the ingest driver's peak RSS (a fresh process each) for one video of long_seconds and one 4x
  as long: flat when the segments stream.
Machine facts are detected at run time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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
SIZE = (320, 240)

RSS_SCRIPT = """
import json, resource, sys
import ray
from indexer.ingest import run_ingest
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
run_ingest(sys.argv[1], sys.argv[2], sys.argv[3], None, allow_random=True, progress=False,
           features=["clip", "slowfast"], slowfast_weights=sys.argv[4])
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_avg_1min": os.getloadavg()[0]}


def _encoder_rate(paths: list[Path], weights: str) -> tuple[float, int]:
    import torch

    from indexer.frame_stream import decode_kinds
    from indexer.slowfast_frames import normalise
    from indexer.workers import SLOWFAST_BATCH
    from model.inference.slowfast_weights import build_slowfast

    model = build_slowfast(weights)
    windows = np.concatenate([decode_kinds(str(p), None)[1] for p in paths])
    with torch.inference_mode():
        model(normalise(windows[:1]))  # warm-up
        start = time.perf_counter()
        for i in range(0, len(windows), SLOWFAST_BATCH):
            model(normalise(windows[i: i + SLOWFAST_BATCH]))
    return len(windows) / (time.perf_counter() - start), len(windows)


def _decode_rates(paths: list[Path], seconds: float) -> dict:
    from indexer.decode import sample_clip_frames
    from indexer.frame_stream import decode_kinds
    from model.inference.features import ClipEncoder, frame_resizer

    clip_resize = frame_resizer(ClipEncoder.load(TINY, None, device="cpu", allow_random=True).preprocess_cfg)
    minutes = len(paths) * seconds / 60.0
    start = time.perf_counter()
    for p in paths:
        decode_kinds(str(p), clip_resize)
    one_pass = time.perf_counter() - start
    start = time.perf_counter()
    for p in paths:
        sample_clip_frames(str(p), clip_resize)
    clip_only = time.perf_counter() - start
    return {"decode_s_per_video_minute": one_pass / minutes, "clip_decode_s_per_video_minute": clip_only / minutes}


def _ingest_rate(video_dir: Path, work: Path, weights: str) -> tuple[float, int]:
    import ray

    from indexer.ingest import run_ingest
    from store.library import Library

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        warm = work / "warm"
        videos.make_video(warm / "w.mp4", duration=2.0, fps=30, size=SIZE)
        run_ingest(warm, work / "warm_idx", TINY, None, allow_random=True, progress=False,
                   features=["clip", "slowfast"], slowfast_weights=weights)
        start = time.perf_counter()
        run_ingest(video_dir, work / "idx", TINY, None, allow_random=True, progress=False,
                   features=["clip", "slowfast"], slowfast_weights=weights)
        elapsed = time.perf_counter() - start
        with Library(work / "idx") as lib:
            clips = sum(len(v) for v in lib.features_many([v["id"] for v in lib.videos()], ["slowfast"]).values())
    finally:
        ray.shutdown()
    return clips / elapsed, clips


def _peak_rss(video: Path, work: Path, weights: str) -> float:
    folder = work / f"rss_{video.stem}"
    folder.mkdir()
    shutil.copy(video, folder / video.name)
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(folder), str(work / f"idx_{video.stem}"), TINY,
                          weights], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def run(n_videos: int, seconds: float, long_seconds: float) -> dict:
    from world.slowfast_random import save_random_slowfast

    work = Path(tempfile.mkdtemp(prefix="vmr_bench_sf_"))
    try:
        weights = str(save_random_slowfast(work / "slowfast_random.pyth"))
        lib = work / "videos"
        paths = [videos.make_video(lib / f"v{i}.mp4", duration=seconds, fps=30, size=SIZE,
                                   scene_seconds=2.0 + i).path for i in range(n_videos)]
        figures = {"machine": machine(), "videos": n_videos, "seconds": seconds, "size": list(SIZE), "fps": 30}
        figures.update(_decode_rates(paths, seconds))
        figures["encoder_clips_per_s"], figures["encoder_clips"] = _encoder_rate(paths, weights)
        figures["ingest_clips_per_s"], figures["ingest_clips"] = _ingest_rate(lib, work, weights)
        figures["ratio"] = figures["ingest_clips_per_s"] / figures["encoder_clips_per_s"]
        for factor in (1, 4):
            long_video = videos.make_video(work / f"long{factor}x.mp4", duration=long_seconds * factor, fps=30,
                                           size=SIZE).path
            figures[f"peak_rss_mb_{factor}x"] = _peak_rss(long_video, work, weights)
        figures["long_seconds"] = long_seconds
        figures["driver_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return figures
    finally:
        shutil.rmtree(work, ignore_errors=True)


def describe(f: dict) -> str:
    m = f["machine"]
    return "\n".join([
        "# SlowFast ingest (clip+slowfast) vs the SlowFast encoder alone",
        "",
        f"Machine (detected): {m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}, torch {m['torch']} "
        f"({m['torch_threads']} threads), Python {m['python']}; 1-min load average at start {m['load_avg_1min']:.1f}.",
        f"Library: {f['videos']} videos x {f['seconds']:g} s, {f['size'][0]}x{f['size'][1]} at {f['fps']} fps; "
        "random SlowFast-R50 weights, the test world's tiny CLIP.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| SlowFast encoder alone, same frames | {f['encoder_clips_per_s']:.3f} clips/s ({f['encoder_clips']} clips) |",
        f"| ingest clip+slowfast (Ray, actors warm) | {f['ingest_clips_per_s']:.3f} clips/s ({f['ingest_clips']} clips) |",
        f"| ratio ingest / encoder (target >= 0.8) | {f['ratio']:.2f} |",
        f"| one-pass decode for both kinds | {f['decode_s_per_video_minute']:.1f} s per video-minute |",
        f"| CLIP's seeking decode alone | {f['clip_decode_s_per_video_minute']:.1f} s per video-minute |",
        f"| driver peak RSS, {f['long_seconds']:g}-s video (1x) | {f['peak_rss_mb_1x']:.0f} MB |",
        f"| driver peak RSS, {4 * f['long_seconds']:g}-s video (4x) | {f['peak_rss_mb_4x']:.0f} MB |",
        "",
        f"Model time per video-minute at this rate: {30 / f['encoder_clips_per_s']:.0f} s (30 clips of 2 s).",
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--long-seconds", type=float, default=6.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    figures = run(args.videos, args.seconds, args.long_seconds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "slowfast_ingest.json").write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    (out / "slowfast_ingest.md").write_text(describe(figures), encoding="utf-8")
    print(describe(figures))


if __name__ == "__main__":
    main()
