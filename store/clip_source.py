"""How an index records the CLIP that embedded its clips (meta ``clip_source``): written and read here only.

Search loads exactly that CLIP again to embed queries, a re-index reuses it without CLIP options, and the index's
``clip`` feature kind names its weights and precision (store/kinds.py). Local files are recorded as absolute paths,
so that a search started from another folder finds them; model names and open_clip tags are recorded as given.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

UNRECORDED_PRECISION = "fp32"  # the embeddings of an index whose record names no precision are fp32


@dataclass(frozen=True)
class CLIPSource:
    """model: open_clip model name or model-config JSON path; pretrained: open_clip tag, checkpoint path, or None
    (random weights: tests and speed benchmarks only); precision: the one its clip embeddings were made at."""
    model: str
    pretrained: str | None
    precision: str = UNRECORDED_PRECISION

    @classmethod
    def of(cls, model: str, pretrained: str | None, precision: str) -> CLIPSource:
        """The record of a CLIP as a run loads it: local files made absolute."""
        def absolute(value):
            return os.path.abspath(value) if value and os.path.isfile(value) else value

        return cls(absolute(model), absolute(pretrained) or None, precision)

    @classmethod
    def recorded(cls, meta: dict) -> CLIPSource:
        """The record in an index's ``meta`` (``model`` is "" when the index records none)."""
        record = meta.get("clip_source") or {}
        return cls(record.get("model") or "", record.get("pretrained"),
                   record.get("precision") or UNRECORDED_PRECISION)

    def to_meta(self) -> dict:
        """The value of meta ``clip_source``."""
        return {"model": self.model, "pretrained": self.pretrained, "precision": self.precision}
