"""Video ids that stay unique when libraries or shards are searched together.

A video id is ``library_id << LOCAL_BITS | n``: the library's id (meta ``library_id``) above the video's number
inside its library (meta ``next_video_id`` counts them; a number is never reused). FAISS ids put the clip index
below that (store.db.VIDEO_ID_STRIDE = 2**20 clips a video), so a FAISS id takes 19 + 24 + 20 = 63 bits and fits
int64; a video id (43 bits) is exact in JSON numbers and JavaScript too.

The library id is derived from the indexed folder (its absolute path), so that two indexes of one folder give
their videos the same ids (a resumed ingest and a clean one can be compared row by row), while libraries of
different folders differ except by a 2**-19 chance, which ``store.library_set`` detects and refuses. Indexes
made before ids carried a library id have library id 0: their ids (1, 2, ...) are unchanged.
"""
from __future__ import annotations

import hashlib

from store.errors import VmrError

LIBRARY_BITS = 19
LOCAL_BITS = 24  # 16.7 M videos a library


def library_id_of(root: str) -> int:
    """The library id of an index of ``root`` (absolute path): a non-zero number below 2**LIBRARY_BITS."""
    digest = int.from_bytes(hashlib.sha256(str(root).encode("utf-8")).digest()[:8], "big")
    return 1 + digest % ((1 << LIBRARY_BITS) - 1)


def video_id(library_id: int, number: int) -> int:
    """The id of the ``number``-th video (1, 2, ...) of library ``library_id``."""
    if not 0 < int(number) < (1 << LOCAL_BITS):
        raise VmrError(f"a library holds at most {(1 << LOCAL_BITS) - 1} videos: split the folder into several "
                       "indexes")
    return (int(library_id) << LOCAL_BITS) | int(number)


def library_of(video_id: int) -> int:
    """The library id a video id carries."""
    return int(video_id) >> LOCAL_BITS
