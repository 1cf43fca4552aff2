"""Named feature kinds of an index: per clip, each kind is one feature vector made by one model.

An index records every kind it holds in meta ``feature_kinds``: kind name -> {dim, dtype, model, weights,
precision, frames}, and the kind its coarse (FAISS) stage searches in meta ``coarse_kind``. A reranker checkpoint
names the kinds it reads (``feature_spec.video_kinds``, in its input order, with ``video_dims``); search assembles
its input from those kinds and refuses an index that lacks one. vmr computes two kinds: ``clip`` (one CLIP image
embedding of the clip's middle frame), which is also the coarse kind, its vectors in the clips table; and
``slowfast`` (SlowFast-R50 on 32 frames of the clip, the public features' recipe), in the features table
(store.features), written with the video or by ``Library.commit_features``.

Indexes written before kinds were recorded hold exactly that one kind: their record is derived from the meta they
do have (``clip_model``, ``embed_dim``, ``clip_source``), and the next ingest writes it; nothing is re-decoded.
"""
from __future__ import annotations

import os

from store.clip_source import CLIPSource
from store.errors import VmrError

CLIP_KIND = "clip"
CLIP_FRAMES = "one frame a clip, at its middle, resized and centre-cropped by the CLIP model's own preprocessing"
SLOWFAST_KIND = "slowfast"
SLOWFAST_MODEL = "SlowFast-R50 8x8"
SLOWFAST_DIM = 2048 + 256
SLOWFAST_FRAMES = ("HERO's extractor: 30 fps, 32 frames per {clip}-s clip at linspace(0, 64 * floor(source fps) / 30 "
                   "- 1, 32), padded by repetition; display orientation, short side 224 bilinear, centre crop 224, "
                   "mean 0.45 std 0.225")
KINDS = (CLIP_KIND, SLOWFAST_KIND)  # what `vmr index --features` computes
# How each kind is added to an index; named by the refusal below.
HOW_TO_ADD = {CLIP_KIND: "re-run `vmr index DIR --index IDX`",
              SLOWFAST_KIND: "add them with `vmr index DIR --index IDX --features clip,slowfast` (the first time with "
                             "--slowfast-weights FILE)"}


def clip_kind_record(clip_model: str, embed_dim: int, meta: dict) -> dict:
    """The record of the ``clip`` kind: what made it, from the CLIP the index records (meta ``clip_source``)."""
    source = CLIPSource.recorded(meta)
    return {"dim": int(embed_dim), "dtype": "float32", "model": clip_model, "weights": source.pretrained,
            "precision": source.precision, "frames": CLIP_FRAMES}


def slowfast_kind_record(weights_path: str, sha256: str, layout: str, clip_seconds: float) -> dict:
    """The record of the ``slowfast`` kind: fp16 vectors by SlowFastR50 at fp32 from the weights file at
    ``weights_path`` (its name and digest are what must match; the path is where a later run finds it again)."""
    return {"dim": SLOWFAST_DIM, "dtype": "float16", "model": SLOWFAST_MODEL,
            "weights": f"{os.path.basename(weights_path)} sha256:{sha256}", "precision": "fp32",
            "frames": SLOWFAST_FRAMES.format(clip=f"{float(clip_seconds):g}"), "weights_path": weights_path,
            "layout": layout}


def recorded_weights_path(meta: dict, kind: str) -> str | None:
    """The weights file a kind's record names (None: the index holds no such kind, or records no file)."""
    return (feature_kinds(meta).get(kind) or {}).get("weights_path")


def feature_kinds(meta: dict) -> dict:
    """kind -> record of an index's meta (derived for an index written before kinds were recorded)."""
    if meta.get("feature_kinds"):
        return dict(meta["feature_kinds"])
    if meta.get("embed_dim"):
        return {CLIP_KIND: clip_kind_record(meta.get("clip_model", ""), meta["embed_dim"], meta)}
    return {}


def record_update(meta: dict, clip_model: str, embed_dim: int) -> dict:
    """The meta keys an ingest writes so that the record names the CLIP it runs (and an index from before kinds
    were recorded gains its record); {} when the record is current."""
    recorded = feature_kinds(meta)
    recorded[CLIP_KIND] = clip_kind_record(clip_model, embed_dim, meta)
    if meta.get("feature_kinds") == recorded and "coarse_kind" in meta:
        return {}
    return {"feature_kinds": recorded, "coarse_kind": coarse_kind(meta)}


RECORD_KEYS = ("dim", "dtype", "model", "weights", "precision", "frames")
SAME_VECTORS = ("dim", "model", "weights", "frames")  # what must match for two videos' vectors to be comparable


def check_record(held: dict | None, record: dict, kind: str, index_dir) -> None:
    """Refuse to store ``kind`` vectors described by ``record`` beside ones the index holds that another model,
    weights, width or frame recipe made (a reranker would read a mix); ``held`` None: the kind is new here."""
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        raise ValueError(f"the record of feature kind '{kind}' lacks {', '.join(missing)}")
    differs = [key for key in SAME_VECTORS if held is not None and held.get(key) != record.get(key)]
    if differs:
        raise VmrError(f"index {index_dir} holds '{kind}' features made by {held.get('model')} "
                       f"({held.get('weights')}, {held.get('dim')}-d), not by {record.get('model')} "
                       f"({record.get('weights')}, {record.get('dim')}-d): use the weights the index records, or "
                       "a new --index")


def coarse_kind(meta: dict) -> str:
    """The kind the index's FAISS files hold (its search key)."""
    return meta.get("coarse_kind", CLIP_KIND)


def check_kinds(meta: dict, kinds: list[str], dims: list[int] | None, who: str) -> None:
    """Refuse, in one line, an index that lacks one of ``kinds`` or holds it at another width than ``dims``.

    ``who`` names what needs them (e.g. "the reranker ckpt.pt")."""
    held = feature_kinds(meta)
    for i, kind in enumerate(kinds):
        if kind not in held:
            how = HOW_TO_ADD.get(kind, f"this vmr cannot compute '{kind}' features at ingest yet, so no index has "
                                       "them: use a checkpoint trained on this index's kinds, or --no-rerank")
            raise VmrError(f"{who} reads '{kind}' features, which this index does not hold (it holds: "
                           f"{', '.join(sorted(held)) or 'none'}): {how}")
        if dims and i < len(dims) and int(held[kind]["dim"]) != int(dims[i]):
            raise VmrError(f"{who} reads {dims[i]}-d '{kind}' features, this index holds {held[kind]['dim']}-d: use "
                           f"a checkpoint trained on this index (`vmr train --index`), or --no-rerank")
