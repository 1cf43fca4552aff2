"""One ingest at a time per index: an exclusive lock on ``ingest.lock`` in the index folder.

DuckDB's own lock does not keep two ingests apart: each writer holds the file only for short commit batches, so
two `vmr index` runs would interleave their commits and overwrite each other's FAISS files. The lock is an
``flock``: the kernel drops it when the holder exits, however it exits (a killed run never leaves it stale).
Readers never take it; `vmr status` and `vmr search` only ask whether an ingest is running.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os

from store.errors import VmrError

LOCK_FILE = "ingest.lock"


def lock_path(index_dir) -> str:
    return os.path.join(os.fspath(index_dir), LOCK_FILE)


@contextlib.contextmanager
def ingest_lock(index_dir):
    """Hold the index's ingest lock (creating the folder if needed). VmrError (one line) when another ingest holds
    it or the folder cannot be written."""
    index_dir = os.fspath(index_dir)
    try:
        os.makedirs(index_dir, exist_ok=True)
        fd = os.open(lock_path(index_dir), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise VmrError(f"cannot write to the index folder {index_dir} ({err.strerror or err}): give an --index "
                       "folder you can write to") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise VmrError(f"another `vmr index` (pid {holder}) is writing {index_dir}: wait for it to finish, "
                           "then re-run") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def ingest_running(index_dir) -> bool:
    """True while some process holds the index's ingest lock."""
    try:
        fd = os.open(lock_path(index_dir), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
