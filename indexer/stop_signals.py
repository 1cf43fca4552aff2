"""Stop signals of an ingest (SIGINT, SIGTERM): the handler only notes the signal; the run stops at its own safe points.

A handler that raises runs wherever the main thread happens to be: inside an import, a finalizer or Ray's own
code. There Python may print the exception ("Exception ignored in ...") and carry on, so the run neither stops nor
stays quiet. Here the handler appends the signal number to a list and returns; the ingest calls ``check()``
between its steps (after planning, after Ray starts, at every turn of the pipeline's loop, at its end) and stops
there with KeyboardInterrupt, which the ingest already turns into rolled-back work, a shut-down Ray and one line.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """The stop signals that arrived while ``recording_stop_signals`` is active (``arrived``: in order)."""

    def __init__(self):
        self.arrived: list[int] = []
        self.previous: dict[int, object] = {}  # signal -> the handler before ours (restored at the end)

    def note(self, signum, frame) -> None:
        """The handler itself: record, never raise (see the module docstring)."""
        self.arrived.append(signum)

    def reinstall(self) -> None:
        """Set our handler again at the C level. Ray's core worker installs a native handler for SIGTERM (it prints
        a stack and aborts the process, exit -6, seen in bench/signals.py) that ``signal.getsignal`` cannot see:
        Python still reports its own handler."""
        for signum in self.previous:
            signal.signal(signum, self.note)

    def check(self) -> None:
        """A safe point: stop the run (KeyboardInterrupt) if a stop signal arrived. Puts our handler back where a
        library replaced it, so that a later signal is noted rather than handled by someone else's raising one."""
        for signum in self.previous:
            if signal.getsignal(signum) is not self.note:
                signal.signal(signum, self.note)
        if self.arrived:
            raise KeyboardInterrupt


@contextlib.contextmanager
def recording_stop_signals() -> Iterator[StopSignals]:
    """Note SIGINT and SIGTERM for the duration of the block (yields their StopSignals), except one the process
    ignores. Handlers can only be set in
    the main thread; elsewhere (an ingest run from a worker thread) the record stays empty and the process keeps
    its handlers."""
    record = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield record
        return
    for signum in STOP_SIGNALS:
        # a signal ignored from the start stays ignored: `nohup vmr index ... &` must survive the shell's Ctrl-C
        if signal.getsignal(signum) is not signal.SIG_IGN:
            record.previous[signum] = signal.signal(signum, record.note)
    try:
        yield record
    finally:
        for signum, handler in record.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def ray_keeps_our_handlers(ray, stops: StopSignals) -> Iterator[None]:
    """While ``ray.init`` runs, Ray sets SIGTERM handlers of its own (one calls sys.exit; on a new local cluster
    another kills Ray's processes, then exits): either would raise into whatever code runs when the signal
    lands. Ray sets both through ``ray._private.utils.set_sigterm_handler``; inside this block that function
    leaves the handler as it is, so a SIGTERM meanwhile is only noted and ``check()`` stops the run after
    ``ray.init`` returns (the caller shuts Ray down). Where a Ray version lacks the function, nothing is replaced.
    On the way out our handlers are set again (``StopSignals.reinstall``: Ray's native one is gone from then on)."""
    utils = getattr(getattr(ray, "_private", None), "utils", None)
    original = getattr(utils, "set_sigterm_handler", None)
    if original is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = original
        stops.reinstall()
