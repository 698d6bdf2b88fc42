"""Signal handling for long work: Ctrl-C, SIGTERM (job schedulers) and SIGHUP (a closed terminal).

Python runs signal handlers in the main thread only, so off it these helpers change nothing.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager

from digitgen.runtime.session import RUN_OPTIONS

# Job schedulers stop a job with SIGTERM, a closed terminal sends SIGHUP: both stop a command as Ctrl-C does.
TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
INTERRUPTING_SIGNALS = (signal.SIGINT, *TERMINATING_SIGNALS)

Handler = Callable[[int, object], object]


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def handling(signals: Iterable[signal.Signals], handler: Handler | signal.Handlers) -> Iterator[None]:
    """Run ``handler`` on each of ``signals`` until the block ends, then restore the handlers found. A signal the
    process ignores stays ignored: ``nohup`` starts a command ignoring SIGHUP, and a shell its background jobs
    ignoring SIGINT, so that closing the terminal or a Ctrl-C meant for the shell does not stop them. A callable
    ``handler`` is held back by :func:`interrupts_held` with no change of handlers."""
    if not _in_main_thread():
        yield
        return
    previous = {sig: old for sig in signals if (old := signal.getsignal(sig)) is not signal.SIG_IGN}
    installed = _Holdable(handler) if callable(handler) and not isinstance(handler, _Holdable) else handler
    try:
        for sig in previous:
            signal.signal(sig, installed)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def release_held_at_start() -> None:
    """Let through the stop signals that the ``digitgen`` command holds while it loads (``digitgen.__main__``);
    one that came meanwhile is delivered now, to the handlers in place."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTING_SIGNALS)


_held: list[int] | None = None  # within interrupts_held(): the stop signals that came, in order


class _Holdable:
    """A stop signal's handler that, within :func:`interrupts_held`, notes the signal instead of running. Set or
    cleared in one step, the note leaves no moment in which a signal could be lost or raise in a held block."""

    def __init__(self, handler: Handler | signal.Handlers) -> None:
        self.handler = handler

    def __call__(self, signum: int, frame: object) -> object:
        held = _held
        if held is not None:
            held.append(signum)
            return None
        if callable(self.handler):
            return self.handler(signum, frame)
        signal.signal(signum, self.handler)  # the default action (SIG_DFL): the process ends
        signal.raise_signal(signum)
        return None


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold back Ctrl-C, SIGTERM and SIGHUP until the block ends, then raise them again for the handlers in place.

    Held in Python, not with ``pthread_sigmask``: that masks the calling thread only, and the kernel gives a
    process-wide signal to any thread that does not mask it (onnxruntime's, torch's), after which Python runs
    the handler in the main thread all the same. The handlers :func:`handling` put in hold without a change; any
    other is wrapped for the block. A block within a held block holds nothing more, at almost no cost."""
    global _held
    if _held is not None or not _in_main_thread():  # held already, or off the main thread, where no handler runs
        yield
        return
    with ExitStack() as wrapped:
        for sig in INTERRUPTING_SIGNALS:
            found = signal.getsignal(sig)
            if found is not None and not isinstance(found, _Holdable):
                wrapped.enter_context(handling([sig], _Holdable(found)))
        held: list[int] = []
        _held = held
        try:
            yield
        finally:
            _held = None
            for signum in dict.fromkeys(held):
                signal.raise_signal(signum)


@contextmanager
def model_calls_stop_on_signals() -> Iterator[None]:
    """Let Ctrl-C, SIGTERM and SIGHUP end a model call under way, which then raises :class:`KeyboardInterrupt`.

    Python runs a signal's handler only between the main thread's bytecodes, so a model call that never
    returns (a model with a loop of 2^62 steps) would otherwise never see one. The signal's byte reaches a socket
    at once (``signal.set_wakeup_fd``), and a thread waiting on it sets onnxruntime's terminate flag."""
    if not _in_main_thread():
        yield
        return
    reader, writer = socket.socketpair()  # a socket, not a pipe: what set_wakeup_fd takes on Windows too
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=_terminate_on_stop_signals, args=(reader,), daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        writer.close()  # the watcher reads the end of the stream and returns
        watcher.join()
        reader.close()
        RUN_OPTIONS.terminate = False


def _terminate_on_stop_signals(reader: socket.socket) -> None:
    while signals := reader.recv(64):
        if any(signum in INTERRUPTING_SIGNALS for signum in signals):
            RUN_OPTIONS.terminate = True


@contextmanager
def model_calls_run_through_signals() -> Iterator[None]:
    """Within :func:`model_calls_stop_on_signals`, let stop signals leave model calls alone (a server finishing
    its requests in flight on SIGTERM)."""
    if not _in_main_thread():
        yield
        return
    ours = signal.set_wakeup_fd(-1)
    try:
        yield
    finally:
        signal.set_wakeup_fd(ours)
