"""Feature sources: where a sample's clip and token features come from.

- :class:`PublicFeatureDir`, the public release layout: ``DIR/<v_feat_dir>/<vid>.npz`` (key ``features``, one row
  per clip; several dirs are concatenated, e.g. SlowFast + CLIP) and ``DIR/<t_feat_dir>/qid<qid>.npz`` (key
  ``last_hidden_state``, one row per token);
- any object with ``video_features(vid)``, ``text_features(query)`` and ``feature_spec()``: the index source the
  CLI builds from a vmr index (model/ does not import store).

Features come back raw; model.data.sample normalises them into model inputs.
"""
from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import numpy as np

from model.errors import ModelError
from model.data.sample import DataConfig

# Kind of video feature -> its public sub-directory; any other kind K lives in K_features (video_feature_dir).
VIDEO_FEATURE_DIRS = {"slowfast": "slowfast_features", "clip": "clip_features"}
TEXT_FEATURE_DIR = "clip_text_features"  # per-token CLIP text features, qid<qid>.npz
# Public feature sub-directory -> kind of feature (what a checkpoint's feature spec compares).
FEATURE_KINDS = {**{d: kind for kind, d in VIDEO_FEATURE_DIRS.items()}, TEXT_FEATURE_DIR: "clip"}
DEFAULT_PUBLIC_CLIP_MODEL = "ViT-B-32:openai"  # what produced the public QVHighlights / Charades CLIP features


def video_feature_dir(kind: str) -> str:
    """The public layout's sub-directory of a video feature kind."""
    return VIDEO_FEATURE_DIRS.get(kind, f"{kind}_features")


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

    def __init__(self, root: str, v_feat_dirs: list[str] | None = None, t_feat_dir: str = TEXT_FEATURE_DIR,
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


def load_video(provider, vid: str, cfg: DataConfig) -> np.ndarray:
    """Raw [T, Dv] clip features of ``vid`` (sources concatenated). Public layout: each source cut to max_v_l
    first and all to the shortest (some sources are a row longer), as the authors; a provider hands back the
    whole video (windows are cut later)."""
    if isinstance(provider, PublicFeatureDir):
        sources = [f[:cfg.v_limit] for f in provider.video_sources(vid)]
        n = min(len(f) for f in sources)
        return np.concatenate([f[:n] for f in sources], axis=1).astype(np.float32)
    feats = np.asarray(provider.video_features(vid), dtype=np.float32)
    if feats.ndim != 2 or len(feats) == 0:
        raise ModelError(f"video {vid!r} has no clip features")
    return feats


def video_source_dims(provider) -> list[int] | None:
    """Widths of the provider's concatenated video sources (each is normalised on its own)."""
    return provider.feature_spec().get("video_dims")


def load_text(provider, ann: dict, cfg: DataConfig) -> np.ndarray:
    """Raw [L, Dt] query token features (model.data.sample.text_input cuts and normalises them)."""
    if isinstance(provider, PublicFeatureDir):
        feats = provider.text_features_for_qid(ann["qid"])
    else:
        feats = np.asarray(provider.text_features(ann["query"]), dtype=np.float32)
    if len(feats) == 0:
        raise ModelError(f"qid {ann['qid']!r}: no text features")
    return feats
