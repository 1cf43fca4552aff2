"""On-screen text channel: shown-phrase search (visual only vs ocr only vs fused), OCR character errors by text
size, ingest cost.

    python -m bench.ocr [--videos 50] [--out bench/results]

The captioned world (world.screen_text): ``videos`` scene videos of 40 s at 640x360, each showing 5 phrases one
after another (4-8 s each, at a random offset in its slot), each drawn at a size from SIZES (the largest that fits
the frame when the drawn one does not). Phrases are three words from a small vocabulary, so many share words with
others (a near-duplicate differs in one word). Every phrase is a query, unquoted; its moment is the span it is
shown (not widened to the clip grid: a track is placed by the samples that saw it, the clips whose middles fall
inside the span). The pictures carry nothing about the phrases: visual only is the chance floor, the
question is what the ocr channel finds and whether fusion keeps it. Ingest: visual-only first, then the ocr channel
added (incremental), so its wall time is measured alone. VCMR R@k at IoU 0.5/0.7, 95% bootstrap intervals over
queries. Character error rate: edit distance of the stored track text (normalised) against the phrase, per size.
Machine facts are read at run time. No reranker (rerank=False).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import Section, machine_line
from bench.text_channels import (ADJ, NOUN, VERB, own_ray, recall_over_queries, recall_table, timed_ingest,
                                 unique_texts, word_errors)
from retriever.fusion import FusionConfig

SIZES = (14, 18, 24, 32, 40, 48, 64)
SIZE = (640, 360)
DURATION = 40.0
SLOTS = (0.5, 8.5, 16.5, 24.5, 32.5)
ROWS = {"visual only": ["visual"], "ocr only": ["ocr"], "fused": None}


def phrases(n: int, rng: np.random.Generator) -> list[str]:
    return unique_texts(n, rng, lambda r: f"{r.choice(ADJ)} {r.choice(NOUN)} {r.choice(VERB)}")


def build(videos_dir: Path, n_videos: int, seed: int = 0) -> list[dict]:
    """The captioned videos; one row per phrase: {path, text, start, end, px}."""
    from world.screen_text import MARGIN, _font, make_text_video

    rng = np.random.default_rng(seed)
    texts = phrases(n_videos * len(SLOTS), rng)
    rows = []
    for v in range(n_videos):
        captions = []
        for i, slot in enumerate(SLOTS):
            text = texts[v * len(SLOTS) + i]
            px = int(rng.choice(SIZES))
            while _font(px).getlength(text) + 4 * MARGIN > SIZE[0]:
                px = max(s for s in SIZES if s < px)
            start = slot + float(rng.uniform(0.0, 3.0))
            captions.append((round(start, 2), round(min(DURATION, start + float(rng.uniform(4.0, 5.0))), 2), text, px))
        name = f"shown{v:03d}.mp4"
        make_text_video(videos_dir / name, DURATION, captions, size=SIZE)
        rows += [{"path": name, "text": t, "start": a, "end": b, "px": px} for a, b, t, px in captions]
    return rows


def cer_by_size(index_dir: str, rows: list[dict]) -> dict:
    """{px: CER %} of the track read over each phrase's span (the longest overlapping one; none read: all
    characters wrong) against the phrase, both normalised (indexer.ocr.normalised)."""
    import duckdb

    from indexer.ocr import normalised

    con = duckdb.connect(os.path.join(index_dir, "library.duckdb"), read_only=True)
    tracks = con.execute("SELECT v.path, s.start, s.\"end\", s.text FROM text_segments s JOIN videos v "
                         "ON v.id = s.video_id WHERE s.channel = 'ocr'").fetchall()
    con.close()
    errors, total = {}, {}
    for row in rows:
        over = [(min(b, row["end"]) - max(a, row["start"]), t) for p, a, b, t in tracks
                if p == row["path"] and min(b, row["end"]) > max(a, row["start"])]
        hyp = normalised(max(over)[1]) if over else ""
        ref = normalised(row["text"])
        wrong = word_errors(list(ref), list(hyp))  # Levenshtein over characters
        errors[row["px"]] = errors.get(row["px"], 0) + min(len(ref), wrong)
        total[row["px"]] = total.get(row["px"], 0) + len(ref)
    return {f"{px} px": round(100.0 * errors[px] / total[px], 1) for px in sorted(errors)}


def search_rows(index_dir: str, rows: list[dict]) -> dict:
    by_size = {}

    def note_size(name, row, found):
        if name == "ocr only":
            by_size.setdefault(row["px"], []).append(found["VCMR_R1@0.5"])

    out = recall_over_queries(index_dir, rows, {name: (channels, None) for name, channels in ROWS.items()},
                              lambda row: (row["start"], row["end"]), note_size)
    out["ocr_r1_by_size"] = {f"{px} px": [round(100.0 * float(np.mean(v)), 1), len(v)]
                             for px, v in sorted(by_size.items())}
    return out


def run(out_dir, quick: bool = False, n_videos: int | None = None) -> dict:
    n_videos = n_videos or (4 if quick else 50)
    own_ray()
    with tempfile.TemporaryDirectory(prefix="vmr-ocr-bench-") as tmp:
        videos, index = Path(tmp) / "videos", str(Path(tmp) / "index")
        t0 = time.perf_counter()
        rows = build(videos, n_videos)
        built_s = time.perf_counter() - t0
        _, visual_s = timed_ingest(videos, index, ["visual"])
        ocr, ocr_s = timed_ingest(videos, index, ["visual", "ocr"])
        done = ocr.channels["ocr"]
        minutes = n_videos * DURATION / 60.0
        result = {"machine": machine_line(), "load_average_1min_at_end": round(os.getloadavg()[0], 1),
                  "videos": n_videos, "queries": len(rows), "video_minutes": minutes, "frame_size": list(SIZE),
                  "build_s": round(built_s, 1),
                  "ingest": {"visual_run_s": round(visual_s, 1), "ocr_run_s": round(ocr_s, 1),
                             "ocr_read_s": round(done["seconds"], 1),
                             "ocr_s_per_video_minute": round(done["seconds"] / minutes, 2),
                             "visual_s_per_video_minute": round(visual_s / minutes, 2),
                             "ocr_realtime_factor": round(done["video_s"] / done["seconds"], 1),
                             "states": done["states"]},
                  "cer_by_size": cer_by_size(index, rows),
                  **search_rows(index, rows), "fusion": FusionConfig.load().to_dict()}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        Path(out_dir, "ocr.json").write_text(json.dumps(result, indent=1))
        Path(out_dir, "ocr.md").write_text("# On-screen text channel: shown-phrase search, OCR, ingest cost\n\n"
                                           + describe(result).markdown)
    return result


def describe(r: dict) -> Section:
    ing = r["ingest"]
    lines = [f"Machine: {r['machine']} (load average {r['load_average_1min_at_end']} at the end). {r['videos']} "
             f"captioned-world videos of {DURATION:.0f} s at {r['frame_size'][0]}x{r['frame_size'][1]} "
             f"({r['video_minutes']:.1f} min), {r['queries']} shown-phrase queries (unquoted), no reranker. "
             "VCMR R@k (%) with 95% bootstrap intervals over queries; a moment is the span a phrase is shown.",
             "", *recall_table(r["recall"])]
    lines += ["", "The pictures carry nothing about the phrases: visual only is the chance floor of this world. "
              f"`fused` is the shipped rule (retriever/fusion.json: ocr weight {r['fusion']['weights'].get('ocr')}, "
              f"k {r['fusion']['k']:g}).",
              "", "OCR only, R1@0.5 by text size (%, queries): "
              + ", ".join(f"{k} {v[0]} ({v[1]})" for k, v in r["ocr_r1_by_size"].items()),
              "", "Character error rate by text size (RapidOCR PP-OCRv6 small, the track over the phrase's span): "
              + ", ".join(f"{k} {v}%" for k, v in r["cer_by_size"].items()),
              "", f"Ingest cost: ocr {ing['ocr_s_per_video_minute']} s per video-minute (one frame per 2-s clip: "
              f"decode + detection + recognition, {ing['ocr_realtime_factor']}x real time) vs the visual run "
              f"{ing['visual_s_per_video_minute']} s per video-minute (whole `vmr index` run, world CLIP: Ray start "
              f"and the CLIP actor included); ocr outcomes {ing['states']}.",
              f"Query time of the text channel (tantivy + DuckDB rows), p50: {r['text_search_ms_p50']} ms."]
    fused, alone = r["recall"]["fused"]["VCMR_R1@0.5"][0], r["recall"]["ocr only"]["VCMR_R1@0.5"][0]
    return Section("On-screen text channel", "\n".join(lines) + "\n", [],
                   f"shown phrases R1@0.5 ocr {alone:.1f}, fused {fused:.1f}; "
                   f"ocr ingest {ing['ocr_s_per_video_minute']} s/video-min")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ocr", description=__doc__)
    parser.add_argument("--videos", type=int, default=50)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    print(describe(run(args.out, n_videos=args.videos)).markdown)


if __name__ == "__main__":
    main()
