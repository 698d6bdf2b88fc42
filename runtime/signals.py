"""Signal handling for long work: Ctrl-C, SIGTERM (job schedulers) and SIGHUP (a closed terminal).

Python runs signal handlers in the main thread only, so off it these helpers change nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

# Job schedulers stop a job with SIGTERM, a closed terminal sends SIGHUP: both stop a command as Ctrl-C does.
TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
INTERRUPTING_SIGNALS = (signal.SIGINT, *TERMINATING_SIGNALS)

Handler = Callable[[int, object], object]


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def handling(signals: Iterable[signal.Signals], handler: Handler) -> Iterator[None]:
    """Run ``handler`` on each of ``signals`` until the block ends, then restore the handlers found."""
    if not _in_main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def release_held_at_start() -> None:
    """Let through the stop signals that the ``digitgen`` command holds while it loads (``digitgen.__main__``);
    one that came meanwhile is delivered now, to the handlers in place."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTING_SIGNALS)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold back Ctrl-C, SIGTERM and SIGHUP until the block ends, then raise them again for the handlers found.

    Held in Python, not with ``pthread_sigmask``: that masks the calling thread only, and the kernel gives a
    process-wide signal to any thread that does not mask it (onnxruntime's, torch's), after which Python runs
    the handler in the main thread all the same."""
    held: list[int] = []
    try:
        with handling(INTERRUPTING_SIGNALS, lambda signum, _frame: held.append(signum)):
            yield
    finally:
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)
