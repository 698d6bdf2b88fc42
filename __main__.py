"""The ``digitgen`` command's entry point (also ``python -m digitgen``)."""

import atexit
import os
import signal
import sys
from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import TextIO

# runtime.signals.INTERRUPTING_SIGNALS, which cannot be imported here without loading the runtime, less those the
# command was started ignoring (nohup's SIGHUP, a background job's SIGINT), which stay ignored
STOP_SIGNALS = {
    sig
    for sig in (getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
    if signal.getsignal(sig) is not signal.SIG_IGN
}


def let_go_then_stop(_signum: int, _frame: object) -> None:
    """A stop signal that comes while the command stops, or after it has ended: let go, as it asks for what is
    under way (raised in a clean-up, it could cut that short, and a scheduler's SIGTERM after Ctrl-C must not
    change the exit status), but the next one stops the process at once, as it would by default: a way out of a
    clean-up that hangs."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)


def hold_stop_signals() -> None:
    """Hold Ctrl-C, SIGTERM and SIGHUP until the command's handlers are in place (``digitgen.cli`` lets them
    through then): loading the command (numpy, onnxruntime) takes a moment, and a stop signal in that moment
    then ends it as one during its work does, with the same words, not with a traceback. Outside the command's
    handlers they meet :func:`let_go_then_stop`."""
    if hasattr(signal, "pthread_sigmask"):  # POSIX; the threads started while loading inherit the mask
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        for signum in STOP_SIGNALS:  # caught, not ignored: a held signal stays pending for the command's handler
            signal.signal(signum, let_go_then_stop)
        atexit.register(_ignore_stop_signals)  # first registered: the last exit function to run


def _ignore_stop_signals() -> None:
    """Ignore stop signals once the command and every other exit function have run: Python gives its handlers'
    signals back their default action as it shuts down, and one that came then (a scheduler's SIGTERM after
    Ctrl-C) would end the process with the signal's status in place of the command's."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class _BestEffort:
    """stderr for a command's diagnostics (progress, notes, its error line), which must not stop or fail the work
    they describe where stderr cannot take them (a full disk, a reader that has gone): the first write that fails
    turns the rest off."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._failed = False

    def __getattr__(self, name: str) -> object:  # encoding, errors, fileno, ...: the stream's own
        if name == "buffer":  # not to be written past this wrapper (click would, where the encoding is ASCII)
            raise AttributeError(name)
        return getattr(self._stream, name)

    def write(self, text: str) -> int:
        self._attempt(self._stream.write, text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._attempt(self._stream.flush)

    def isatty(self) -> bool:
        return not self._failed and self._stream.isatty()

    def _attempt(self, action: Callable[..., object], *args: object) -> None:
        if not self._failed:
            try:
                action(*args)
            except OSError:
                self._failed = True


class _ClosedOutput:
    """stdout where the command was started with none (``>&-``): what a command reports there goes nowhere, as to
    ``/dev/null``, and ``closed`` has the commands whose answer is their output (``info``, ``evaluate``) refuse
    before any work, rather than end with nothing written and status 0."""

    encoding, errors, closed = "utf-8", "strict", True

    def write(self, text: str) -> int:
        if not isinstance(text, str):  # a text stream, which click tells from a binary one by writing b""
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _prepare_streams() -> None:
    """stderr best effort; a closed stdout marked so, and text stdout cannot encode (a path with an emoji, on a
    stdout of Windows' cp1252) escaped as stderr's is, not a traceback after the work is done."""
    if sys.stderr is not None:
        sys.stderr = _BestEffort(sys.stderr)
    if sys.stdout is None:
        sys.stdout = _ClosedOutput()
    elif hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def prepare() -> None:
    """What the command sets before it loads (``digitgen``, ``python -m digitgen`` and ``python cli.py`` alike):
    stop signals held, its output streams prepared, and onnxruntime's telemetry off unless the environment turns it
    on (``ORT_DISABLE_TELEMETRY=0``): loading onnxruntime otherwise writes a device id and an event store under
    ``~/.cache/Microsoft`` (and warns in colour where it cannot) for events it may send."""
    hold_stop_signals()
    _prepare_streams()
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # before onnxruntime loads; the server's workers inherit it


def _drop_unwritable_output() -> None:
    """Send what stdout still holds nowhere if it cannot be written (its reader gone, a full disk): Python would try
    again as it exits, fail, and end with status 120 in place of the command's."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        with suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run() -> None:
    """Run the ``digitgen`` command, :func:`prepare` first."""
    prepare()
    from digitgen.cli import main

    try:
        main()
    finally:
        _drop_unwritable_output()


if __name__ == "__main__":
    run()
