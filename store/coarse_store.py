"""What search reads from a library: the coarse stage's interface, and a set of libraries searched as one.

``CoarseStore`` is everything retriever/ asks of a library to answer a query: nearest clips and pseudo-events of
a query vector, the rows of the videos they fall in, their events and their feature vectors. ``store.Library``
(one DuckDB file + its FAISS files) implements it; ``LibrarySet`` implements it over several libraries (shards
of one, or separate ones) on this machine, and a set of shards served on other machines implements the same
methods. Video ids are unique across libraries (store.ids), so hits from several members merge as they are.
"""
from __future__ import annotations

import contextlib
import heapq
from typing import Protocol, runtime_checkable

import numpy as np

from store import ids, kinds
from store.errors import VmrError

Hit = tuple[int, int, float]  # (video id, clip or event index, cosine score)
SAME_META = ("clip_model", "embed_dim", "clip_seconds", "coarse_kind")  # what libraries searched as one share


@runtime_checkable
class CoarseStore(Protocol):
    def meta(self) -> dict:
        """clip_model, embed_dim, clip_seconds, clip_source, feature_kinds, coarse_kind, ... (store.db)."""

    def session(self):
        """A context in which a query's reads share their connections."""

    def search_clips(self, query: np.ndarray, k: int) -> list[Hit]:
        """Top-k clips by cosine with ``query`` f32 [D] (normalised), best first, scored exactly."""

    def search_events(self, query: np.ndarray, k: int) -> list[Hit]:
        """Top-k pseudo-events, best first, scored exactly."""

    def videos_by_id(self, video_ids) -> dict[int, dict]:
        """{id: row (path, duration, n_clips, n_events, status, error)}."""

    def events_many(self, video_ids) -> dict[int, list[dict]]:
        """{id: [{idx, start, end}] in order}."""

    def clip_embeddings_many(self, video_ids) -> dict[int, np.ndarray]:
        """{id: f32 [T, D]} of the coarse kind."""

    def features_many(self, video_ids, kinds_wanted: list[str]) -> dict[int, np.ndarray]:
        """{id: f32 [T, sum of dims]}: the named kinds side by side (videos lacking one are left out)."""


class LibrarySet:
    """Several libraries searched as one: top-k merged by score, reads sent to the library a video id names.

    Refuses, in one line, libraries that cannot be searched together: another CLIP, clip length or coarse kind,
    or two that share a library id (the same folder indexed twice, or a 2**-19 chance: re-index one of them)."""

    def __init__(self, libraries: list):
        if not libraries:
            raise VmrError("no index to search: give at least one --index")
        self.libraries = list(libraries)
        self.index_dir = ", ".join(str(lib.index_dir) for lib in self.libraries)
        metas = [lib.meta() for lib in self.libraries]
        first = metas[0]
        for lib, meta in zip(self.libraries[1:], metas[1:]):
            for key in SAME_META:
                if _value(meta, key) != _value(first, key):
                    raise VmrError(f"{lib.index_dir} has {key} {_value(meta, key)}, {self.libraries[0].index_dir} "
                                   f"{_value(first, key)}: only indexes made alike can be searched together")
        self._owner: dict[int, object] = {}
        for lib, meta in zip(self.libraries, metas):
            library_id = int(meta.get("library_id", 0))
            if library_id in self._owner:
                raise VmrError(f"{lib.index_dir} and {self._owner[library_id].index_dir} share library id "
                               f"{library_id} (one folder indexed twice, or an index from before library ids): "
                               "search one of them, or re-index one into a new --index")
            self._owner[library_id] = lib
        self._meta = first

    def meta(self) -> dict:
        """The first library's meta (the members agree on SAME_META); ``libraries`` lists every member's dir."""
        return {**self._meta, "libraries": [str(lib.index_dir) for lib in self.libraries]}

    @contextlib.contextmanager
    def session(self):
        with contextlib.ExitStack() as stack:
            for lib in self.libraries:
                stack.enter_context(lib.session())
            yield self

    def close(self) -> None:
        for lib in self.libraries:
            lib.close()

    def search_clips(self, query: np.ndarray, k: int) -> list[Hit]:
        return _merged([lib.search_clips(query, k) for lib in self.libraries], k)

    def search_events(self, query: np.ndarray, k: int) -> list[Hit]:
        return _merged([lib.search_events(query, k) for lib in self.libraries], k)

    def videos_by_id(self, video_ids) -> dict[int, dict]:
        return self._gather("videos_by_id", video_ids)

    def events_many(self, video_ids) -> dict[int, list[dict]]:
        return self._gather("events_many", video_ids)

    def clip_embeddings_many(self, video_ids) -> dict[int, np.ndarray]:
        return self._gather("clip_embeddings_many", video_ids)

    def features_many(self, video_ids, kinds_wanted: list[str]) -> dict[int, np.ndarray]:
        return self._gather("features_many", video_ids, kinds_wanted)

    def _gather(self, method: str, video_ids, *args) -> dict:
        """One call a member, with the ids that member holds; the answers joined."""
        by_owner: dict[int, list[int]] = {}
        for vid in {int(v) for v in video_ids}:
            by_owner.setdefault(ids.library_of(vid), []).append(vid)
        out: dict = {}
        for library_id, wanted in by_owner.items():
            owner = self._owner.get(library_id)
            if owner is not None:
                out.update(getattr(owner, method)(wanted, *args))
        return out


def _value(meta: dict, key: str):
    return kinds.coarse_kind(meta) if key == "coarse_kind" else meta.get(key)


def _merged(per_member: list[list[Hit]], k: int) -> list[Hit]:
    """The k best of several best-first hit lists (ties: the earlier member first)."""
    return list(heapq.merge(*per_member, key=lambda hit: -hit[2]))[:k]
