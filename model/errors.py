"""User-facing errors raised by model/ (kept here because model/ imports nothing else of ours)."""


class ModelError(ValueError):
    """A problem the user can fix: missing weights, bad checkpoint, mismatched features. One-line message."""
