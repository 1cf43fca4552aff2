"""Releasing the resident pages of a memory-mapped checkpoint's tensors once they are no longer needed: the stored
blocks of a checkpoint loaded with mmap (model.inference.checkpoint) are hashed, cast or quantized
(model.inference.precision) one layer at a time and never resident whole."""
from __future__ import annotations

import ctypes
import mmap

import torch


def release_file_pages(t: torch.Tensor) -> None:
    """Drop the whole pages under ``t`` from this process's resident memory when ``t`` lies in a private
    memory-mapped file (a checkpoint loaded with mmap) and is being discarded: a quantized layer's stored weights
    would otherwise stay resident until the whole mapping goes. Such pages are re-read from the file if touched
    again; heap memory, shared mappings and non-Linux systems are left alone."""
    start = t.data_ptr()
    lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (start + t.numel() * t.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi <= lo or not _in_private_file_mapping(lo, hi):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # 4 = MADV_DONTNEED


def _in_private_file_mapping(lo: int, hi: int) -> bool:
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                a, b = (int(x, 16) for x in parts[0].split("-"))
                if a <= lo and hi <= b:
                    return parts[1].endswith("p") and len(parts) == 6 and parts[5].startswith("/") \
                        and not parts[5].rstrip().endswith("(deleted)")
    except (OSError, ValueError):
        pass
    return False
