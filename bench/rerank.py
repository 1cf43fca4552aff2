"""Rerank benchmark: the LLMEPET forward at the paper's shape, every precision and batch size, vs the authors' code.

Paper shape: the authors' QVHighlights architecture with 3 LLaMA-7B-shaped blocks (llm_dim 4096, 32 heads, FFN 11008,
~0.6 B parameters), random weights (only shapes matter for speed; accuracy is measured against our own fp32 on the
same weights). A window = 75 clips (150 s) of 514-d video features (CLIP 512 + TEF 2) and a 20-token query of 512-d
CLIP token features. Inference mode, eval(), no negative pass, B windows per forward.

Rows: ours at fp32 / bf16 / int8 (model.inference.precision: the frozen blocks cast or dynamically quantized, the rest
fp32) and the authors' fp32 at the same batch size, same inputs, timed interleaved in one process (median of the runs
after a warm-up), so load changes on a shared machine hit all alike. Then: accuracy of bf16/int8 against fp32 at
the paper shape (top-1 span IoU >= 0.9 share, saliency Spearman), and search latency over a 10^3-video synthetic
library with a paper-size reranker (world CLIP feature widths, 3 x 4096-d random blocks) as `vmr search` runs it
(rerank time budget, hardware batch size) at auto and fp32, beside the earlier fixed 4 windows; and the peak RSS
of a search process.

The authors' implementation (github fletcherjiang/LLMEPET, a read-only checkout at ../ref/fletcherjiang+LLMEPET or
where VMR_AUTHORS_LLMEPET says) runs side by side from a throwaway copy under /tmp with the minimal patches needed
to run without their checkpoint on this machine (listed in the report); their code is never imported from or
copied into this repository.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from bench.report import Section, machine_line, save_figure

# a read-only checkout of github fletcherjiang/LLMEPET beside this one (../ref), or where VMR_AUTHORS_LLMEPET says
AUTHORS_REPO = os.environ.get("VMR_AUTHORS_LLMEPET") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "ref", "fletcherjiang+LLMEPET")
N_CLIPS, N_TOKENS, TXT_DIM, VID_DIM = 75, 20, 512, 514


def llama_ffn_dim(dim: int, multiple_of: int = 256) -> int:
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def paper_shape(quick: bool) -> dict:
    """The LLM blocks measured: the paper's (3 x 4096-d), or a tiny smoke size (quick)."""
    if quick:
        s = dict(name="tiny (smoke size)", dim=64, heads=4, layers=3, smoke=True)
    else:
        s = dict(name="paper (LLaMA-7B blocks)", dim=4096, heads=32, layers=3)
    s["ffn"] = llama_ffn_dim(s["dim"])
    return s


def inputs(batch: int, device: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    txt = torch.randn(batch, N_TOKENS, TXT_DIM, generator=g)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    vid = torch.randn(batch, N_CLIPS, VID_DIM, generator=g)
    vid[..., :512] /= vid[..., :512].norm(dim=-1, keepdim=True)
    tef = torch.stack([torch.arange(N_CLIPS) / N_CLIPS, (torch.arange(N_CLIPS) + 1) / N_CLIPS], 1)
    vid[..., 512:] = tef
    ones = lambda L: torch.ones(batch, L)  # noqa: E731
    return [t.to(device) for t in (txt, ones(N_TOKENS), vid, ones(N_CLIPS))]


def time_forward(fn, runs: int, warmup: int = 1) -> float:
    """Median seconds of fn() over `runs` runs after `warmup` calls."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# --- ours --------------------------------------------------------------------------------------------------------

def architecture(shape: dict) -> dict:
    """The CG-DETR part of the config, shared by both sides: the authors' QVHighlights script, or (quick smoke
    size, shape["smoke"]) one layer per stage."""
    from model.config import dataset_defaults

    d = dataset_defaults("qvhighlights")
    keys = ("enc_layers", "dec_layers", "t2v_layers", "moment_layers", "dummy_layers", "sent_layers", "max_q_l", "max_v_l")
    arch = {k: d[k] for k in keys}
    if shape.get("smoke"):
        arch.update(enc_layers=1, dec_layers=1, t2v_layers=1, dummy_layers=1)
    return arch


def build_ours(shape: dict, dtype: str, device: str):
    from model.config import ModelConfig
    from model.net.llmepet import build_model

    cfg = ModelConfig(**architecture(shape)).replace(
        llm="random", llm_layers=f"0:{shape['layers']}", llm_dim=shape["dim"], llm_heads=shape["heads"],
        llm_kv_heads=shape["heads"], llm_ffn_dim=shape["ffn"], llm_dtype=dtype, txt_dim=TXT_DIM, vid_dim=VID_DIM)
    model = build_model(cfg, device=device)
    return model.eval()


def forward_ours(model, batch):
    return model(*batch)


# --- the authors' implementation (throwaway patched copy) -----------------------------------------------------------

AUTHORS_PATCHES = [
    # (file, old, new, why)
    ("llm_epet/transformer.py", "from sklearn.manifold import TSNE", "", "sklearn is only used by their plotting code"),
    ("llm_epet/transformer.py", "from sklearn.decomposition import PCA", "", "same"),
    ("llm_epet/transformer.py", "import matplotlib.pyplot as plt", "", "same"),
    ("llm_epet/transformer.py", 'ckpt_path = "D:\\\\fletcher\\\\LLMEPET\\\\llama\\\\consolidated.00.pth"', "",
     "no LLaMA checkpoint: random weights at the same shapes"),
    ("llm_epet/transformer.py", 'checkpoint = torch.load(ckpt_path, map_location="cpu")', "", "same"),
    ("llm_epet/transformer.py", "self.llama.custom_load_state_dict(checkpoint, tail=True, strict=False)", "", "same"),
    ("llm_epet/transformer.py", "        dim = 4096\n", "        dim = args.llm_dim\n", "LLM width as the shape"),
    ("llm_epet/transformer.py", '"n_heads": 32,', '"n_heads": args.llm_heads,', "LLM heads as the shape"),
    ("llm_epet/model.py", "        dim = 4096\n", "        dim = args.llm_dim\n", "their unused mapper, same width"),
    ("llm_epet/llama.py", "        h = tokens\n", "        h = tokens.to(self.norm.weight.dtype)\n",
     "bf16 runs: feed the blocks their own dtype (ours does the same)"),
]


def prepare_authors_copy(dest: str, cuda: bool) -> list[str]:
    """Copy their llm_epet/ to dest and apply AUTHORS_PATCHES (+ .cuda() -> CPU). Returns the patch notes."""
    src = os.path.join(AUTHORS_REPO, "llm_epet")
    if not os.path.isdir(src):
        raise FileNotFoundError(f"the authors' code is not on this machine (looked for {src})")
    shutil.copytree(src, os.path.join(dest, "llm_epet"))
    notes = []
    for rel, old, new, why in AUTHORS_PATCHES:
        path = os.path.join(dest, rel)
        text = open(path).read()
        if old not in text:
            raise RuntimeError(f"their {rel} changed: cannot find {old.strip()[:40]!r}")
        open(path, "w").write(text.replace(old, new))
        notes.append(f"{rel}: {why}")
    if not cuda:
        for rel in ("llm_epet/model.py", "llm_epet/transformer.py"):
            path = os.path.join(dest, rel)
            text = open(path).read()
            open(path, "w").write(text.replace(".cuda()", ""))
        notes.append("model.py, transformer.py: `.cuda()` removed (CPU run)")
    return notes


def import_authors_copy(root: str) -> None:
    """Import the package llm_epet from the copy in `root` without putting `root` on sys.path: the package is found
    in `root` alone and registered, so their absolute `llm_epet.x` imports resolve through its own __path__."""
    import importlib
    import importlib.machinery
    import importlib.util

    spec = importlib.machinery.PathFinder.find_spec("llm_epet", [root])
    if spec is None:
        raise ImportError(f"no llm_epet package in {root}")
    package = importlib.util.module_from_spec(spec)
    sys.modules["llm_epet"] = package
    if spec.loader is not None:  # None: a namespace package (no __init__.py), nothing to run
        spec.loader.exec_module(package)
    importlib.import_module("llm_epet.model")


def authors_args(shape: dict, device: str) -> argparse.Namespace:
    """Their argparse defaults + their QVHighlights script's architecture (the same as ours)."""
    d = architecture(shape)
    return argparse.Namespace(
        hidden_dim=256, nheads=8, dim_feedforward=1024, dropout=0.1, input_dropout=0.5, pre_norm=False,
        enc_layers=d["enc_layers"], dec_layers=d["dec_layers"], t2v_layers=d["t2v_layers"],
        moment_layers=d["moment_layers"], dummy_layers=d["dummy_layers"], sent_layers=d["sent_layers"],
        num_queries=10, num_dummies=45, total_prompts=10, num_prompts=1, n_input_proj=2, contrastive_hdim=64,
        aux_loss=True, span_loss_type="l1", contrastive_align_loss=False, use_txt_pos=False,
        position_embedding="sine", max_q_l=d["max_q_l"], max_v_l=d["max_v_l"], t_feat_dim=TXT_DIM,
        v_feat_dim=VID_DIM, a_feat_dir=None, dset_name="hl", device=device,
        first_layer=0, n_layers=shape["layers"], llm_dim=shape["dim"], llm_heads=shape["heads"])


def build_authors(shape: dict, dtype: str, device: str):
    import torch

    from llm_epet.model import LLM_EPET  # from the throwaway copy (import_authors_copy)
    from llm_epet.position_encoding import build_position_encoding
    from llm_epet.transformer import build_transformer

    args = authors_args(shape, device)
    pos, txt_pos = build_position_encoding(args)
    model = LLM_EPET(build_transformer(args), pos, txt_pos, txt_dim=TXT_DIM, vid_dim=VID_DIM,
                     num_queries=args.num_queries, input_dropout=args.input_dropout, aux_loss=True,
                     span_loss_type="l1", n_input_proj=2, args=args)
    llama = model.transformer.llama
    if dtype == "bfloat16":
        llama.to(torch.bfloat16)
    return model.to(device).eval()


def forward_authors(model, batch):
    txt, txt_mask, vid, vid_mask = batch
    return model(txt, txt_mask, vid, vid_mask, vid=None, qid=None)


# --- the section ---------------------------------------------------------------------------------------------------

SEARCH_QUERIES = 7
# (label, --precision, candidate windows, rerank budget): "budget" = the product's default (RERANK_BUDGET_S over the
# coarse stage's 24 windows); the fixed 4-window rows are the previous design, measured beside it
SEARCH_RUNS = (("auto, budget", "auto", None, "default"), ("fp32, budget", "fp32", None, "default"),
               ("auto, 4 windows", "auto", 4, None))
RSS_SCRIPT = """
import json, sys
import duckdb, faiss, open_clip, torch
from retriever.search import SearchEngine
def status(key="VmHWM:"):  # VmHWM: this process's own peak (ru_maxrss keeps the parent's peak across fork + exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
runtime = status()  # the libraries alone, nothing loaded
index, ckpt, precision, queries = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
with SearchEngine(index, checkpoint=ckpt, device="cpu", precision=precision) as engine:
    totals = [engine.search(q, top_k=10).timings["total"] for q in queries]
    weights = 0
    for m in engine.reranker.model.modules():
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):  # int8 weight + per-channel scales, bias
            w = m.weight()
            weights += w.numel() * w.element_size() + w.q_per_channel_scales().numel() * 12
            weights += 0 if m.bias() is None else m.bias().numel() * m.bias().element_size()
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            weights += t.numel() * t.element_size()
print(json.dumps(dict(peak_rss=status(), rss_end=status("VmRSS:"), weights=weights, runtime=runtime,
                      precision=engine.reranker.model.precision, totals=totals)))
"""


def _llm_params(model) -> int:
    blocks = model.llm.blocks if hasattr(model, "llm") else model.transformer.llama.layers
    return sum(p.numel() for p in blocks.parameters())


def _with_precision(model, precision: str, device: str):
    import copy

    from model.inference.precision import apply_precision

    if precision == "fp32":
        return model
    clone = copy.deepcopy(model)
    apply_precision(clone, precision, device)
    return clone


def _speed_rows(shape: dict, device: str, quick: bool, precisions, batches, with_authors: bool) -> tuple[list, dict]:
    """Ours at each precision and the authors' fp32, per batch size, timed interleaved. Returns (rows, models)."""
    import torch

    torch.manual_seed(0)
    ours = {"fp32": build_ours(shape, "float32", device)}
    for p in precisions:
        if p != "fp32":
            ours[p] = _with_precision(ours["fp32"], p, device)
    sides = {f"ours {p}": (m, forward_ours) for p, m in ours.items()}
    auth_error = None
    if with_authors:
        try:
            torch.manual_seed(0)
            sides["authors fp32"] = (build_authors(shape, "float32", device), forward_authors)
        except Exception as err:  # their code cannot build here: say why, keep measuring ours
            auth_error = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    runs = 1 if quick else 2
    rows = []
    for b in batches:
        batch = inputs(b, device)
        times = {name: [] for name in sides}
        with torch.inference_mode():
            for name, (model, forward) in list(sides.items()):
                try:
                    out = forward(model, batch)  # warm-up, and a check that it really ran
                    if tuple(out["pred_spans"].shape) != (b, 10, 2):
                        raise RuntimeError(f"unexpected pred_spans shape {tuple(out['pred_spans'].shape)}")
                except Exception as err:
                    if not name.startswith("authors"):
                        raise
                    auth_error = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                    sides.pop(name)
                    times.pop(name)
            for _ in range(runs):
                for name, (model, forward) in sides.items():
                    times[name].append(time_forward(lambda: forward(model, batch), runs=1, warmup=0))
        for name, ts in times.items():
            sec = float(np.median(ts))
            rows.append(dict(side=name, batch=b, s=sec, wps=b / sec))
    info = dict(llm_params=_llm_params(ours["fp32"]), auth_error=auth_error)
    sides.pop("authors fp32", None)
    gc.collect()
    return rows, dict(ours=ours, info=info)


def _accuracy(ours: dict, device: str, n_windows: int) -> list[dict]:
    """bf16/int8 against fp32 on the same weights and windows: share of windows whose top-1 span keeps IoU >= 0.9,
    saliency Spearman (min and median over windows)."""
    import torch
    from scipy.stats import spearmanr

    from model.inference.postprocess import decode_outputs
    from model.spans import temporal_iou

    batch = inputs(n_windows, device, seed=1)
    meta = [{"duration": N_CLIPS * 2.0}] * n_windows
    preds = {}
    with torch.inference_mode():
        for p, model in ours.items():
            preds[p] = decode_outputs(model(*batch), batch[3], meta)
    rows = []
    for p, got in preds.items():
        if p == "fp32":
            continue
        same = [temporal_iou(a["windows"][0][:2], b["windows"][0][:2]) >= 0.9 for a, b in zip(preds["fp32"], got)]
        rho = [spearmanr(a["saliency"], b["saliency"])[0] for a, b in zip(preds["fp32"], got)]
        rows.append(dict(precision=p, windows=n_windows, top1_same=float(np.mean(same)),
                         spearman_min=float(np.min(rho)), spearman_median=float(np.median(rho))))
    return rows


def _search_latency(shape: dict, device: str, quick: bool, runs=SEARCH_RUNS, n_videos: int | None = None,
                    rss: bool = True) -> dict:
    """p50 of `SearchEngine.search` over a synthetic 10^3-video library (30 quick) with a paper-size reranker, per
    entry of ``runs`` (label, precision, candidate windows or None for the coarse default, rerank budget: "default"
    or None = every candidate window); then (``rss``, CPU) peak RSS of a search process at ``auto`` against its
    reranker's weights in memory plus the index on disk."""
    import json
    import subprocess

    import torch

    from bench.search import make_library
    from model.inference.checkpoint import read_checkpoint, save_checkpoint
    from model.config import ModelConfig
    from model.inference.features import ClipEncoder
    from model.net.llmepet import build_model
    from model.data.sample import DataConfig
    from retriever.coarse import CoarseConfig
    from retriever.search import RERANK_BUDGET_S, SearchEngine
    from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS, WORLD_RERANKER

    n_videos = n_videos or (30 if quick else 1000)
    work = tempfile.mkdtemp(prefix="vmr_bench_rerank_search_")
    try:
        encoder = ClipEncoder.load(str(WORLD_CLIP_CONFIG), str(WORLD_CLIP_WEIGHTS), device=device)
        t0 = time.perf_counter()
        index = os.path.join(work, "index")
        queries = make_library(index, n_videos, encoder, seed=n_videos)
        build_s = time.perf_counter() - t0
        world = read_checkpoint(str(WORLD_RERANKER))
        cfg = ModelConfig.from_dict(world["model_config"]).replace(
            llm="random", llm_layers=f"0:{shape['layers']}", llm_dim=shape["dim"], llm_heads=shape["heads"],
            llm_kv_heads=shape["heads"], llm_ffn_dim=shape["ffn"], llm_dtype="float32")
        torch.manual_seed(0)
        model = build_model(cfg)
        ckpt = os.path.join(work, "paper_size_reranker.pt")
        save_checkpoint(ckpt, model, DataConfig.from_dict(world["data_config"]), world["feature_spec"],
                        world["dataset"])
        del model
        gc.collect()
        out = dict(videos=n_videos, build_s=build_s, budget_s=RERANK_BUDGET_S, rows=[],
                   ckpt_mb=os.path.getsize(ckpt) / 1e6)
        asked = [q["query"] for q in queries[: 2 if quick else SEARCH_QUERIES]]
        for label, precision, n_windows, budget in runs:
            coarse = CoarseConfig(n_windows=n_windows) if n_windows else CoarseConfig()
            budget_s = RERANK_BUDGET_S if budget == "default" else None
            with SearchEngine(index, checkpoint=ckpt, device=device, precision=precision, coarse=coarse,
                              rerank_budget_s=budget_s) as engine:
                engine.encoder = encoder
                engine.search(queries[0]["query"], top_k=10)  # warm-up
                results = [engine.search(q, top_k=10) for q in asked]
                out["rows"].append(dict(
                    label=label, requested=precision, picked=engine.reranker.model.precision,
                    batch=engine.reranker.batch_size, budget_s=budget_s, candidates=coarse.n_windows,
                    p50=float(np.median([r.timings["total"] for r in results])),
                    rerank_p50=float(np.median([r.timings["rerank"] for r in results])),
                    reranked_p50=float(np.median([r.rerank_depth["reranked"] for r in results])),
                    queries=len(results)))
            gc.collect()
        if rss and device == "cpu":
            env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, index, ckpt, "auto", json.dumps(asked[:3])],
                                  capture_output=True, text=True, env=env, timeout=1800)
            if proc.returncode == 0:
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                index_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(index) for f in fs)
                base = got["weights"] + index_bytes
                out["rss"] = dict(peak_rss=got["peak_rss"], runtime=got["runtime"], weights=got["weights"],
                                  rss_end=got["rss_end"],
                                  index=index_bytes, precision=got["precision"], ratio=got["peak_rss"] / base,
                                  ratio_above_runtime=(got["peak_rss"] - got["runtime"]) / base)
            else:
                out["rss"] = dict(error=proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else "?")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(device: str, quick: bool, with_search: bool = True, n_videos: int | None = None,
            search_only: bool = False) -> dict:
    """Everything the section reports, as data (also what the GPU run writes)."""
    import torch

    from model.inference.precision import choose_precision, detect_hardware

    hw = detect_hardware(device)
    shape = paper_shape(quick)
    if search_only:  # the library part alone (a device run split in two bounded commands)
        search = _search_latency(shape, device, quick, n_videos=n_videos)
        return dict(device=device, hardware=hw.describe(), torch=torch.__version__, threads=torch.get_num_threads(),
                    shape=shape, search=search)
    precisions = ("fp32", "bf16") if device == "cuda" else ("fp32", "bf16", "int8")
    batches = (1, 2) if quick else ((1, 8, 32) if device == "cuda" else (1, 4, 8))
    tmp = tempfile.mkdtemp(prefix="vmr_bench_authors_")
    notes, authors_error = [], None
    try:
        try:
            notes = prepare_authors_copy(tmp, cuda=device == "cuda")
            import_authors_copy(tmp)  # fails here if their code cannot import
        except Exception as err:  # their code cannot run here: report why, keep measuring ours
            authors_error = str(err) if isinstance(err, OSError) else f"{type(err).__name__}: {err}"
        rows, built = _speed_rows(shape, device, quick, precisions, batches, with_authors=authors_error is None)
    finally:
        for name in [m for m in sys.modules if m == "llm_epet" or m.startswith("llm_epet.")]:
            del sys.modules[name]
        shutil.rmtree(tmp, ignore_errors=True)
    accuracy = _accuracy(built["ours"], device, 4 if quick else 16)
    auto = choose_precision("auto", hw, built["info"]["llm_params"])
    del built["ours"]
    gc.collect()
    search = _search_latency(shape, device, quick, SEARCH_RUNS[:1] if quick else SEARCH_RUNS, n_videos) \
        if with_search else None
    return dict(device=device, hardware=hw.describe(), torch=torch.__version__, threads=torch.get_num_threads(),
                shape=shape, rows=rows, accuracy=accuracy, auto=auto, search=search,
                authors_error=authors_error or built["info"]["auth_error"], patches=notes,
                llm_params=built["info"]["llm_params"])


def describe(m: dict) -> list[str]:
    s = m["shape"]
    lines = [
        "Baseline: the authors' implementation (fletcherjiang/LLMEPET) in fp32 at the same batch size, same inputs, "
        "same process, timed interleaved with ours (median of the runs after a warm-up). "
        f"Machine: {machine_line()}, torch {m['torch']} on {m['device']}, {m['threads']} threads.",
        f"Hardware detected now: {m['hardware']}; `--precision auto` picks **{m['auto']}** here for this shape.",
        f"Shape: {s['name']}: {s['layers']} blocks x {s['dim']}-d (FFN {s['ffn']}, {m['llm_params'] / 1e6:.0f}M "
        f"parameters), QVHighlights CG-DETR (6 enc / 6 dec layers), random weights; a window = {N_CLIPS} clips x "
        f"{VID_DIM}-d + {N_TOKENS} tokens x {TXT_DIM}-d. Ours attends across time, theirs across the batch (their "
        "code's behaviour): the same FLOPs in the blocks' linear layers, which dominate.",
        "",
        "| windows/forward | side | precision | windows/s | s/forward | speed-up vs authors' fp32 |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for r in m["rows"]:
        auth = next((a for a in m["rows"] if a["batch"] == r["batch"] and a["side"] == "authors fp32"), None)
        ratio = f"{auth['s'] / r['s']:.2f}x" if auth else "-"
        side, prec = r["side"].split(" ")
        lines.append(f"| {r['batch']} | {side} | {prec} | {r['wps']:.2f} | {r['s']:.2f} | {ratio} |")
    if m["authors_error"]:
        lines += ["", f"Authors' implementation: not available: {m['authors_error']}"]
    lines += ["", f"Accuracy against our fp32 on the same weights and windows ({s['name']}):", "",
              "| precision | windows | top-1 span IoU >= 0.9 | saliency Spearman min / median |", "|---|---:|---:|---:|"]
    for a in m["accuracy"]:
        lines.append(f"| {a['precision']} | {a['windows']} | {100 * a['top1_same']:.0f}% | "
                     f"{a['spearman_min']:.4f} / {a['spearman_median']:.4f} |")
    if m.get("search"):
        lines += [""] + describe_search(m["search"], s)
    if m["patches"]:
        lines += ["", "Patches applied to the throwaway copy of their code (nothing of it is kept): "
                  + "; ".join(m["patches"]) + "."]
    return lines


def describe_search(sr: dict, s: dict) -> list[str]:
    lines = [f"Search over a {sr['videos']:,}-video synthetic library (built in {sr['build_s']:.0f} s) with a "
             f"paper-size reranker (world CLIP widths, {s['layers']} x {s['dim']}-d random blocks; checkpoint "
             f"{sr['ckpt_mb']:.0f} MB), {max(r['queries'] for r in sr['rows'])} queries after a warm-up, one run "
             "after another in one process:", "",
             "| run | --precision | runs as | windows/forward | candidate windows | rerank budget (s) | windows "
             "reranked p50 | search p50 (s) | rerank stage p50 (s) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sr["rows"]:
        budget = "-" if r["budget_s"] is None else f"{r['budget_s']:.1f}"
        lines.append(f"| {r['label']} | {r['requested']} | {r['picked']} | {r['batch']} | {r['candidates']} | "
                     f"{budget} | {r['reranked_p50']:.0f} | {r['p50']:.2f} | {r['rerank_p50']:.2f} |")
    rss = sr.get("rss")
    if rss and "error" in rss:
        lines += ["", f"Peak RSS of a search process: not measured ({rss['error']})"]
    elif rss:
        mib = lambda x: f"{x / 2**20:.0f} MiB"  # noqa: E731
        lines += ["", f"Peak RSS of a search process (`--precision auto` = {rss['precision']}, load + 3 queries, "
                  f"child process): {mib(rss['peak_rss'])} = {rss['ratio']:.2f}x the reranker's weights in memory "
                  f"({mib(rss['weights'])}) + the index on disk ({mib(rss['index'])}). Of it, {mib(rss['runtime'])} "
                  "is the process with its libraries imported and nothing loaded (torch, open_clip, FAISS, DuckDB); "
                  f"above that: {mib(rss['peak_rss'] - rss['runtime'])} = **{rss['ratio_above_runtime']:.2f}x** "
                  f"(the checkpoint is memory-mapped and quantized layer by layer, each layer's stored pages "
                  f"released once read); RSS after the queries {mib(rss['rss_end'])}, {mib(rss['rss_end'] - rss['runtime'])} above "
                  "the libraries."]
    return lines


def run(out_dir: str, quick: bool) -> Section:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = measure(device, quick)
    fig, ax = plt.subplots(figsize=(8, 4))
    sides = list(dict.fromkeys(r["side"] for r in m["rows"]))
    batches = sorted({r["batch"] for r in m["rows"]})
    width = 0.8 / max(1, len(sides))
    for i, side in enumerate(sides):
        wps = [next((r["wps"] for r in m["rows"] if r["side"] == side and r["batch"] == b), 0) for b in batches]
        ax.bar(np.arange(len(batches)) + i * width, wps, width, label=side)
    ax.set_xticks(np.arange(len(batches)) + width * (len(sides) - 1) / 2, [f"{b} windows/forward" for b in batches])
    ax.set_ylabel("windows / s")
    ax.set_title(f"LLMEPET forward, {m['shape']['name']}: ours by precision vs the authors' fp32")
    ax.legend(fontsize=8)
    png = save_figure(fig, out_dir, "rerank.png")

    best = max((r for r in m["rows"] if r["side"].startswith("ours")), key=lambda r: r["wps"])
    auth = next((r for r in m["rows"] if r["side"] == "authors fp32" and r["batch"] == best["batch"]), None)
    headline = f"rerank, {m['shape']['name']}: ours {best['side'].split()[1]} {best['wps']:.2f} windows/s"
    headline += f" = {auth['s'] / best['s']:.2f}x the authors' fp32" if auth else " (authors' code not available)"
    return Section("Rerank: LLMEPET at the paper's shape by precision and batch, vs the authors' code",
                   "\n".join(describe(m)), [png], headline, data=[m])


def main() -> None:
    """python -m bench.rerank --out DIR [--quick] [--no-search]: the section alone, its data as rerank.json."""
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-search", action="store_true")
    parser.add_argument("--search-only", action="store_true")
    parser.add_argument("--videos", type=int, default=None, help="library size of the search part (default 1000)")
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = measure(device, args.quick, with_search=not args.no_search, n_videos=args.videos,
                search_only=args.search_only)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rerank.json"), "w") as f:
        json.dump(m, f, indent=1, default=str)
    text = "\n".join(describe_search(m["search"], m["shape"]) if args.search_only else describe(m))
    with open(os.path.join(args.out, "rerank.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
