"""Annotations and the dataset of samples (annotation, optional clip window) that training and prediction read.

An annotation is one jsonl record: ``qid`` (int for QVHighlights/Charades, str for TACoS), ``query``, ``vid``,
``duration`` (s), and with labels ``relevant_windows`` [[st, ed], ...] (s, int or float), plus for QVHighlights
``relevant_clip_ids`` and ``saliency_scores`` (3 annotators, 0..4 each).

Videos longer than ``max_v_l`` clips (an index holds arbitrary lengths; the public QVHighlights features never
are): training crops a window of ``max_v_l`` clips placed at random around the first GT window (model.data.targets);
prediction tiles windows over the whole video (model.inference.predict).
"""
from __future__ import annotations

import random

import torch

from model.data.negatives import SOURCES, NegativeSampler, negative_labels
from model.data.providers import load_text, load_video, video_source_dims
from model.data.sample import DataConfig, text_input, video_input
from model.data.targets import crop_annotation, make_labels, training_crop
from model.errors import ModelError
from model.jsonl import load_jsonl


NEGATIVE = "negative"  # an entry's marker: a negative window of the annotation (drawn per item)


def needs_windows(n_clips: int, duration: float, cfg: DataConfig) -> bool:
    """True when the video is longer than one model window. The duration test keeps the public features'
    one-row wobble (a 150-s QVHighlights video with 76 rows) on the authors' plain cut."""
    limit = cfg.v_limit
    return limit is not None and n_clips > limit and duration > limit * cfg.clip_length + 1e-6


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
        neg_ratio: negative windows (model.data.negatives) per annotation and epoch (0: none, the authors' recipe);
            ``round(neg_ratio * len(annotations))`` negative entries follow the annotations' own.
        neg_sources: the negative sources to draw from (model.data.negatives.SOURCES).
    """

    def __init__(self, annotations: list[dict], provider, cfg: DataConfig, load_labels: bool = True,
                 windows: list[tuple[int, int, int]] | None = None, seed: int = 2018, neg_ratio: float = 0.0,
                 neg_sources=SOURCES):
        self.annotations, self.provider, self.cfg = annotations, provider, cfg
        self.load_labels = load_labels
        self.entries = windows if windows is not None else [(i, None, None) for i in range(len(annotations))]
        self.rng = random.Random(seed)
        if load_labels:
            for a in annotations:
                if not a.get("relevant_windows"):
                    raise ModelError(f"qid {a.get('qid')!r} has no relevant_windows (needed for training)")
        if hasattr(provider, "preload"):  # an index: every annotated video in one read, not one read per item
            provider.preload({a["vid"] for a in annotations})
        self.negatives = None
        if neg_ratio > 0 and load_labels and windows is None:
            self.negatives = NegativeSampler(annotations, provider, self.n_clips, cfg.v_limit, cfg.clip_length,
                                             neg_sources)
            n_neg = int(round(neg_ratio * len(annotations)))
            self.entries = self.entries + [(i % len(annotations), NEGATIVE, None) for i in range(n_neg)]
        self._n_clips: dict[str, int] = {}

    def n_clips(self, vid: str) -> int:
        """Clips of ``vid`` (cached; the negative sampler places windows with it)."""
        if vid not in self._n_clips:
            self._n_clips[vid] = len(load_video(self.provider, vid, self.cfg))
        return self._n_clips[vid]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        ann_index, start, end = self.entries[index]
        ann = self.annotations[ann_index]
        if start == NEGATIVE:
            return self.negative_item(ann_index)
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
        item = {"meta": {"qid": ann["qid"], "query": ann["query"], "vid": ann["vid"],
                         # seconds the window covers: the model's normalised spans are scaled by this
                         "duration": ann_view["duration"], "offset": 0.0 if start is None else start *
                         self.cfg.clip_length, "ann_index": ann_index},
                "video": video_input(video, self.cfg, video_source_dims(self.provider)),
                "text": text_input(load_text(self.provider, ann, self.cfg), self.cfg)}
        if self.load_labels:
            if not ann_view.get("relevant_windows"):  # a crop without GT cannot happen for training crops
                raise ModelError(f"qid {ann['qid']!r}: no GT window inside the training window")
            item["labels"] = make_labels(ann_view, n, self.cfg, self.rng)
        return item


    def negative_item(self, ann_index: int) -> dict:
        """A window without ``ann``'s moment, with ``ann``'s query, target "no moment here" (model.data.negatives).
        meta["vid"] stays the query's own video: the model's shuffled-pair pass must not pair that video with
        this query as if it were irrelevant; meta["window_vid"] names the video the window is from."""
        ann = self.annotations[ann_index]
        drawn = self.negatives.sample(ann, self.rng)
        if drawn is None:  # no source has a window for it: its positive sample instead, never a wrong label
            return self[ann_index]  # (negatives exist only without explicit windows: entry i is annotation i)
        source, vid, start, end = drawn
        video = load_video(self.provider, vid, self.cfg)[start:end]
        return {"meta": {"qid": ann["qid"], "query": ann["query"], "vid": ann["vid"], "window_vid": vid,
                         "negative": source, "window": (start, end), "duration": len(video) * self.cfg.clip_length,
                         "offset": start * self.cfg.clip_length, "ann_index": ann_index},
                "video": video_input(video, self.cfg, video_source_dims(self.provider)),
                "text": text_input(load_text(self.provider, ann, self.cfg), self.cfg),
                "labels": negative_labels(len(video))}


def load_annotations(path: str) -> list[dict]:
    """Annotation records of a jsonl file, checked for the fields every use needs."""
    records = load_jsonl(path)
    if not records:
        raise ModelError(f"{path} holds no annotations")
    for n, r in enumerate(records, 1):
        missing = [k for k in ("qid", "query", "vid", "duration") if k not in r]
        if missing:
            raise ModelError(f"{path}: record {n} lacks {', '.join(missing)}")
    return records
