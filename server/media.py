"""Video files and thumbnails for `vmr serve`: which file a video id may serve, and small JPEGs made on demand.

A file is served only when (1) its video is in the index, status 'indexed', and (2) its real path, symlinks
resolved, lies inside the indexed root. The indexer follows symlinks, so a link planted in the video folder that
points elsewhere is indexed, but never served or decoded here. No request parameter is ever a path: videos are
named by integer id.

Thumbnails: one JPEG per (video, 2-s clip), the frame in the middle of the clip, at most THUMB_WIDTH pixels wide,
cached in ``<index>/thumbnails/``. The file name holds the video id and a digest of its content hash (or size and
mtime), so a re-indexed video with new content gets new thumbnails; stale files of a video are removed when its
new ones are made, and files of deleted videos when the catalogue sees them gone (``sweep``).
"""
from __future__ import annotations

import hashlib
import io
import os
import threading

from model.spans import CLIP_SECONDS
from store.errors import VmrError

THUMB_DIR = "thumbnails"
THUMB_WIDTH = 160
THUMB_QUALITY = 80


class Forbidden(VmrError):
    """The video is indexed but its file may not be served (outside the root, or not a regular file)."""


def video_file(root: str, row: dict) -> str:
    """Absolute real path of an indexed video's file, checked to lie inside ``root``.

    Raises Forbidden (outside the root: a symlink escape) or VmrError (the file is gone)."""
    rel = row["path"]
    if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
        raise Forbidden(f"video {row['id']} has a path that leaves the indexed folder")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real_root, real]) != real_root:
        raise Forbidden(f"video {row['id']} ({rel}) is a link to a file outside the indexed folder: not served")
    if not os.path.isfile(real):
        raise VmrError(f"the file of video {row['id']} ({rel}) is gone; re-run `vmr index`")
    return real


def unplayable_reason(root: str, row: dict) -> str | None:
    """Why the page cannot show an indexed video's file (None: it can): the API's per-hit ``playable`` flag."""
    try:
        video_file(root, row)
    except Forbidden:
        return "file not served: outside the indexed folder"
    except VmrError:
        return "file gone since it was indexed: re-run `vmr index`"
    return None


class ThumbnailCache:
    """JPEG thumbnails under ``<index_dir>/thumbnails`` (module docstring)."""

    def __init__(self, index_dir: str):
        self.dir = os.path.join(os.path.realpath(index_dir), THUMB_DIR)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @staticmethod
    def version(row: dict) -> str:
        key = row.get("content_hash") or f"{row.get('size')}-{row.get('mtime')}"
        return hashlib.sha1(str(key).encode()).hexdigest()[:12]

    def path(self, row: dict, clip: int) -> str:
        return os.path.join(self.dir, f"{int(row['id'])}-{self.version(row)}-{int(clip)}.jpg")

    def get(self, file_path: str, row: dict, clip: int) -> str:
        """Path of the cached JPEG of ``clip`` of the video ``row`` (file at ``file_path``), made if missing."""
        out = self.path(row, clip)
        if os.path.isfile(out):
            return out
        with self._guard:
            lock = self._locks.setdefault(out, threading.Lock())
        with lock:  # one decode per thumbnail, however many requests ask at once
            if not os.path.isfile(out):
                data = render_thumbnail(file_path, (clip + 0.5) * CLIP_SECONDS, row.get("duration"))
                os.makedirs(self.dir, exist_ok=True)
                self._drop_stale(row)
                tmp = f"{out}.{os.getpid()}.{threading.get_ident()}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, out)
        with self._guard:
            self._locks.pop(out, None)
        return out

    def _drop_stale(self, row: dict) -> None:
        prefix, current = f"{int(row['id'])}-", f"{int(row['id'])}-{self.version(row)}-"
        for name in _listdir(self.dir):
            if name.startswith(prefix) and not name.startswith(current):
                _remove(os.path.join(self.dir, name))

    def sweep(self, live_ids: set[int]) -> int:
        """Remove thumbnails of videos no longer indexed; returns how many files went."""
        removed = 0
        for name in _listdir(self.dir):
            head = name.split("-", 1)[0]
            if not head.isdigit() or int(head) not in live_ids:
                removed += _remove(os.path.join(self.dir, name))
        return removed


def render_thumbnail(file_path: str, t: float, duration: float | None) -> bytes:
    """JPEG bytes of the frame shown at ``t`` seconds (PyAV decode, PIL encode), at most THUMB_WIDTH wide."""
    import av
    from PIL import Image

    if duration:
        t = min(t, max(float(duration) - 0.05, 0.0))
    try:
        with av.open(file_path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if stream.time_base is not None and t > 0:
                container.seek(int(t / stream.time_base), stream=stream, backward=True, any_frame=False)
            image = None
            for frame in container.decode(stream):
                image = frame
                if frame.time is None or frame.time + 1e-3 >= t - 0.5 / float(stream.average_rate or 25):
                    break
            if image is None:
                raise VmrError(f"no frame at {t:.1f} s")
            picture = image.to_image()
    except av.error.FFmpegError as err:
        raise VmrError(f"cannot decode a thumbnail: {' '.join(str(err).split())[:200]}") from None
    if picture.width > THUMB_WIDTH:
        picture = picture.resize((THUMB_WIDTH, max(1, round(picture.height * THUMB_WIDTH / picture.width))),
                                 Image.BILINEAR)
    buf = io.BytesIO()
    picture.convert("RGB").save(buf, format="JPEG", quality=THUMB_QUALITY)
    return buf.getvalue()


def _listdir(path: str) -> list[str]:
    try:
        return [n for n in os.listdir(path) if n.endswith(".jpg")]
    except FileNotFoundError:
        return []


def _remove(path: str) -> int:
    try:
        os.remove(path)
        return 1
    except FileNotFoundError:
        return 0
