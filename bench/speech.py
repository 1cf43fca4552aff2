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
from bench.search import bootstrap
from retriever.fusion import FusionConfig

ADJ = "red green blue silver golden wooden tiny heavy quiet broken shiny frozen".split()
NOUN = "kettle bicycle lantern piano ladder suitcase umbrella teapot violin rocket tractor mirror".split()
VERB = "rolls waits sleeps spins floats falls shines hides".split()
PLACE = "under the bridge|near the river|behind the station|inside the garden|on the roof|beside the library".split("|")
SNRS = (None, 20.0, 10.0, 5.0)
OFFSETS = (2.0, 12.0, 22.0, 32.0)
DURATION = 40.0
ROWS = {"visual only": ["visual"], "speech only": ["speech"], "fused": None}
SPEECH_WEIGHTS = (1.0, 4.0)  # the fused row's sensitivity to the speech weight (the shipped one: fusion.json)
METRICS = ("VCMR_R1@0.5", "VCMR_R5@0.5", "VCMR_R1@0.7", "VCMR_R5@0.7")


def sentences(n: int, rng: np.random.Generator) -> list[str]:
    out, seen = [], set()
    while len(out) < n:
        s = f"the {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} {rng.choice(PLACE)}"
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


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


def word_errors(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words (or any two sequences: bench.ocr passes characters)."""
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[-1]


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
    from model.spans import CLIP_SECONDS
    from dataclasses import replace

    from retriever.fusion import snap
    from retriever.search import SearchEngine
    from retriever.vcmr import query_hits

    hits = {}
    text_ms = []
    with SearchEngine(index_dir, rerank=False, device="cpu") as engine:
        ids = {v["path"]: int(v["id"]) for v in engine.library.videos()}
        shipped = engine.fusion
        configs = {name: (channels, shipped) for name, channels in ROWS.items()}
        configs.update({f"fused, speech weight {w:g}": (None, replace(shipped, weights={**shipped.weights,
                                                                                       "speech": w}))
                        for w in SPEECH_WEIGHTS})
        for row in rows:
            gt = [snap(row["start"], row["end"], CLIP_SECONDS, DURATION)]
            for name, (channels, fusion) in configs.items():
                engine.fusion = fusion
                result = engine.search(row["text"], top_k=5, channels=channels)
                if name == "fused":
                    text_ms.append(result.timings["text_search"] * 1e3)
                for key, ok in query_hits(result.moments, ids[row["path"]], gt, (1, 5), (0.5, 0.7)).items():
                    hits.setdefault(name, {m: [] for m in METRICS})[key].append(ok)
    rng = np.random.default_rng(0)
    return {"recall": {name: bootstrap(h, rng) for name, h in hits.items()},
            "text_search_ms_p50": round(float(np.median(text_ms)), 2)}


def run(out_dir, quick: bool = False, n_videos: int | None = None) -> dict:
    from indexer.ingest import run_ingest
    from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS
    from world.speech import espeak_absent

    if espeak_absent():
        raise RuntimeError(espeak_absent())
    import ray

    n_videos = n_videos or (4 if quick else 50)
    if not ray.is_initialized():  # this machine's own Ray: never another user's cluster found running here
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory(prefix="vmr-speech-bench-") as tmp:
        videos, index = Path(tmp) / "videos", str(Path(tmp) / "index")
        t0 = time.perf_counter()
        rows = build(videos, n_videos)
        built_s = time.perf_counter() - t0

        def ingest(channels):
            t = time.perf_counter()
            summary = run_ingest(str(videos), index, clip_model=str(WORLD_CLIP_CONFIG),
                                 clip_pretrained=str(WORLD_CLIP_WEIGHTS), device="cpu", progress=False,
                                 channels=channels)
            return summary, time.perf_counter() - t

        visual, visual_s = ingest(["visual"])
        speech, speech_s = ingest(["visual", "speech"])
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
             "", "| row | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, rec in r["recall"].items():
        lines.append(f"| {name} | " + " | ".join(f"{rec[m][0]:.1f} [{rec[m][1]:.1f}, {rec[m][2]:.1f}]"
                                                  for m in METRICS) + " |")
    lines += ["", "The pictures carry nothing about the sentences: visual only is the chance floor of this world. "
              "`fused` is the shipped rule (retriever/fusion.json: speech weight "
              f"{r['fusion']['weights']['speech']:g}, k {r['fusion']['k']:g}); the rows below it change only the "
              "speech weight.",
              "", f"ASR word error rate by SNR (Whisper tiny.en, greedy): "
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
