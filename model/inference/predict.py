"""Predictions in the official submission format: one jsonl row per annotation with ``qid, query, vid,
pred_relevant_windows`` ([[st, ed, score], ...], score-sorted) and ``pred_saliency_scores`` (one per clip).

Batches are formed in annotation-file order (no shuffling), as the authors' eval loader does for QVHighlights and
Charades-STA; with ``llm_attention="batch"`` (their checkpoints) a sample's prediction depends on the other
samples of its batch, so the same file and ``--batch-size`` reproduce their numbers. Only the forward pass the
predictions need runs (the authors' loop also runs the training-only "negative" pass).

A video longer than one model window (``max_v_l`` clips; only an index source has those) is covered by windows
overlapping by half; their windows are merged with NMS and their saliency averaged (model.inference.postprocess).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
from tqdm import tqdm

from model.config import load_preset
from model.data.dataset import MomentDataset, load_annotations, needs_windows
from model.data.providers import PublicFeatureDir, load_video
from model.data.sample import DataConfig, collate, to_device
from model.errors import ModelError
from model.inference.checkpoint import data_config_of, load_checkpoint, read_checkpoint
from model.inference.features import resolve_device
from model.inference.postprocess import clean_windows, decode_outputs, merge_windows
from model.inference.precision import choose_batch_size, choose_precision, detect_hardware, llm_block_params
from model.spans import tile_windows

BATCH_ATTENTION_DEFAULT = 32  # --batch-size of checkpoints attending across the batch, when none is given


def prediction_windows(annotations: list[dict], provider, cfg: DataConfig) -> list[tuple[int, int | None, int | None]]:
    """(annotation index, first clip, end clip) entries: one per annotation, several for long videos."""
    entries = []
    limit = cfg.v_limit
    for i, ann in enumerate(annotations):
        if limit is None or ann["duration"] <= limit * cfg.clip_length + 1e-6:
            entries.append((i, None, None))
            continue
        n = len(load_video(provider, ann["vid"], cfg))
        if not needs_windows(n, ann["duration"], cfg):
            entries.append((i, None, None))
            continue
        entries += [(i, first, end) for first, end in tile_windows(n, limit)]
    return entries


@torch.no_grad()
def predict_annotations(model, annotations: list[dict], provider, data_cfg: DataConfig, dataset: str,
                        batch_size: int = 32, device="cpu", num_workers: int = 0, progress: bool = True,
                        autocast_dtype: torch.dtype | None = None) -> list[dict]:
    """Submission rows for ``annotations`` (same order)."""
    model.eval()
    device = torch.device(device)
    entries = prediction_windows(annotations, provider, data_cfg)
    ds = MomentDataset(annotations, provider, data_cfg, load_labels=False, windows=entries)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                         num_workers=num_workers)
    max_ts = load_preset(dataset).get("max_timestamp")
    parts: dict[int, list] = {}
    for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
        inputs, _ = to_device(batch, device)
        vids = [m["vid"] for m in batch["meta"]]
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            outputs = model(**inputs, vid=vids)
        for meta, pred in zip(batch["meta"], decode_outputs(outputs, inputs["src_vid_mask"], batch["meta"])):
            parts.setdefault(meta["ann_index"], []).append((meta["offset"], pred))
    rows = []
    for i, ann in enumerate(annotations):
        windows = parts[i]
        if len(windows) == 1 and windows[0][0] == 0.0:
            pred = windows[0][1]
            pred = {"windows": clean_windows(pred["windows"], data_cfg.clip_length, max_ts),
                    "saliency": pred["saliency"]}
        else:
            cleaned = [(off, {"windows": clean_windows(p["windows"], data_cfg.clip_length, None),
                              "saliency": p["saliency"]}) for off, p in windows]
            pred = merge_windows(cleaned, len(load_video(provider, ann["vid"], data_cfg)), data_cfg.clip_length,
                                 max_keep=model.cfg.num_queries)
        rows.append({"qid": ann["qid"], "query": ann["query"], "vid": ann["vid"],
                     "pred_relevant_windows": pred["windows"], "pred_saliency_scores": pred["saliency"]})
    return rows


def write_jsonl(rows: list[dict], path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def make_provider(features_dir: str | None, data_cfg: DataConfig, clip_model: str | None, provider=None):
    """The feature source: the given provider (index), or the public layout under ``features_dir``."""
    if provider is not None:
        return provider
    if features_dir is None:
        raise ModelError("an index data source needs a feature provider built from the index "
                         "(retriever side); none was given")
    spec_path = os.path.join(features_dir, "feature_spec.json")
    declared = {}
    if os.path.exists(spec_path):  # optional: declares which CLIP made the features
        with open(spec_path) as f:
            declared = json.load(f)
    kwargs = {"clip_model": declared["clip_model"]} if "clip_model" in declared else {}
    if clip_model and not kwargs:
        kwargs["clip_model"] = clip_model
    return PublicFeatureDir(features_dir, data_cfg.v_feat_dirs or None, data_cfg.t_feat_dir,
                            clip_seconds=data_cfg.clip_length, **kwargs)


def predict_from_cli(checkpoint: str, index_dir: str | None, features_dir: str | None, annotations: str,
                     out_path: str, batch_size: int | None = None, device: str = "auto", provider=None,
                     precision: str = "fp32") -> list[dict]:
    """`vmr predict`: write the submission jsonl of ``annotations`` with ``checkpoint``.

    ``precision``: of the frozen LLM blocks (model.inference.precision). fp32, the default, reproduces the authors'
    numbers; when "auto" would pick a faster one on this hardware, a note says so (a researcher asks for speed
    knowingly). ``batch_size``: None = chosen for the hardware (model.inference.precision.choose_batch_size), printed;
    checkpoints whose blocks attend across the batch (their predictions depend on it) get BATCH_ATTENTION_DEFAULT
    instead.

    ``provider`` is the feature source the CLI builds for ``--index`` (model/ does not read indexes itself).
    """
    dev = resolve_device(device)
    ckpt_meta = read_checkpoint(checkpoint)
    data_cfg = data_config_of(ckpt_meta)
    if index_dir is not None and provider is None:
        raise ModelError("--index needs a feature provider from the index; this build of vmr cannot read one here")
    # public features carry no CLIP id: they are assumed to be the public ViT-B/32 ones unless declared
    src = make_provider(features_dir, data_cfg, None, provider)
    spec = ckpt_meta.get("feature_spec") or {}
    if hasattr(src, "select_kinds") and spec.get("video_kinds"):  # an index: read the kinds the checkpoint reads
        src.select_kinds(spec["video_kinds"], spec.get("video_dims"), f"the checkpoint {checkpoint}")
    what = f"the index {index_dir}" if index_dir else f"the features in {features_dir}"
    model, ckpt = load_checkpoint(checkpoint, device=dev, features=src.feature_spec(), what=what, ckpt=ckpt_meta,
                                  precision=precision, log=lambda line: print(line, file=sys.stderr))
    faster = choose_precision("auto", detect_hardware(dev), llm_block_params(model))
    if model.precision == "fp32" and faster != "fp32":
        print(f"note: --precision {faster} runs faster here (--precision auto); fp32 is kept because it reproduces "
              "the authors' numbers", file=sys.stderr)
    if batch_size is None:

        batch_size = BATCH_ATTENTION_DEFAULT if model.cfg.llm_attention == "batch" else \
            choose_batch_size(detect_hardware(dev), llm_block_params(model))
        print(f"batch: {batch_size} queries a forward (chosen for this hardware; --batch-size to set)",
              file=sys.stderr)
    if model.cfg.llm_attention == "batch":
        print(f"note: this checkpoint's LLM blocks attend across the batch (the authors' code); its predictions "
              f"depend on --batch-size (now {batch_size}; the authors evaluate QVHighlights with 100, in file order)",
              file=sys.stderr)
    anns = load_annotations(annotations)
    rows = predict_annotations(model, anns, src, data_cfg, ckpt["dataset"], batch_size=batch_size, device=dev)
    write_jsonl(rows, out_path)
    return rows
