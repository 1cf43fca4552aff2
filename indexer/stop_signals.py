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
        """Set our handler again at the C level. A native library's handler (Ray's core worker has one for SIGTERM
        that prints a stack and may abort the process, exit -6) is invisible to ``signal.getsignal``, which still
        reports ours; setting ours again replaces it."""
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
    """Keeps a stop signal that lands inside ``ray.init`` to being noted, so that ``check()`` stops the run after
    ``ray.init`` returns (the caller shuts Ray down).

    Ray installs SIGTERM handlers of two kinds while ``ray.init`` runs:

    - Python ones (one calls sys.exit; on a new local cluster another kills Ray's processes, then exits), which
      would raise into whatever code runs when the signal lands. Ray sets both through
      ``ray._private.utils.set_sigterm_handler``; inside this block that function leaves the handler as it is.
    - a native one, when the driver's core worker is built: a failure handler (absl's, through Ray's logging.cc)
      that prints a stack on stderr for SIGTERM and may abort the process (exit -6), invisible to
      ``signal.getsignal``. The core worker installs it unless ``ray._private.ray_constants``'s
      ``RAY_DISABLE_FAILURE_SIGNAL_HANDLER`` is true, read when the core worker is built; inside this block it is
      true, so the driver never gets that handler. This is done on the module, not through the environment
      variable of that name: the variable is read only when ``ray`` is first imported, and the GCS, raylet and
      workers that ``ray.init`` starts would inherit it and lose their crash stacks. Blocking the signals
      (``pthread_sigmask``) around ``ray.init`` was the other way: the mask is inherited by every thread and
      process ``ray.init`` starts (Ray's own processes would then ignore the SIGTERM that stops them), and a
      thread started before it (a BLAS or OpenMP pool) still takes the signal, into Ray's handler once installed.

    Where a Ray version lacks either hook, that one is left alone. On the way out the constant and the function
    are restored and our handlers set again at the C level (``StopSignals.reinstall``), in case a native
    handler was installed anyway."""
    private = getattr(ray, "_private", None)
    utils = getattr(private, "utils", None)
    constants = getattr(private, "ray_constants", None)
    original = getattr(utils, "set_sigterm_handler", None)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    had_flag = constants is not None and hasattr(constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER")
    flag = getattr(constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER", None)
    if original is not None:
        utils.set_sigterm_handler = lambda handler: None
    if had_flag:
        constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    try:
        yield
    finally:
        if original is not None:
            utils.set_sigterm_handler = original
        if had_flag:
            constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = flag
        stops.reinstall()
