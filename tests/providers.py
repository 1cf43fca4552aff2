"""An in-memory feature source with the FeatureProvider interface (what the CLI builds from a vmr index)."""
from __future__ import annotations


class ArrayProvider:
    """videos: vid -> [T, dim]; texts: query -> [L, tdim]."""

    def __init__(self, videos: dict, texts: dict, dim: int = 16, tdim: int = 8, clip_model: str = "ViT-B-32:openai"):
        self.videos, self.texts, self.dim, self.tdim, self.clip_model = videos, texts, dim, tdim, clip_model

    def video_features(self, vid):
        return self.videos[vid]

    def text_features(self, query):
        return self.texts[query]

    def feature_spec(self):
        return {"clip_model": self.clip_model, "video_kinds": ["clip"], "video_dims": [self.dim],
                "text_dim": self.tdim, "clip_seconds": 2.0}
