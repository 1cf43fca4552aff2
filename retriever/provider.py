"""A vmr index as a feature source for `vmr train` / `vmr predict --index` (model.data.providers.FeatureProvider).

model/ must not read an index itself; this class does it for it: video features are the index's stored feature
kinds side by side (its coarse kind, CLIP, unless told others: ``select_kinds``, which `vmr predict` calls with
its checkpoint's kinds), text features the per-token features of the CLIP model that built the index.

Training reads the same few hundred videos and sentences every epoch, so everything read is kept in memory, and
the bulk reads (``preload``, ``hard_negatives_many``) hold one DuckDB connection: opening the file costs ~40 ms a
time, and per-item opens would make a 207-sentence epoch of the test world's tiny reranker take ~25 s, not ~5.
"""
from __future__ import annotations

import os

import numpy as np

from retriever.coarse import coarse_candidates
from retriever.search import load_query_encoder
from retriever.windows import index_clip_seconds
from store import kinds
from store.errors import VmrError
from store.library import Library


class IndexFeatureProvider:
    """video_features(vid) -> np.float32 [T, D]; text_features(query) -> np.float32 [L, Dt]; feature_spec().

    ``vid`` names an indexed video by its path relative to the indexed root or its file stem.
    """

    def __init__(self, index_dir, device: str = "auto", encoder=None, video_kinds: list[str] | None = None):
        self.library = Library(index_dir, read_only=True)
        self.meta = self.library.meta()
        self.encoder = encoder or load_query_encoder(self.meta, device)
        self._videos: dict[str, np.ndarray] = {}
        self._texts: dict[str, np.ndarray] = {}
        self._ids: dict[str, int] | None = None  # vid name (path or unique stem) -> video id
        self.video_kinds = [kinds.coarse_kind(self.meta)]
        if video_kinds:
            self.select_kinds(video_kinds)

    def select_kinds(self, video_kinds: list[str], dims: list[int] | None = None, who: str = "the checkpoint") -> None:
        """Read these feature kinds, in this order (refused in one line if the index lacks one, store.kinds)."""
        kinds.check_kinds(self.meta, list(video_kinds), dims, who)
        if list(video_kinds) != self.video_kinds:
            self.video_kinds = list(video_kinds)
            self._videos.clear()

    def video_id(self, vid: str) -> int:
        """Video id of ``vid`` (names read once; an unknown or ambiguous name gets the library's own error)."""
        if self._ids is None:
            ids, stems = {}, {}
            for row in self.library.videos(status="indexed"):
                ids[row["path"]] = int(row["id"])
                stem = os.path.splitext(os.path.basename(row["path"]))[0]
                stems.setdefault(stem, []).append(int(row["id"]))
            self._ids = {**{s: v[0] for s, v in stems.items() if len(v) == 1}, **ids}
        name = str(vid).replace(os.sep, "/")
        if name in self._ids:
            return self._ids[name]
        return self.library.resolve_vid(name)  # raises the clear message

    def video_features(self, vid: str) -> np.ndarray:
        if vid not in self._videos:
            video_id = self.video_id(vid)
            self._videos[vid] = self.library.features_many([video_id], self.video_kinds).get(
                video_id, np.zeros((0, 0), np.float32))
        return self._videos[vid]

    def preload(self, vids) -> None:
        """Read the features of many videos in one query a kind (a training set's videos)."""
        wanted = {}
        for vid in set(vids) - set(self._videos):
            try:
                wanted[vid] = self.video_id(vid)
            except VmrError:  # left for video_features to report when (if) it is asked for
                continue
        with self.library.session():
            got = self.library.features_many(wanted.values(), self.video_kinds)
        for vid, video_id in wanted.items():
            if len(got.get(video_id, ())):
                self._videos[vid] = got[video_id]

    def text_features(self, query: str) -> np.ndarray:
        if query not in self._texts:
            self._texts[query] = self.encoder.encode_text_tokens([query])[0]
        return self._texts[query]

    def hard_negatives(self, query: str, exclude_vids) -> list[tuple[str, int, int]]:
        """Windows of other videos that the coarse stage ranks high for ``query``, best first, as (vid, first
        clip, end clip): hard negative windows for training (model.data.negatives). ``exclude_vids``: annotation vids
        that hold this query's moment."""
        return self.hard_negatives_many({query: exclude_vids})[query]

    def hard_negatives_many(self, excluded_of: dict, batch: int = 64) -> dict[str, list[tuple[str, int, int]]]:
        """``hard_negatives`` for many queries ({query: exclude_vids}) at once: queries encoded in batches, one
        DuckDB connection, and the windows' videos read into memory (training draws from them every epoch)."""
        queries = list(excluded_of)
        out: dict[str, list] = {}
        with self.library.session():
            for start in range(0, len(queries), batch):
                chunk = queries[start:start + batch]
                pooled = self.encoder.encode_text(chunk)
                for query, q in zip(chunk, pooled):
                    excluded = set()
                    for vid in excluded_of[query]:
                        try:
                            excluded.add(self.video_id(vid))
                        except VmrError:  # a vid the index does not hold cannot be a candidate either
                            continue
                    windows = coarse_candidates(self.library, q, clip_seconds=index_clip_seconds(self.meta))
                    out[query] = [(w.path, w.first_clip, w.last_clip) for w in windows
                                  if w.video_id not in excluded]
            self.preload({path for hits in out.values() for path, _, _ in hits})
        return out

    def feature_spec(self) -> dict:
        held = kinds.feature_kinds(self.meta)
        return {"clip_model": self.meta["clip_model"], "video_kinds": list(self.video_kinds),
                "video_dims": [int(held[kind]["dim"]) for kind in self.video_kinds],
                "text_dim": int(self.encoder.text_width),
                "clip_seconds": index_clip_seconds(self.meta)}
