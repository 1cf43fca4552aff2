"""User-facing errors raised by model/ (kept here because model/ imports nothing else of ours)."""
from __future__ import annotations

import os
import pickle
import re


class ModelError(ValueError):
    """A problem the user can fix: missing weights, bad checkpoint, mismatched features. One-line message."""


class WeightsNotFound(ModelError):
    """No weights file was given, recorded or cached: a usage problem (the CLI exits 2), nothing was started."""


def weights_file_problem(path, err: BaseException) -> str:
    """Why a weights file (checkpoint, CLIP weights) could not be read, in a few words, for a one-line message.

    torch's own texts run to several lines and, for a file the weights-only unpickler refuses, advise re-running
    with ``weights_only=False`` - i.e. running whatever code the file holds. That advice is never passed on: the
    reason is re-worded from the exception's type and content instead.
    """
    path = os.fspath(path)
    text = " ".join(str(err).split())
    if isinstance(err, FileNotFoundError) or not os.path.exists(path):
        return "the file does not exist"
    if isinstance(err, IsADirectoryError) or os.path.isdir(path):
        return "it is a folder, not a file"
    if isinstance(err, PermissionError):
        return "permission denied"
    if os.path.getsize(path) == 0:
        return "the file is empty (0 bytes)"
    unsafe = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if unsafe:
        return (f"it asks to run Python code ({unsafe.group(1)}), which a weights-only load refuses: not a "
                "plain weights file, do not load it otherwise")
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text:
        return "not a PyTorch weights file (unreadable or unsafe pickle data)"
    if "central directory" in text or "zip archive" in text or isinstance(err, EOFError):
        return "the file is truncated or corrupt"
    if "SafetensorError" in type(err).__name__ or "deserializing header" in text:
        return "not a complete safetensors file (truncated or corrupt)"
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0] if text else ""
    return f"not a readable weights file ({type(err).__name__}{': ' + first[:160] if first else ''})"
