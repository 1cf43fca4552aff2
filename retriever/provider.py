"""A vmr index as a feature source for `vmr train` / `vmr predict --index` (model.providers.FeatureProvider).

model/ must not read an index itself; this class does it for it: video features are the index's clip embeddings,
text features the per-token features of the CLIP model that built the index.
"""
from __future__ import annotations

import numpy as np

from retriever.windows import index_clip_seconds
from store.errors import VmrError


class IndexFeatureProvider:
    """video_features(vid) -> np.float32 [T, D]; text_features(query) -> np.float32 [L, Dt]; feature_spec().

    ``vid`` names an indexed video by its path relative to the indexed root or its file stem.
    """

    def __init__(self, index_dir, device: str = "auto", encoder=None):
        from retriever.search import load_query_encoder
        from store.library import Library

        self.library = Library(index_dir, read_only=True)
        self.meta = self.library.meta()
        self.encoder = encoder or load_query_encoder(self.meta, device)
        self._videos: dict[str, np.ndarray] = {}
        self._texts: dict[str, np.ndarray] = {}

    def video_features(self, vid: str) -> np.ndarray:
        if vid not in self._videos:
            self._videos[vid] = self.library.clip_embeddings(self.library.resolve_vid(vid))
        return self._videos[vid]

    def text_features(self, query: str) -> np.ndarray:
        if query not in self._texts:
            self._texts[query] = self.encoder.encode_text_tokens([query])[0]
        return self._texts[query]

    def hard_negatives(self, query: str, exclude_vids) -> list[tuple[str, int, int]]:
        """Windows of other videos that the coarse stage ranks high for ``query``, best first, as (vid, first
        clip, end clip): hard negative windows for training (model.negatives). ``exclude_vids``: annotation vids
        that hold this query's moment."""
        from retriever.coarse import coarse_candidates

        excluded = set()
        for vid in exclude_vids:
            try:
                excluded.add(self.library.resolve_vid(vid))
            except VmrError:  # a vid the index does not hold cannot be a candidate either
                continue
        pooled = self.encoder.encode_text([query])[0]
        with self.library.session():
            windows = coarse_candidates(self.library, pooled, clip_seconds=index_clip_seconds(self.meta))
        return [(w.path, w.first_clip, w.last_clip) for w in windows if w.video_id not in excluded]

    def feature_spec(self) -> dict:
        return {"clip_model": self.meta["clip_model"], "video_kinds": ["clip"],
                "video_dims": [int(self.meta["embed_dim"])], "text_dim": int(self.encoder.text_width),
                "clip_seconds": index_clip_seconds(self.meta)}
