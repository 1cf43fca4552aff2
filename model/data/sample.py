"""One model sample and one batch: features as LLMEPET reads them. Training (model.data.dataset), prediction
(model.inference.predict) and search's rerank stage (retriever.rerank) all build their inputs here.

A sample (the authors' ``StartEndDataset``): the window's clip features, each source L2-normalised on its own,
with the TEF appended; the query's per-token features cut to ``max_q_l`` and L2-normalised. A batch pads both and
masks the padding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

L2_EPS = 1e-5  # the authors' l2_normalize_np_array eps
MAX_Q_L_UNLIMITED = 100  # the authors map max_q_l = -1 to 100 tokens


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


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (+ eps, as the authors)."""
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + L2_EPS)


def temporal_endpoint_feature(n_clips: int, device=None) -> torch.Tensor:
    """TEF as the authors' dataset computes it: row i = (i / n, (i + 1) / n).

    Returns: Tensor [n_clips, 2].
    """
    start = torch.arange(n_clips, dtype=torch.float32, device=device) / n_clips
    return torch.stack([start, start + 1.0 / n_clips], dim=1)


def video_input(feats: np.ndarray, cfg: DataConfig, source_dims: list[int] | None = None) -> torch.Tensor:
    """A window's raw clip features [n, Dv] -> the model's video input [n, Dv (+2 TEF)].

    ``source_dims``: widths of the concatenated sources (e.g. SlowFast 2304 + CLIP 512), each L2-normalised on its
    own; None (or widths that do not add up) = one source.
    """
    feats = np.asarray(feats, dtype=np.float32)
    if cfg.normalize_v:
        dims = source_dims if source_dims and sum(source_dims) == feats.shape[1] else [feats.shape[1]]
        bounds = np.cumsum([0, *dims])
        feats = np.concatenate([l2_normalize(feats[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])], axis=1)
    video = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    if cfg.use_tef:
        video = torch.cat([video, temporal_endpoint_feature(len(video))], dim=1)
    return video


def text_input(tokens: np.ndarray, cfg: DataConfig) -> torch.Tensor:
    """A query's per-token features [L, Dt] -> the model's text input [min(L, max_q_l), Dt]."""
    tokens = np.asarray(tokens, dtype=np.float32)[:cfg.q_limit]
    if cfg.normalize_t:
        tokens = l2_normalize(tokens)
    return torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float32))


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
    """Samples {"video", "text", "meta"[, "labels"]} -> {"meta": [...], "inputs": {src_txt [B,Lt,Dt],
    src_txt_mask [B,Lt], src_vid [B,Lv,Dv], src_vid_mask [B,Lv]}, "targets": None or the authors' target dict}.

    targets: span_labels = [{"spans": [#w, 2]}], saliency_pos_labels / saliency_neg_labels [B, 2] long,
    saliency_all_labels [B, Lv'] float (and the same tensor as relevant_clips), negative [B] bool.
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
            # negative windows (model.data.negatives): no span target, saliency 0; the criterion skips their hinge pairs
            "negative": torch.tensor([bool(lb.get("negative", False)) for lb in labels]),
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
