"""Training / prediction data: annotations, feature sources, labels and batching, as the authors' dataset.

An annotation is one jsonl record: ``qid`` (int for QVHighlights/Charades, str for TACoS), ``query``, ``vid``,
``duration`` (s), and with labels ``relevant_windows`` [[st, ed], ...] (s, int or float), plus for QVHighlights
``relevant_clip_ids`` and ``saliency_scores`` (3 annotators, 0..4 each).

Features come from a :class:`FeatureProvider`:
- :class:`PublicFeatureDir`, the public release layout: ``DIR/<v_feat_dir>/<vid>.npz`` (key ``features``, one row
  per clip; several dirs are concatenated, e.g. SlowFast + CLIP) and ``DIR/<t_feat_dir>/qid<qid>.npz`` (key
  ``last_hidden_state``, one row per token);
- any object with ``video_features(vid)``, ``text_features(query)`` and ``feature_spec()``: the index source the
  CLI builds from a vmr index (model/ does not import store).

What one sample holds (authors' ``StartEndDataset``): each video source cut to ``max_v_l`` rows and
L2-normalised on its own, sources cut to a common length and concatenated, the TEF appended; text cut to
``max_q_l`` tokens and L2-normalised; span targets = GT windows (at most ``max_windows``, a random subset) in
normalised (center, width) over the window's length ``n_clips * clip_seconds``; saliency labels as below.

Videos longer than ``max_v_l`` clips (an index holds arbitrary lengths; the public QVHighlights features never
are): training crops a window of ``max_v_l`` clips placed at random around the first GT window; prediction slides
windows over the whole video (see model.predict).
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from model.errors import ModelError
from model.sample import temporal_endpoint_feature
from model.spans import span_xx_to_cxw

L2_EPS = 1e-5  # the authors' l2_normalize_np_array eps
MAX_Q_L_UNLIMITED = 100  # the authors map max_q_l = -1 to 100 tokens
# Public feature sub-directory -> kind of feature (what a checkpoint's feature spec compares).
FEATURE_KINDS = {"clip_features": "clip", "slowfast_features": "slowfast", "clip_text_features": "clip"}
DEFAULT_PUBLIC_CLIP_MODEL = "ViT-B-32:openai"  # what produced the public QVHighlights / Charades CLIP features
SALIENCY_SAMPLES = 2  # positive and negative clips per sample (hard + easy for QVHighlights, 2 random otherwise)


# --------------------------------------------------------------------------------------------- configuration
@dataclass
class DataConfig:
    """How samples are made; saved in checkpoints (the model must see at predict time what it saw in training)."""
    max_q_l: int = 32             # text tokens kept; -1 -> 100
    max_v_l: int = 75             # clips per window; -1 -> no limit
    clip_length: float = 2.0      # seconds per feature row
    max_windows: int = 5          # GT windows used as span targets
    normalize_v: bool = True
    normalize_t: bool = True
    use_tef: bool = True
    v_feat_dirs: list = field(default_factory=list)   # public layout: video sub-dirs, concatenated in this order
    t_feat_dir: str = "clip_text_features"

    @property
    def q_limit(self) -> int:
        return MAX_Q_L_UNLIMITED if self.max_q_l == -1 else self.max_q_l

    @property
    def v_limit(self) -> int | None:
        return None if self.max_v_l == -1 else self.max_v_l

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


# ------------------------------------------------------------------------------------------ feature providers
@runtime_checkable
class FeatureProvider(Protocol):
    """A source of per-clip video features and per-token text features.

    ``feature_spec()`` -> dict with ``clip_model`` (open_clip model id, e.g. "ViT-B-32:openai"),
    ``video_kinds`` (e.g. ["clip"]), ``video_dims`` (e.g. [512]), ``text_dim`` and ``clip_seconds``.
    """

    def video_features(self, vid: str) -> np.ndarray:  # [T, sum(video_dims)], row i = clip i (raw, unnormalised)
        ...

    def text_features(self, query: str) -> np.ndarray:  # [L, text_dim], SOT..EOT tokens
        ...

    def feature_spec(self) -> dict:
        ...


class PublicFeatureDir:
    """The public feature layout (QVHighlights / Charades-STA / TACoS releases) under ``root``.

    Video sources are read, cut to ``max_v_l``, normalised and concatenated by :func:`load_video` (the cut and
    per-source normalisation happen before concatenation, as the authors do), so this class exposes the sources
    separately through :meth:`video_sources`.
    """

    def __init__(self, root: str, v_feat_dirs: list[str] | None = None, t_feat_dir: str = "clip_text_features",
                 clip_model: str = DEFAULT_PUBLIC_CLIP_MODEL, clip_seconds: float = 2.0):
        self.root = str(root)
        if not os.path.isdir(self.root):
            raise ModelError(f"feature directory {self.root} does not exist")
        if not v_feat_dirs:
            # the authors' order: SlowFast first, then CLIP
            v_feat_dirs = [d for d in ("slowfast_features", "clip_features") if os.path.isdir(os.path.join(root, d))]
        if not v_feat_dirs:
            raise ModelError(f"{self.root} has no video feature dir (expected clip_features/ and/or "
                             f"slowfast_features/, or set v_feat_dirs)")
        for d in [*v_feat_dirs, t_feat_dir]:
            if not os.path.isdir(os.path.join(self.root, d)):
                raise ModelError(f"feature directory {os.path.join(self.root, d)} does not exist")
        self.v_feat_dirs, self.t_feat_dir = list(v_feat_dirs), t_feat_dir
        self.clip_model, self.clip_seconds = clip_model, float(clip_seconds)
        self._dims: list[int] | None = None
        self._text_dim: int | None = None

    # -- reading
    def video_sources(self, vid: str) -> list[np.ndarray]:
        """One float32 [T_k, D_k] array per video feature dir."""
        out = []
        for d in self.v_feat_dirs:
            base = os.path.join(self.root, d, vid)
            if os.path.exists(base + ".npz"):
                out.append(_npz_array(base + ".npz", "features"))
            elif os.path.exists(base + ".npy"):
                out.append(np.load(base + ".npy").astype(np.float32))
            else:
                raise ModelError(f"no features for video {vid!r} in {os.path.join(self.root, d)}")
        return out

    def video_features(self, vid: str) -> np.ndarray:
        feats = self.video_sources(vid)
        n = min(len(f) for f in feats)
        return np.concatenate([f[:n] for f in feats], axis=1)

    def text_features_for_qid(self, qid) -> np.ndarray:
        for name in (f"qid{qid}.npz", f"{qid}.npz"):
            path = os.path.join(self.root, self.t_feat_dir, name)
            if os.path.exists(path):
                return _npz_array(path, "last_hidden_state")
        raise ModelError(f"no text features for qid {qid!r} in {os.path.join(self.root, self.t_feat_dir)}")

    def text_features(self, query: str) -> np.ndarray:
        raise ModelError("public feature dirs hold text features per qid, not per query text")

    def feature_spec(self) -> dict:
        """Kinds and dims, read from the first file of each dir."""
        if self._dims is None:
            self._dims = [_first_file_dim(os.path.join(self.root, d), "features") for d in self.v_feat_dirs]
            self._text_dim = _first_file_dim(os.path.join(self.root, self.t_feat_dir), "last_hidden_state")
        return {"clip_model": self.clip_model, "video_kinds": [FEATURE_KINDS.get(d, d) for d in self.v_feat_dirs],
                "video_dims": list(self._dims), "text_dim": self._text_dim, "clip_seconds": self.clip_seconds}


def _npz_array(path: str, key: str) -> np.ndarray:
    try:
        with np.load(path) as z:
            if key not in z:
                raise ModelError(f"{path} has no key {key!r} (keys: {', '.join(z.files)})")
            return z[key].astype(np.float32)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read {path}: {err}") from None


def _first_file_dim(directory: str, key: str) -> int:
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(".npz"):
            return int(_npz_array(path, key).shape[-1])
        if name.endswith(".npy"):
            return int(np.load(path, mmap_mode="r").shape[-1])
    raise ModelError(f"{directory} holds no feature files")


def check_feature_spec(expected: dict, actual: dict, what: str = "these features") -> None:
    """Refuse features a checkpoint was not trained on (different CLIP model, sources, dims or clip length)."""
    diffs = []
    for key in ("video_kinds", "video_dims", "text_dim", "clip_seconds"):
        if key in expected and key in actual and _norm(expected[key]) != _norm(actual[key]):
            diffs.append(f"{key} {actual[key]} (checkpoint: {expected[key]})")
    uses_clip = "clip" in expected.get("video_kinds", ["clip"])
    if uses_clip and expected.get("clip_model") and actual.get("clip_model") \
            and expected["clip_model"] != actual["clip_model"]:
        diffs.append(f"clip_model {actual['clip_model']} (checkpoint: {expected['clip_model']})")
    if diffs:
        raise ModelError(f"checkpoint does not match {what}: " + "; ".join(diffs))


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return float(v) if isinstance(v, (int, float)) else v


# -------------------------------------------------------------------------------------------------- one sample
def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + L2_EPS)


def load_video(provider, vid: str, cfg: DataConfig) -> np.ndarray:
    """[T, Dv] video features of ``vid``: per source cut to max_v_l (public layout only: the authors cut before
    normalising; a provider hands back the whole video and windows are cut later), normalised, concatenated."""
    if isinstance(provider, PublicFeatureDir):
        sources = [f[:cfg.v_limit] for f in provider.video_sources(vid)]
        if cfg.normalize_v:
            sources = [l2_normalize(f) for f in sources]
        n = min(len(f) for f in sources)  # some sources are a row longer than others
        return np.concatenate([f[:n] for f in sources], axis=1).astype(np.float32)
    feats = np.asarray(provider.video_features(vid), dtype=np.float32)
    if feats.ndim != 2 or len(feats) == 0:
        raise ModelError(f"video {vid!r} has no clip features")
    if cfg.normalize_v:
        feats = _normalize_blocks(feats, provider.feature_spec().get("video_dims", [feats.shape[1]]))
    return feats


def _normalize_blocks(feats: np.ndarray, dims: list[int]) -> np.ndarray:
    """L2-normalise each source's columns on their own (a concatenation of several sources)."""
    if sum(dims) != feats.shape[1]:
        dims = [feats.shape[1]]
    out, start = [], 0
    for d in dims:
        out.append(l2_normalize(feats[:, start:start + d]))
        start += d
    return np.concatenate(out, axis=1)


def load_text(provider, ann: dict, cfg: DataConfig) -> np.ndarray:
    """[L, Dt] query token features (cut to max_q_l, normalised)."""
    if isinstance(provider, PublicFeatureDir):
        feats = provider.text_features_for_qid(ann["qid"])
    else:
        feats = np.asarray(provider.text_features(ann["query"]), dtype=np.float32)
    feats = feats[:cfg.q_limit]
    if len(feats) == 0:
        raise ModelError(f"qid {ann['qid']!r}: no text features")
    return l2_normalize(feats) if cfg.normalize_t else feats


def needs_windows(n_clips: int, duration: float, cfg: DataConfig) -> bool:
    """True when the video is longer than one model window. The duration test keeps the public features'
    one-row wobble (a 150-s QVHighlights video with 76 rows) on the authors' plain cut."""
    limit = cfg.v_limit
    return limit is not None and n_clips > limit and duration > limit * cfg.clip_length + 1e-6


def training_crop(n_clips: int, ann: dict, cfg: DataConfig, rng: random.Random) -> tuple[int, int]:
    """(first clip, end clip) of a max_v_l window placed at random so that it holds the first GT window (or as
    much of it as fits)."""
    size = cfg.v_limit
    st, ed = ann["relevant_windows"][0][:2]
    gs = max(0, min(n_clips - 1, int(math.floor(st / cfg.clip_length))))
    ge = max(gs + 1, min(n_clips, int(math.ceil(ed / cfg.clip_length))))
    if ge - gs >= size:
        lo, hi = gs, ge - size
    else:
        lo, hi = max(0, ge - size), min(gs, n_clips - size)
    start = rng.randint(lo, max(lo, hi))
    return start, start + size


def crop_annotation(ann: dict, start: int, end: int, clip_length: float) -> dict:
    """The annotation as seen from clips [start, end): windows clipped and shifted, clip ids re-based."""
    t0, t1 = start * clip_length, end * clip_length
    out = dict(ann, duration=t1 - t0)
    if "relevant_windows" in ann:
        windows = [[max(w[0], t0) - t0, min(w[1], t1) - t0] for w in ann["relevant_windows"]
                   if w[1] > t0 and w[0] < t1]
        out["relevant_windows"] = [w for w in windows if w[1] > w[0]]
    if "relevant_clip_ids" in ann and "saliency_scores" in ann:
        kept = [(c - start, s) for c, s in zip(ann["relevant_clip_ids"], ann["saliency_scores"]) if start <= c < end]
        out["relevant_clip_ids"] = [c for c, _ in kept]
        out["saliency_scores"] = [s for _, s in kept]
    return out


def span_targets(windows: list, n_clips: int, cfg: DataConfig, rng: random.Random) -> torch.Tensor:
    """[#windows, 2] normalised (center, width) targets; a random max_windows subset when there are more."""
    windows = [list(w[:2]) for w in windows]
    if len(windows) > cfg.max_windows:
        rng.shuffle(windows)
        windows = windows[:cfg.max_windows]
    xx = torch.tensor(windows, dtype=torch.float32) / (n_clips * cfg.clip_length)
    return span_xx_to_cxw(xx)


def saliency_from_scores(clip_ids: list[int], scores: list, n_clips: int, rng: random.Random):
    """QVHighlights labels: per-clip sum of the 3 annotators' scores; positives = the top-scored relevant clip
    (hard) + a random relevant clip (easy); negatives = the lowest-scored relevant clip (hard) + a random clip
    outside the relevant ones (easy; the hard pair again when there is none).

    Returns (pos [2], neg [2], all_scores [n_clips]).
    """
    # Clip ids past the features (upstream grows the score array instead) are dropped.
    pairs = [(c, float(np.sum(s))) for c, s in zip(clip_ids, scores) if c < n_clips]
    if not pairs:
        return None
    ids = [c for c, _ in pairs]
    agg = np.array([a for _, a in pairs])
    all_scores = np.zeros(n_clips, dtype=np.float32)
    all_scores[ids] = agg
    order = np.argsort(agg)  # increasing, numpy's default sort as upstream
    hard_pos, hard_neg = [ids[order[-1]]], [ids[order[0]]]
    easy_pool = sorted(set(range(n_clips)) - set(ids))
    if easy_pool:
        easy_pos, easy_neg = rng.sample(ids, 1), rng.sample(easy_pool, 1)
    else:
        easy_pos, easy_neg = hard_pos, hard_neg
    return hard_pos + easy_pos, hard_neg + easy_neg, all_scores


def saliency_from_window(window, duration: float, n_clips: int, rng: random.Random):
    """Charades / TACoS (no saliency annotation): clips inside the first GT window score 1; 2 random inside are
    positives, 2 random outside negatives (the positives again when the window covers the video)."""
    clip_seconds = duration / n_clips
    gs = int(window[0] / clip_seconds)
    ge = max(0, min(int(window[1] / clip_seconds), n_clips) - 1)
    gs = min(gs, ge)
    pos = rng.sample(range(gs, ge + 1), SALIENCY_SAMPLES) if gs != ge else [gs] * SALIENCY_SAMPLES
    pool = list(range(0, gs)) + list(range(ge + 1, n_clips))
    neg = rng.sample(pool, SALIENCY_SAMPLES) if len(pool) >= SALIENCY_SAMPLES else list(pos)
    all_scores = np.zeros(n_clips, dtype=np.float32)
    all_scores[gs:ge + 1] = 1
    return pos, neg, all_scores


def make_labels(ann: dict, n_clips: int, cfg: DataConfig, rng: random.Random) -> dict:
    """Training targets of one sample (see the module docstring)."""
    labels = {"spans": span_targets(ann["relevant_windows"], n_clips, cfg, rng)}
    sal = None
    if ann.get("relevant_clip_ids") and ann.get("saliency_scores"):
        sal = saliency_from_scores(ann["relevant_clip_ids"], ann["saliency_scores"], n_clips, rng)
    if sal is None:
        sal = saliency_from_window(ann["relevant_windows"][0], ann["duration"], n_clips, rng)
    labels["saliency_pos"], labels["saliency_neg"], labels["saliency_all"] = sal
    return labels


# ------------------------------------------------------------------------------------------------ dataset
class MomentDataset(torch.utils.data.Dataset):
    """Samples of (annotation, optional clip window).

    Args:
        annotations: list of annotation dicts.
        provider: PublicFeatureDir or another FeatureProvider.
        cfg: DataConfig.
        load_labels: make training targets (needs ``relevant_windows``).
        windows: optional list of (annotation index, first clip, end clip) entries to serve instead of one
            sample per annotation (prediction on long videos).
        seed: seeds the label sampling (positive/negative clips, window subsets, training crops).
    """

    def __init__(self, annotations: list[dict], provider, cfg: DataConfig, load_labels: bool = True,
                 windows: list[tuple[int, int, int]] | None = None, seed: int = 2018):
        self.annotations, self.provider, self.cfg = annotations, provider, cfg
        self.load_labels = load_labels
        self.entries = windows if windows is not None else [(i, None, None) for i in range(len(annotations))]
        self.rng = random.Random(seed)
        if load_labels:
            for a in annotations:
                if not a.get("relevant_windows"):
                    raise ModelError(f"qid {a.get('qid')!r} has no relevant_windows (needed for training)")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        ann_index, start, end = self.entries[index]
        ann = self.annotations[ann_index]
        video = load_video(self.provider, ann["vid"], self.cfg)
        if start is None and needs_windows(len(video), ann["duration"], self.cfg):
            if self.load_labels:
                start, end = training_crop(len(video), ann, self.cfg, self.rng)
            else:  # prediction without explicit windows: the first window only
                start, end = 0, self.cfg.v_limit
        if start is not None:
            video = video[start:end]
            ann_view = crop_annotation(ann, start, end, self.cfg.clip_length)
        else:
            video = video[:self.cfg.v_limit]
            ann_view = ann
        n = len(video)
        video_t = torch.from_numpy(np.ascontiguousarray(video))
        if self.cfg.use_tef:
            video_t = torch.cat([video_t, temporal_endpoint_feature(n)], dim=1)
        item = {"meta": {"qid": ann["qid"], "query": ann["query"], "vid": ann["vid"],
                         # seconds the window covers: the model's normalised spans are scaled by this
                         "duration": ann_view["duration"], "offset": 0.0 if start is None else start * self.cfg.clip_length,
                         "ann_index": ann_index},
                "video": video_t, "text": torch.from_numpy(np.ascontiguousarray(load_text(self.provider, ann, self.cfg)))}
        if self.load_labels:
            if not ann_view.get("relevant_windows"):  # a crop without GT cannot happen for training crops
                raise ModelError(f"qid {ann['qid']!r}: no GT window inside the training window")
            item["labels"] = make_labels(ann_view, n, self.cfg, self.rng)
        return item


def pad_sequences(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad [L_i, ...] tensors to [B, max L, ...]; mask [B, max L] float (1 = valid)."""
    longest = max(len(s) for s in seqs)
    out = seqs[0].new_zeros((len(seqs), longest) + tuple(seqs[0].shape[1:]))
    mask = torch.zeros(len(seqs), longest, dtype=torch.float32)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return out, mask


def collate(items: list[dict]) -> dict:
    """Batch of samples -> {"meta": [...], "inputs": {src_txt [B,Lt,Dt], src_txt_mask [B,Lt], src_vid [B,Lv,Dv],
    src_vid_mask [B,Lv]}, "targets": None or the authors' target dict}.

    targets: span_labels = [{"spans": [#w, 2]}], saliency_pos_labels / saliency_neg_labels [B, 2] long,
    saliency_all_labels [B, Lv'] float (and the same tensor as relevant_clips).
    """
    src_txt, src_txt_mask = pad_sequences([it["text"] for it in items])
    src_vid, src_vid_mask = pad_sequences([it["video"] for it in items])
    batch = {"meta": [it["meta"] for it in items],
             "inputs": {"src_txt": src_txt, "src_txt_mask": src_txt_mask, "src_vid": src_vid,
                        "src_vid_mask": src_vid_mask},
             "targets": None}
    if "labels" in items[0]:
        labels = [it["labels"] for it in items]
        saliency_all, _ = pad_sequences([torch.from_numpy(np.asarray(lb["saliency_all"], dtype=np.float32))
                                         for lb in labels])
        batch["targets"] = {
            "span_labels": [{"spans": lb["spans"]} for lb in labels],
            "saliency_pos_labels": torch.tensor([lb["saliency_pos"] for lb in labels], dtype=torch.long),
            "saliency_neg_labels": torch.tensor([lb["saliency_neg"] for lb in labels], dtype=torch.long),
            "saliency_all_labels": saliency_all,
            "relevant_clips": saliency_all,
        }
    return batch


def to_device(batch: dict, device) -> tuple[dict, dict | None]:
    """(model inputs, targets) on ``device``."""
    inputs = {k: v.to(device) for k, v in batch["inputs"].items()}
    targets = batch["targets"]
    if targets is not None:
        targets = {k: ([{"spans": s["spans"].to(device)} for s in v] if k == "span_labels" else v.to(device))
                   for k, v in targets.items()}
    return inputs, targets


# ------------------------------------------------------------------------------------------------ annotations
def load_annotations(path: str) -> list[dict]:
    """Annotation records of a jsonl file, checked for the fields every use needs."""
    from model.metrics import load_jsonl

    records = load_jsonl(path)
    if not records:
        raise ModelError(f"{path} holds no annotations")
    for n, r in enumerate(records, 1):
        missing = [k for k in ("qid", "query", "vid", "duration") if k not in r]
        if missing:
            raise ModelError(f"{path}: record {n} lacks {', '.join(missing)}")
    return records
