"""Rerank benchmark: windows/s of the LLMEPET forward at three LLM-block shapes, fp32 and bf16, ours vs the authors'.

Shapes (random weights; only the shapes matter for speed):
  tiny      llm_dim 64,   4 heads,  FFN 256,   3 layers   (the test configs)
  1B-class  llm_dim 2048, 16 heads, FFN 5632,  3 layers   (TinyLlama-1.1B widths)
  7B-class  llm_dim 4096, 32 heads, FFN 11008, 3 layers   (LLaMA-7B, the paper); 1 layer on CPU (stated)
The FFN width follows LLaMA's rule (2/3 * 4 * dim rounded up to 256), which is also what the authors' code computes.

A window is one QVHighlights-sized input: 75 clips (150 s) of 514-d video features (CLIP 512 + TEF 2) and a
20-token query of 512-d CLIP token features, with the authors' QVHighlights architecture (dataset_defaults).
fp32: everything fp32. bf16: the frozen LLM blocks are stored and run in bfloat16, the rest fp32 (what
model.llmepet does on GPU). Inference mode, eval(), no negative pass, batch of B windows per forward.

The authors' implementation (github fletcherjiang/LLMEPET, read from ../ref) runs side by side from a throwaway
copy under /tmp with the minimal patches needed to run without their checkpoint on this machine (listed in the
report); their code is never imported from or copied into this repository.
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


def shapes(device: str, quick: bool) -> list[dict]:
    """The LLM block shapes to measure: name, dims, layers, windows per forward, timed runs."""
    gpu = device == "cuda"
    all_shapes = [
        dict(name="tiny", dim=64, heads=4, layers=3, batch=8 if not quick else 1, runs=5 if not quick else 1,
             smoke=quick, note="smoke size: 1 layer per CG-DETR stage" if quick else ""),
        dict(name="1B-class", dim=2048, heads=16, layers=3, batch=8 if gpu else 2, runs=3 if gpu else 2),
        dict(name="7B-class", dim=4096, heads=32, layers=3 if gpu else 1, batch=8 if gpu else 1, runs=3 if gpu else 2,
             note="" if gpu else "1 of the paper's 3 layers on CPU",
             # no native bf16 on this CPU (AVX2 only), and a 7B-class bf16 row costs minutes of a shared 2-core
             # machine; the 1B-class rows already compare the two dtypes
             dtypes=("float32", "bfloat16") if gpu else ("float32",)),
    ]
    for s in all_shapes:
        s["ffn"] = llama_ffn_dim(s["dim"])
    return all_shapes[:1] if quick else all_shapes


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
    from model.llmepet import build_model

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
        raise FileNotFoundError(f"{src} not found")
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

def _llm_params(model) -> int:
    blocks = model.llm.blocks if hasattr(model, "llm") else model.transformer.llama.layers
    return sum(p.numel() for p in blocks.parameters())


def _measure_pair(shape: dict, dtype: str, device: str, with_authors: bool) -> dict:
    """Ours and (if with_authors) theirs on the same inputs, timed interleaved (ours, theirs, ours, ...) so that
    load changes on a shared machine hit both sides alike. Returns windows/s, seconds/forward, LLM params."""
    import torch

    sides = {"ours": (build_ours, forward_ours)}
    if with_authors:
        sides["auth"] = (build_authors, forward_authors)
    batch = inputs(shape["batch"], device)
    models, row = {}, {}
    for name, (build, forward) in sides.items():
        torch.manual_seed(0)
        try:
            models[name] = build(shape, dtype, device)
            with torch.inference_mode():
                out = forward(models[name], batch)  # warm-up, and a check that it really ran
            if tuple(out["pred_spans"].shape) != (shape["batch"], 10, 2):
                raise RuntimeError(f"unexpected pred_spans shape {tuple(out['pred_spans'].shape)}")
        except Exception as err:
            if name == "ours":
                raise
            models.pop(name, None)
            row["auth_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    row["llm_params"] = _llm_params(models["ours"])
    times = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(shape["runs"]):
            for name, model in models.items():
                times[name].append(time_forward(lambda: sides[name][1](model, batch), runs=1, warmup=0))
    for name, ts in times.items():
        sec = float(np.median(ts))
        row[f"{name}_s"], row[f"{name}_wps"] = sec, shape["batch"] / sec
    del models
    gc.collect()
    return row


def run(out_dir: str, quick: bool) -> Section:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, notes, authors_error = [], [], None
    tmp = tempfile.mkdtemp(prefix="vmr_bench_authors_")
    try:
        try:
            notes = prepare_authors_copy(tmp, cuda=device == "cuda")
            import_authors_copy(tmp)  # fails here if their code cannot import
        except Exception as err:  # their code cannot run here: report why, keep measuring ours
            authors_error = f"{type(err).__name__}: {err}"
        for shape in shapes(device, quick):
            for dtype in ("float32",) if quick else shape.get("dtypes", ("float32", "bfloat16")):
                row = dict(shape=shape, dtype=dtype)
                row.update(_measure_pair(shape, dtype, device, with_authors=authors_error is None))
                rows.append(row)
    finally:
        for name in [m for m in sys.modules if m == "llm_epet" or m.startswith("llm_epet.")]:
            del sys.modules[name]
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [
        f"Baseline: the authors' implementation (fletcherjiang/LLMEPET) on the same shapes, same inputs, same process, "
        "timed interleaved with ours (median of the runs after a warm-up). "
        f"Machine: {machine_line()}, torch {torch.__version__} on {device}, {torch.get_num_threads()} threads.",
        f"A window = {N_CLIPS} clips x {VID_DIM}-d video + {N_TOKENS} tokens x {TXT_DIM}-d text, QVHighlights "
        "architecture (6 enc / 6 dec layers), random weights, inference (no negative pass). bf16 = LLM blocks in "
        "bfloat16, the rest fp32. Ours runs its default attention across time; theirs attends across the batch "
        "(their code's behaviour) - the same FLOPs in the LLM FFN, which dominates.",
        "",
        "| LLM shape | LLM params | dtype | windows/forward | ours windows/s | authors windows/s | ours time / theirs |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["shape"]
        label = f"{s['name']} (dim {s['dim']}, {s['layers']} layer{'s' if s['layers'] > 1 else ''})"
        if s.get("note"):
            label += f" - {s['note']}"
        if "auth_wps" in r:
            auth, ratio = f"{r['auth_wps']:.2f}", f"{r['ours_s'] / r['auth_s']:.2f}x"
        else:
            auth, ratio = "not available", "-"
        lines.append(f"| {label} | {r['llm_params'] / 1e6:.0f}M | {r['dtype']} | {s['batch']} | "
                     f"{r['ours_wps']:.2f} | {auth} | {ratio} |")
    if device == "cpu" and not quick:
        lines += ["", "7B-class bf16 is not measured on CPU (time budget of the suite on a shared 2-core machine); "
                  "this CPU has no native bf16 (AVX2 only): compare fp32 and bf16 in the 1B-class rows."]
    if authors_error:
        lines += ["", f"Authors' implementation: not available: {authors_error}"]
    else:
        errs = {r["auth_error"] for r in rows if "auth_error" in r}
        if errs:
            lines += ["", "Authors' implementation failed on some rows: " + "; ".join(sorted(errs))]
        lines += ["", "Patches applied to the throwaway copy of their code (nothing of it is kept): "
                  + "; ".join(notes) + "."]

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['shape']['name']}\n{'bf16' if r['dtype'] == 'bfloat16' else 'fp32'}" for r in rows]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["ours_wps"] for r in rows], 0.4, label="vmr (ours)")
    ax.bar(x + 0.2, [r.get("auth_wps", 0) for r in rows], 0.4, label="authors' code")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("windows / s (log)")
    ax.set_title("LLMEPET forward throughput by LLM block shape")
    ax.legend(fontsize=8)
    png = save_figure(fig, out_dir, "rerank.png")

    head_rows = [r for r in rows if r["dtype"] == "float32"]
    big = head_rows[-1]
    headline = f"rerank, {big['shape']['name']} fp32: {big['ours_wps']:.2f} windows/s"
    if "auth_wps" in big:
        headline += f" vs authors' {big['auth_wps']:.2f} ({big['ours_s'] / big['auth_s']:.2f}x their time)"
    elif authors_error:
        headline += " (authors' code not available)"
    return Section("Rerank: LLMEPET forward by LLM shape, fp32/bf16, vs the authors' code", "\n".join(lines), [png],
                   headline, data=[{k: v for k, v in r.items()} for r in rows])
