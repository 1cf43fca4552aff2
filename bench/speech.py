"""Speech channel: spoken-phrase search (visual-only vs speech-only vs fused), ASR word error by SNR, ingest cost.

    python -m bench.speech [--videos 50] [--out bench/results]     (suite: `python -m bench --section speech`)

The talking world (world.speech): ``videos`` scene videos of 40 s, each saying 4 sentences (espeak-ng) at known
offsets ~10 s apart, long silences between; each video's noise is one of none / 20 / 10 / 5 dB SNR in turn. The
sentences are drawn from a small vocabulary, so many share words with others (word matching alone is not enough
to find one). Every sentence is a query, verbatim and unquoted; its moment is the voiced span widened to the 2-s clip
grid. The pictures are scene colours that carry nothing about the sentences: visual-only is the chance floor here,
and the question is whether fusion keeps speech's recall. Ingest: the library is indexed visual-only, then the
speech channel is added (incremental), so each channel's wall time is measured on its own. Beam: tiny.en greedy
(vmr's default) vs beam 5 on a subset, in-process. VCMR R@k at IoU 0.5/0.7, 95% bootstrap intervals over queries.
Machine facts are read at run time. No reranker (rerank=False): the coarse visual channel.
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

PLACE = "under the bridge|near the river|behind the station|inside the garden|on the roof|beside the library".split("|")
SNRS = (None, 20.0, 10.0, 5.0)
OFFSETS = (2.0, 12.0, 22.0, 32.0)
DURATION = 40.0
ROWS = {"visual only": ["visual"], "speech only": ["speech"], "fused": None}
SPEECH_WEIGHTS = (1.0, 4.0)  # the fused row's sensitivity to the speech weight (the shipped one: fusion.json)


def sentences(n: int, rng: np.random.Generator) -> list[str]:
    return unique_texts(n, rng, lambda r: f"the {r.choice(ADJ)} {r.choice(NOUN)} {r.choice(VERB)} {r.choice(PLACE)}")


def build(videos_dir: Path, n_videos: int, seed: int = 0) -> list[dict]:
    """The talking videos; returns one row per sentence: {path, text, start, end, snr}."""
    from world.speech import make_talking_video

    rng = np.random.default_rng(seed)
    texts = sentences(n_videos * len(OFFSETS), rng)
    rows = []
    for v in range(n_videos):
        snr = SNRS[v % len(SNRS)]
        utter = [(o + float(rng.uniform(0, 2)), texts[v * len(OFFSETS) + i]) for i, o in enumerate(OFFSETS)]
        name = f"talk{v:03d}.mp4"
        video = make_talking_video(videos_dir / name, DURATION, utter, snr, seed=v)
        rows += [{"path": name, "text": s.text, "start": s.start, "end": s.end, "snr": snr} for s in video.said]
    return rows


def wer_by_snr(index_dir: str, rows: list[dict]) -> dict:
    """{snr: WER %} of the stored transcript words inside each sentence's span (±0.5 s) against the sentence."""
    import duckdb

    from store.text_index import tokens

    con = duckdb.connect(os.path.join(index_dir, "library.duckdb"), read_only=True)
    words = con.execute("SELECT v.path, w.word, w.start FROM (SELECT video_id, unnest(words) AS word, "
                        "unnest(word_starts) AS start FROM text_segments) w JOIN videos v ON v.id = w.video_id"
                        ).fetchall()
    con.close()
    errors, total = {}, {}
    for row in rows:
        hyp = [t for p, w, s in words if p == row["path"] and row["start"] - 0.5 <= s <= row["end"] + 0.5
               for t in tokens(w)]
        ref = tokens(row["text"])
        key = "clean" if row["snr"] is None else f"{row['snr']:.0f} dB"
        errors[key] = errors.get(key, 0) + word_errors(ref, hyp)
        total[key] = total.get(key, 0) + len(ref)
    return {k: round(100.0 * errors[k] / total[k], 1) for k in errors}


def beam_cost(videos_dir: Path, rows: list[dict], n: int) -> dict:
    """Seconds and WER of tiny.en greedy vs beam 5 over the first ``n`` videos, in this process (2 threads)."""
    from faster_whisper import WhisperModel

    from indexer.audio import decode_audio
    from indexer.speech import DECODE_OPTIONS, packaged_model
    from store.text_index import tokens

    model = WhisperModel(packaged_model()[1], device="cpu", compute_type="int8", cpu_threads=os.cpu_count() or 2)
    paths = sorted({r["path"] for r in rows})[:n]
    out = {}
    for beam in (1, 5):
        seconds, errors, total = 0.0, 0, 0
        for path in paths:
            audio = decode_audio(str(videos_dir / path))
            t0 = time.perf_counter()
            segments, _ = model.transcribe(audio.samples, **{**DECODE_OPTIONS, "beam_size": beam})
            words = [(w.start, t) for s in segments for w in s.words for t in tokens(w.word)]
            seconds += time.perf_counter() - t0
            for row in (r for r in rows if r["path"] == path):
                hyp = [t for s, t in words if row["start"] - 0.5 <= s <= row["end"] + 0.5]
                errors += word_errors(tokens(row["text"]), hyp)
                total += len(tokens(row["text"]))
        out[f"beam {beam}"] = {"seconds": round(seconds, 2), "wer": round(100.0 * errors / total, 1)}
    out["videos"] = len(paths)
    return out


def search_rows(index_dir: str, rows: list[dict]) -> dict:
    from dataclasses import replace

    from model.spans import CLIP_SECONDS
    from retriever.fusion import snap

    shipped = FusionConfig.load()
    configs = {name: (channels, None) for name, channels in ROWS.items()}
    configs.update({f"fused, speech weight {w:g}": (None, replace(shipped, weights={**shipped.weights, "speech": w}))
                    for w in SPEECH_WEIGHTS})
    return recall_over_queries(index_dir, rows, configs,
                               lambda row: snap(row["start"], row["end"], CLIP_SECONDS, DURATION))


def run(out_dir, quick: bool = False, n_videos: int | None = None) -> dict:
    from world.speech import espeak_absent

    if espeak_absent():
        raise RuntimeError(espeak_absent())
    n_videos = n_videos or (4 if quick else 50)
    own_ray()
    with tempfile.TemporaryDirectory(prefix="vmr-speech-bench-") as tmp:
        videos, index = Path(tmp) / "videos", str(Path(tmp) / "index")
        t0 = time.perf_counter()
        rows = build(videos, n_videos)
        built_s = time.perf_counter() - t0
        visual, visual_s = timed_ingest(videos, index, ["visual"])
        speech, speech_s = timed_ingest(videos, index, ["visual", "speech"])
        minutes = n_videos * DURATION / 60.0
        result = {"machine": machine_line(), "load_average_1min_at_end": round(os.getloadavg()[0], 1), "videos": n_videos, "queries": len(rows), "video_minutes": minutes,
                  "build_s": round(built_s, 1),
                  "ingest": {"visual_run_s": round(visual_s, 1), "speech_run_s": round(speech_s, 1),
                             "speech_transcribe_s": round(speech.speech["seconds"], 1),
                             "speech_s_per_video_minute": round(speech.speech["seconds"] / minutes, 2),
                             "visual_s_per_video_minute": round(visual_s / minutes, 2),
                             "speech_realtime_factor": round(speech.speech["audio_s"] / speech.speech["seconds"], 1),
                             "states": speech.speech["states"]},
                  "wer_by_snr": wer_by_snr(index, rows),
                  **search_rows(index, rows), "fusion": FusionConfig.load().to_dict(),
                  "beam": beam_cost(videos, rows, 2 if quick else 8)}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        Path(out_dir, "speech.json").write_text(json.dumps(result, indent=1))
        Path(out_dir, "speech.md").write_text("# Speech channel: spoken-phrase search, ASR, ingest cost\n\n"
                                              + describe(result).markdown)
    return result


def describe(r: dict) -> Section:
    ing = r["ingest"]
    load = f" (load average {r['load_average_1min_at_end']} at the end)" if "load_average_1min_at_end" in r else ""
    lines = [f"Machine: {r['machine']}{load}. {r['videos']} talking-world videos of {DURATION:.0f} s "
             f"({r['video_minutes']:.1f} min), {r['queries']} spoken-sentence queries (verbatim), no reranker. "
             "VCMR R@k (%) with 95% bootstrap intervals over queries; a moment is the voiced span on the 2-s grid.",
             "", *recall_table(r["recall"])]
    lines += ["", "The pictures carry nothing about the sentences: visual only is the chance floor of this world. "
              "`fused` is the shipped rule (retriever/fusion.json: speech weight "
              f"{r['fusion']['weights']['speech']:g}, k {r['fusion']['k']:g}); the rows below it change only the "
              "speech weight.",
              "", "ASR word error rate by SNR (Whisper tiny.en, greedy): "
              + ", ".join(f"{k} {v}%" for k, v in r["wer_by_snr"].items()),
              "", f"Ingest cost: speech {ing['speech_s_per_video_minute']} s per video-minute (transcription, "
              f"{ing['speech_realtime_factor']}x real time) vs the visual run {ing['visual_s_per_video_minute']} s "
              f"per video-minute (whole `vmr index` run, world CLIP: Ray start and the CLIP actor included); "
              f"speech outcomes {ing['states']}.",
              f"Query time of the text channel (tantivy + DuckDB rows), p50: {r['text_search_ms_p50']} ms.",
              "", "Beam search (in-process, first {} videos): ".format(r["beam"]["videos"])
              + ", ".join(f"{k}: {v['seconds']} s, WER {v['wer']}%" for k, v in r["beam"].items() if k != "videos")]
    fused, speech = r["recall"]["fused"]["VCMR_R1@0.5"][0], r["recall"]["speech only"]["VCMR_R1@0.5"][0]
    return Section("Speech channel", "\n".join(lines) + "\n", [],
                   f"spoken queries R1@0.5 speech {speech:.1f}, fused {fused:.1f}; "
                   f"speech ingest {ing['speech_s_per_video_minute']} s/video-min")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.speech", description=__doc__)
    parser.add_argument("--videos", type=int, default=50)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    print(describe(run(args.out, n_videos=args.videos)).markdown)


if __name__ == "__main__":
    main()
