"""Find the video files under a folder (by name and by content) and fingerprint them for incremental re-runs.

A file is a candidate when its extension is a video one (then even an empty or broken one: it is reported as
failed, so the user learns about it) or when its first bytes are a video container's signature (a video saved
without extension). Audio and image files are not candidates. Symlinks are followed; a broken one is a candidate
with its error. FIFOs, sockets and devices are never opened (opening a FIFO would block).
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass

VIDEO_EXTENSIONS = {
    ".mp4", ".m4v", ".mov", ".qt", ".mkv", ".webm", ".avi", ".wmv", ".asf", ".flv", ".mpg", ".mpeg", ".m2v",
    ".ts", ".m2ts", ".mts", ".3gp", ".3g2", ".ogv", ".vob", ".mxf", ".divx", ".f4v", ".y4m", ".dv", ".rm", ".rmvb",
}
NOT_VIDEO_EXTENSIONS = {  # containers that can hold video but almost always hold audio/images here
    ".m4a", ".mp3", ".aac", ".wav", ".flac", ".ogg", ".oga", ".opus", ".wma", ".jpg", ".jpeg", ".png", ".gif",
    ".webp", ".heic", ".avif", ".mka",
}
HASH_BLOCK = 1 << 20  # content hash: size + three 1-MiB blocks (start, middle, end); cheap on huge files


@dataclass
class Candidate:
    path: str  # relative to the root, '/'-separated (the id users see)
    abspath: str
    size: int
    mtime: float
    error: str | None = None  # set when the file cannot even be read (broken symlink, not a regular file, ...)


def discover(root: str, exclude: list[str] = ()) -> list[Candidate]:
    """All candidate video files under ``root`` (recursive), sorted by relative path.

    ``exclude``: absolute folders to skip (the index directory when it lies inside the video folder).
    Hidden files and folders (name starting with '.') are skipped.
    """
    root = os.path.abspath(root)
    excluded = {os.path.realpath(e) for e in exclude}
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.realpath(os.path.join(dirpath, d)) not in excluded)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            abspath = os.path.join(dirpath, name)
            candidate = _candidate(root, abspath)
            if candidate is not None:
                found.append(candidate)
    return sorted(found, key=lambda c: c.path)


def _candidate(root: str, abspath: str) -> Candidate | None:
    rel = os.path.relpath(abspath, root).replace(os.sep, "/")
    ext = os.path.splitext(abspath)[1].lower()
    by_name = ext in VIDEO_EXTENSIONS
    try:
        st = os.stat(abspath)  # follows symlinks
    except FileNotFoundError:
        if os.path.islink(abspath) and (by_name or ext not in NOT_VIDEO_EXTENSIONS):
            return Candidate(rel, abspath, 0, 0.0, f"broken symlink (target {os.readlink(abspath)} is missing)")
        return None
    except OSError as err:
        return Candidate(rel, abspath, 0, 0.0, f"cannot stat: {err.strerror}") if by_name else None
    if not stat.S_ISREG(st.st_mode):
        return Candidate(rel, abspath, 0, st.st_mtime, "not a regular file") if by_name else None
    if not by_name:
        if ext in NOT_VIDEO_EXTENSIONS or not looks_like_video(abspath):
            return None
    return Candidate(rel, abspath, st.st_size, st.st_mtime)


def looks_like_video(path: str) -> bool:
    """True when the first bytes are the signature of a video container (mp4/mov, mkv/webm, avi, ...)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    if len(head) < 12:
        return False
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):  # ISO-BMFF / QuickTime
        brand = head[8:12]
        return brand not in (b"M4A ", b"M4B ", b"M4P ", b"heic", b"heix", b"mif1", b"avif")
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska / WebM
        return True
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX"):
        return True
    if head[:4] == b"\x30\x26\xb2\x75":  # ASF / WMV
        return True
    if head[:3] == b"FLV" or head[:4] == b"\x00\x00\x01\xba" or head[:4] == b"\x00\x00\x01\xb3":  # FLV, MPEG-PS/ES
        return True
    if head[0] == 0x47 and len(head) >= 1 and _looks_like_ts(path):  # MPEG-TS: sync byte every 188 bytes
        return True
    return head[:9] == b"YUV4MPEG2"


def _looks_like_ts(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            data = f.read(188 * 4)
    except OSError:
        return False
    return len(data) >= 188 * 3 and all(data[i * 188] == 0x47 for i in range(len(data) // 188))


def content_hash(path: str, size: int | None = None) -> str:
    """sha1 over the size and three 1-MiB blocks (start, middle, end): detects edits without reading GBs."""
    size = os.path.getsize(path) if size is None else size
    digest = hashlib.sha1(str(size).encode())
    with open(path, "rb") as f:
        offsets = [0] if size <= 3 * HASH_BLOCK else [0, size // 2 - HASH_BLOCK // 2, size - HASH_BLOCK]
        for offset in offsets:
            f.seek(offset)
            digest.update(f.read(HASH_BLOCK if size > 3 * HASH_BLOCK else size))
    return digest.hexdigest()
