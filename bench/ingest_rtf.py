"""Ingest real-time factor by resolution: vmr's frame sampling + CLIP vs the plainest loop, and end-to-end ingest.

Real-time factor (RTF) = seconds of video indexed per wall-clock second (higher is better). Per resolution, on the
same file, back to back in one process, after a warm-up of the encoder:
  plain loop   the baseline: PyAV decodes EVERY frame, keeps the first frame at or after each 2-s clip start,
               the model's own PIL preprocessing, CLIP in batches of 64; no Ray, one process.
  vmr sample   indexer.decode.sample_clip_frames (seeks via the keyframe index, decodes only what it needs) +
               ClipEncoder.encode_frames_uint8; no Ray.
  vmr ingest   indexer.ingest.run_ingest on a folder holding that one file (Ray up and warm, DuckDB + FAISS
               writes included).
Decode frames/s counts frames decoded per second of the decode-only pass (plain: all frames; vmr: the sampled ones).
Videos: synthetic textured footage with motion (x264, 25 fps, keyframe every 2 s as streaming encoders use),
240p/480p/1080p, plus the one real clip in shared/data/real_video (270p, read in place, never copied) when present.
CLIP: ViT-B-32 architecture with random weights (compute is what matters; no download); --quick: a tiny config.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from bench.report import Section, machine_line, save_figure
from world import CLIP_TINY_CONFIG

ROOT = Path(__file__).resolve().parents[1]
# the checkout sits beside ../shared (VMR_SHARED_DATA overrides, as in the tests)
REAL_VIDEO = Path(os.environ.get("VMR_SHARED_DATA") or ROOT.parent / "shared" / "data") / "real_video" / "charades.mp4"
CLIP_SECONDS = 2.0
BATCH = 64
RESOLUTIONS = {"240p": (426, 240), "480p": (854, 480), "1080p": (1920, 1080)}


def make_textured_video(path: Path, size: tuple[int, int], seconds: float, fps: int = 25, seed: int = 0) -> Path:
    """x264 video of a random texture drifting across the frame, a new texture every 5 s, keyframe every 2 s."""
    import av

    width, height = size
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23"}
        stream.codec_context.gop_size = 2 * fps
        texture = None
        for i in range(int(seconds * fps)):
            if i % (5 * fps) == 0:  # new scene: a smooth random texture (blocky noise, upsampled)
                small = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
                texture = np.repeat(np.repeat(small, 8, 0), 8, 1)
            shift = (i * 3) % 8
            img = np.ascontiguousarray(texture[shift: shift + height, shift: shift + width])
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def video_seconds(path: Path) -> float:
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        if s.duration is not None:
            return float(s.duration * s.time_base)
        return float(c.duration / 1e6)


def plain_decode(path: Path) -> tuple[list[np.ndarray], int]:
    """Decode every frame; keep the first frame at or after t = 0, 2, 4, ... s. Returns (rgb frames, decoded)."""
    import av

    kept, decoded, next_t = [], 0, 0.0
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in c.decode(stream):
            decoded += 1
            t = frame.time if frame.time is not None else decoded / float(stream.average_rate or 25)
            if t + 1e-6 >= next_t:
                kept.append(frame.to_ndarray(format="rgb24"))
                next_t += CLIP_SECONDS
    return kept, decoded


def plain_loop(enc, path: Path) -> dict:
    import torch

    t0 = time.perf_counter()
    frames, decoded = plain_decode(path)
    t_dec = time.perf_counter() - t0
    feats = []
    for i in range(0, len(frames), BATCH):
        batch = torch.stack([enc.preprocess_frame(f) for f in frames[i: i + BATCH]])
        feats.append(enc.encode_images(batch))
    total = time.perf_counter() - t0
    return dict(seconds=total, decode_seconds=t_dec, decoded=decoded, clips=len(frames))


def vmr_sample(enc, resize, path: Path) -> dict:
    from indexer.decode import sample_clip_frames

    t0 = time.perf_counter()
    frames, sampled = sample_clip_frames(str(path), resize)
    t_dec = time.perf_counter() - t0
    for i in range(0, len(frames), BATCH):
        enc.encode_frames_uint8(frames[i: i + BATCH])
    total = time.perf_counter() - t0
    decoded = getattr(sampled, "decoded", None) or (sampled.get("decoded") if isinstance(sampled, dict) else None)
    return dict(seconds=total, decode_seconds=t_dec, decoded=decoded or len(frames), clips=len(frames))


def run(out_dir: str, quick: bool) -> Section:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import ray
    import torch

    from indexer.ingest import run_ingest
    from model.inference.features import ClipEncoder, frame_resizer

    model = str(CLIP_TINY_CONFIG) if quick else "ViT-B-32"
    seconds = 6.0 if quick else 20.0
    reps = 1 if quick else 3
    work = Path(tempfile.mkdtemp(prefix="vmr_bench_rtf_"))
    rows = []
    try:
        videos = {}
        for name, size in (list(RESOLUTIONS.items())[:1] if quick else RESOLUTIONS.items()):
            videos[name] = make_textured_video(work / name / f"{name}.mp4", size, seconds)
        if REAL_VIDEO.is_file() and not quick:
            (work / "real").mkdir()
            os.symlink(REAL_VIDEO, work / "real" / "real_270p.mp4")
            videos["real 270p"] = work / "real" / "real_270p.mp4"

        enc = ClipEncoder.load(model, None, device="auto", allow_random=True)
        resize = frame_resizer(enc.preprocess_cfg)
        warm = next(iter(videos.values()))
        plain_loop(enc, warm)
        vmr_sample(enc, resize, warm)
        if not quick:  # quick (CI smoke) skips the Ray column: starting Ray alone takes ~10-60 s here
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            if not quick:
                run_ingest(warm.parent, work / "idx_warm", model, None, allow_random=True, progress=False)
            for name, path in videos.items():
                dur = video_seconds(path)
                row = dict(name=name, seconds=dur)
                runs = {"plain": [], "vmr": []}
                for _ in range(reps):  # interleaved, so that load changes hit both sides alike
                    runs["plain"].append(plain_loop(enc, path))
                    runs["vmr"].append(vmr_sample(enc, resize, path))
                for key, rs in runs.items():
                    row[key] = dict(rs[0], seconds=float(np.median([r["seconds"] for r in rs])),
                                    decode_seconds=float(np.median([r["decode_seconds"] for r in rs])))
                if not quick:
                    t0 = time.perf_counter()
                    summary = run_ingest(path.parent, work / f"idx_{name.replace(' ', '_')}", model, None,
                                         allow_random=True, progress=False)
                    row["ingest"] = dict(seconds=time.perf_counter() - t0, clips=getattr(summary, "clips", None))
                rows.append(row)
        finally:
            if ray.is_initialized():
                ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        f"Baseline: the plainest loop (PyAV decodes every frame, one frame per 2 s to CLIP, no Ray), same file, same "
        f"process, back to back. (clip-video-encode, the usual stand-alone tool for this, does not install here: its "
        f"1.3.0 pins torch<2, numpy<2 and pyarrow<8, and pyarrow 7 has no Python 3.11 wheel and its source build "
        f"fails; checked in a side venv on 2026-11-25.) Machine: {machine_line()}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads. CLIP: {'tiny test config' if quick else 'ViT-B-32 (random weights)'}. Synthetic videos "
        f"{seconds:.0f} s, 25 fps, keyframe every 2 s; 'real 270p' is the 30.7-s real clip of shared/data. "
        f"Plain and vmr sample: median of {reps} interleaved runs after a warm-up; vmr ingest: one run into a fresh "
        "index (Ray and the CLIP actor already warm).",
        "",
        "| video | clips | plain RTF | vmr sample+CLIP RTF | vmr ingest RTF (Ray, DuckDB, FAISS) | vmr / plain "
        "| plain decode frames/s (all frames) | vmr decoded frames | plain decoded frames |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p, v = r["plain"], r["vmr"]
        r["rtf"] = {k: r["seconds"] / r[k]["seconds"] if k in r else float("nan") for k in ("plain", "vmr", "ingest")}
        ingest = f"{r['rtf']['ingest']:.1f}x" if "ingest" in r else "not run (quick)"
        lines.append(f"| {r['name']} | {v['clips']} | {r['rtf']['plain']:.1f}x | {r['rtf']['vmr']:.1f}x | "
                     f"{ingest} | {p['seconds'] / v['seconds']:.1f}x | "
                     f"{p['decoded'] / p['decode_seconds']:.0f} | {v['decoded']} | {p['decoded']} |")

    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(rows))
    for j, (key, label) in enumerate([("plain", "plain loop (baseline)"), ("vmr", "vmr sample + CLIP"),
                                      ("ingest", "vmr ingest (Ray)")]):
        ax.bar(x + (j - 1) * 0.27, [np.nan_to_num(r["rtf"][key]) for r in rows], 0.27, label=label)
    ax.set_xticks(x, [r["name"] for r in rows])
    ax.set_ylabel("real-time factor (video s / wall s)")
    ax.set_title("Indexing speed by resolution")
    ax.legend(fontsize=8)
    png = save_figure(fig, out_dir, "ingest_rtf.png")
    big = max(rows, key=lambda r: RESOLUTIONS.get(r["name"], (0, 0))[1])
    headline = (f"ingest RTF at {big['name']}: plain loop {big['rtf']['plain']:.1f}x, vmr sample+CLIP "
                f"{big['rtf']['vmr']:.1f}x" + (f", vmr ingest {big['rtf']['ingest']:.1f}x" if "ingest" in big else "")
                + " real time")
    return Section("Ingest: real-time factor by resolution vs the plainest loop", "\n".join(lines), [png], headline,
                   data=rows)
