"""Precision's accuracy and size side (issue 10), beside bench/rerank.py's speed.

    python -m bench.precision --out DIR [--only vcmr clip ingest convert]

- vcmr: the trained world reranker's library search at fp32 / bf16 / int8 (forced: ``auto`` keeps such small blocks
  fp32) on held-out synthetic libraries, every candidate window reranked (no time budget), the same queries:
  VCMR R@{1,5} at IoU 0.5 / 0.7.
- clip: the world CLIP on rendered world videos at fp32 and bf16 autocast: per-clip cosine between the two
  embeddings, and coarse recall@{10,100} (the query's best clips by cosine, each precision with its own query
  embedding as search does, hold a clip inside the query's moment).
- ingest: `vmr index` end to end at ``auto`` against the CLIP image encoder alone at fp32 and at bf16 on the same
  frames (ViT-B-32 architecture, random weights: compute is what matters), as bench/ingest.py measures fp32.
- convert: an authors'-format checkpoint at the paper shape (their model, 3 x 4096-d blocks, random weights rounded
  to fp16 values as LLaMA-7B's released weights are, stored fp32 as their train.py saves it) converted by
  `vmr convert-checkpoint`: file sizes.
Writes precision.json and precision.md in DIR.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import machine_line

STUDIES = ("vcmr", "clip", "ingest", "convert")
VCMR_KEYS = [f"VCMR_R{k}@{t}" for t in (0.5, 0.7) for k in (1, 5)]


def world_vcmr(work: Path, n_libraries: int = 3, n_videos: int = 100, seed: int = 7001) -> dict:
    from bench.search import make_library
    from model.inference.features import ClipEncoder
    from retriever.search import SearchEngine
    from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS, WORLD_RERANKER
    from retriever.vcmr import query_hits

    encoder = ClipEncoder.load(str(WORLD_CLIP_CONFIG), str(WORLD_CLIP_WEIGHTS), device="cpu")
    hits = {p: {k: [] for k in VCMR_KEYS} for p in ("fp32", "bf16", "int8")}
    for k in range(n_libraries):
        index = work / f"library{k}"
        queries = make_library(index, n_videos, encoder, seed=seed + k)
        for precision, got in hits.items():
            with SearchEngine(index, checkpoint=str(WORLD_RERANKER), device="cpu", precision=precision,
                              rerank_budget_s=None) as engine, engine.library.session():
                engine.encoder = encoder
                assert engine.reranker.model.precision == precision
                for q in queries:
                    ranked = engine.search(q["query"], top_k=10).moments
                    gt = engine.library.resolve_vid(q["vid"])
                    for key, hit in query_hits(ranked, gt, q["relevant_windows"], (1, 5), (0.5, 0.7)).items():
                        got[key].append(hit)
        shutil.rmtree(index, ignore_errors=True)
    out = {p: {key: 100 * float(np.mean(v)) for key, v in got.items()} for p, got in hits.items()}
    out["queries"] = len(hits["fp32"][VCMR_KEYS[0]])
    out["videos"], out["libraries"] = n_videos, n_libraries
    # queries whose hits differ from fp32's at all (any metric)
    for p in ("bf16", "int8"):
        out[p]["queries_changed"] = int(sum(any(hits[p][key][i] != hits["fp32"][key][i] for key in VCMR_KEYS)
                                            for i in range(out["queries"])))
    return out


def clip_study(work: Path, n_videos: int = 30, seed: int = 11) -> dict:
    import torch

    from indexer.decode import sample_clip_frames
    from model.inference.features import ClipEncoder, frame_resizer
    from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS
    from world.generator import build_world

    videos, rows = build_world(work / "world", n_videos=n_videos, seed=seed, long_videos=0)
    enc = {p: ClipEncoder.load(str(WORLD_CLIP_CONFIG), str(WORLD_CLIP_WEIGHTS), device="cpu", precision=p)
           for p in ("fp32", "bf16")}
    resize = frame_resizer(enc["fp32"].preprocess_cfg)
    clips = {p: [] for p in enc}
    owner = []  # (video file stem, clip index) of each row
    for path in sorted((work / "world" / "videos").iterdir()):
        frames = sample_clip_frames(str(path), resize)[0]
        for p, e in enc.items():
            clips[p].append(np.asarray(e.encode_frames_uint8(frames), dtype=np.float32))
        owner += [(path.stem, i) for i in range(len(frames))]
    emb = {p: np.concatenate(v) for p, v in clips.items()}
    emb = {p: v / np.linalg.norm(v, axis=1, keepdims=True) for p, v in emb.items()}
    cos = (emb["fp32"] * emb["bf16"]).sum(1)
    out = dict(videos=n_videos, clips=len(owner), queries=len(rows), clip_cosine_min=float(cos.min()),
               clip_cosine_median=float(np.median(cos)))
    with torch.inference_mode():
        text = {p: np.asarray(e.encode_text([r["query"] for r in rows]), dtype=np.float32) for p, e in enc.items()}
    text_cos = (text["fp32"] * text["bf16"]).sum(1) / np.linalg.norm(text["fp32"], axis=1) \
        / np.linalg.norm(text["bf16"], axis=1)
    out["query_cosine_min"] = float(text_cos.min())
    for p in enc:
        scores = text[p] @ emb[p].T  # [queries, clips]
        for k in (10, 100):
            top = np.argsort(-scores, axis=1)[:, :k]
            found = []
            for row, best in zip(rows, top):
                found.append(any(owner[i][0] == Path(row["vid"]).stem and any(
                    2 * owner[i][1] < ed and 2 * owner[i][1] + 2 > st for st, ed in row["relevant_windows"])
                    for i in best))
            out[f"{p}_recall@{k}"] = 100 * float(np.mean(found))
    return out


def ingest_study(work: Path, n_videos: int = 8, seconds: float = 120.0) -> dict:
    from bench.ingest import BATCH_FRAMES, _ingest_rate, _make_library
    from indexer.decode import sample_clip_frames
    from model.inference.features import ClipEncoder, frame_resizer
    from model.inference.precision import clip_precision, detect_hardware

    model = "ViT-B-32"
    base = work / "videos"
    paths = _make_library(base, n_videos, seconds)
    rates, embeddings = {}, {}
    for precision in ("fp32", "bf16"):
        enc = ClipEncoder.load(model, None, device="cpu", allow_random=True, precision=precision)
        frames = np.concatenate([sample_clip_frames(str(p), frame_resizer(enc.preprocess_cfg))[0] for p in paths])
        enc.encode_frames_uint8(frames[:BATCH_FRAMES])  # warm-up
        start, parts = time.perf_counter(), []
        for i in range(0, len(frames), BATCH_FRAMES):
            parts.append(np.asarray(enc.encode_frames_uint8(frames[i: i + BATCH_FRAMES]), dtype=np.float32))
        rates[precision] = len(frames) / (time.perf_counter() - start)
        embeddings[precision] = np.concatenate(parts)
        del enc
        gc.collect()
    a, b = embeddings["fp32"], embeddings["bf16"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    accurate = [p for p in rates if p == "fp32" or float(cos.min()) >= 0.999]
    fastest = max(accurate, key=rates.get)
    ingest_rate, startup, clips = _ingest_rate(model, base, work)
    return dict(model=model, clips=clips, auto=clip_precision("auto", detect_hardware("cpu")),
                encoder_fp32=rates["fp32"], encoder_bf16=rates["bf16"], bf16_cosine_min=float(cos.min()),
                fastest_accurate=fastest, ingest_auto=ingest_rate, ratio=ingest_rate / rates[fastest],
                startup_s=startup)


def convert_study(work: Path) -> dict:
    import torch

    from bench.rerank import authors_args, build_authors, import_authors_copy, paper_shape, prepare_authors_copy
    from model.inference.convert import convert_authors_checkpoint

    shape = paper_shape(False)
    prepare_authors_copy(str(work), cuda=False)
    import_authors_copy(str(work))
    torch.manual_seed(0)
    model = build_authors(shape, "float32", "cpu")
    state = model.state_dict()
    del model
    for key, t in state.items():
        if ".llama." in key and t.is_floating_point():
            t.copy_(t.half().float())  # LLaMA-7B's released weights are fp16 values; their train.py saves fp32
    src, out = work / "authors_paper_shape.ckpt", work / "converted.pt"
    torch.save({"model": state, "opt": authors_args(shape, "cpu")}, src)
    del state
    gc.collect()
    convert_authors_checkpoint(str(src), str(out), llm_blocks="copy")
    ref = work / "converted_reference.pt"
    convert_authors_checkpoint(str(src), str(ref), llm_blocks="reference")
    return dict(authors_mb=os.path.getsize(src) / 1e6, converted_mb=os.path.getsize(out) / 1e6,
                ratio=os.path.getsize(out) / os.path.getsize(src), reference_mb=os.path.getsize(ref) / 1e6,
                reference_ratio=os.path.getsize(ref) / os.path.getsize(src))


def describe(res: dict) -> list[str]:
    lines = [f"Machine: {machine_line()}; {res.get('load', '')}"]
    if "vcmr" in res:
        v = res["vcmr"]
        lines += ["", f"World reranker search at each precision ({v['queries']} held-out queries, {v['libraries']} "
                  f"synthetic libraries of {v['videos']} videos, every candidate window reranked):", "",
                  "| precision | " + " | ".join(VCMR_KEYS) + " | queries with any hit changed |",
                  "|---|" + "---:|" * (len(VCMR_KEYS) + 1)]
        for p in ("fp32", "bf16", "int8"):
            lines.append(f"| {p} | " + " | ".join(f"{v[p][k]:.1f}" for k in VCMR_KEYS)
                         + f" | {v[p].get('queries_changed', '-')} |")
    if "clip" in res:
        c = res["clip"]
        lines += ["", f"World CLIP, fp32 vs bf16 autocast ({c['videos']} rendered world videos, {c['clips']} clips, "
                  f"{c['queries']} queries): per-clip cosine min {c['clip_cosine_min']:.5f} / median "
                  f"{c['clip_cosine_median']:.5f}, query embeddings min {c['query_cosine_min']:.5f}; coarse recall@10 "
                  f"{c['fp32_recall@10']:.1f} vs {c['bf16_recall@10']:.1f}, recall@100 {c['fp32_recall@100']:.1f} vs "
                  f"{c['bf16_recall@100']:.1f} (fp32 vs bf16)."]
    if "ingest" in res:
        g = res["ingest"]
        lines += ["", f"Ingest at `auto` (CLIP {g['auto']}), {g['model']} architecture, {g['clips']} clips: "
                  f"{g['ingest_auto']:.1f} clips/s end to end; the encoder alone {g['encoder_fp32']:.1f} clips/s "
                  f"fp32, {g['encoder_bf16']:.1f} bf16 (cosine to fp32 min {g['bf16_cosine_min']:.5f}); fastest "
                  f"accurate: {g['fastest_accurate']} -> **{g['ratio']:.2f}x** (target >= 0.8)."]
    if "convert" in res:
        c = res["convert"]
        lines += ["", f"Converted checkpoint: an authors'-format checkpoint at the paper shape {c['authors_mb']:.0f} "
                  f"MB -> `vmr convert-checkpoint --llm-blocks copy` {c['converted_mb']:.0f} MB = {c['ratio']:.2f}x"
                  + (f"; `--llm-blocks reference` (the default) {c['reference_mb']:.0f} MB = **{c['reference_ratio']:.2f}x**"
                     if "reference_mb" in c else "") + " (target <= 0.5)."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", choices=STUDIES, default=list(STUDIES))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "precision.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    res["load"] = f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    studies = dict(vcmr=world_vcmr, clip=clip_study, ingest=ingest_study, convert=convert_study)
    for name in args.only:
        work = Path(tempfile.mkdtemp(prefix=f"vmr_bench_precision_{name}_"))
        try:
            t0 = time.perf_counter()
            res[name] = studies[name](work)
            res[name]["seconds"] = time.perf_counter() - t0
        finally:
            shutil.rmtree(work, ignore_errors=True)
        path.write_text(json.dumps(res, indent=1))
        print(json.dumps({name: res[name]}), flush=True)
    text = "\n".join(describe(res))
    (out / "precision.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
