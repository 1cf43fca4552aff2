"""The one exception type the CLI turns into a one-line message (exit 1) instead of a traceback."""


class VmrError(Exception):
    """A problem the user can fix: bad path, corrupt index, mismatched model. The message is one line."""
