"""Stop signals in-process (runtime.signals) and text from outside on one line (runtime.text)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

import pytest

from digitgen.runtime.session import RUN_OPTIONS
from digitgen.runtime.signals import (
    INTERRUPTING_SIGNALS,
    TERMINATING_SIGNALS,
    _terminate_on_stop_signals,
    handling,
    interrupts_held,
    model_calls_run_through_signals,
    model_calls_stop_on_signals,
    release_held_at_start,
)
from digitgen.runtime.text import MAX_QUOTED, printable, quoted

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")


@pytest.fixture(autouse=True)
def _terminate_flag_down() -> Iterator[None]:
    RUN_OPTIONS.terminate = False
    yield
    RUN_OPTIONS.terminate = False


@pytest.fixture
def received() -> Iterator[list[int]]:
    """The stop signals that reach the handlers found during the test: none of them stops the tests, even where the
    code under test fails to put in or keep its own (installed here without it)."""
    seen: list[int] = []

    def record(signum: int, _frame: object) -> None:
        seen.append(signum)

    found = {sig: signal.signal(sig, record) for sig in INTERRUPTING_SIGNALS}
    yield seen
    for sig, handler in found.items():
        signal.signal(sig, handler)


@pytest.fixture
def wakeup_socket() -> Iterator[int]:
    """A wakeup fd of the caller's, set before the test and put back after it."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    found = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    yield writer.fileno()
    signal.set_wakeup_fd(found)
    reader.close()
    writer.close()


def _off_the_main_thread(work: Callable[[], object]) -> object:
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(work()))
    thread.start()
    thread.join()
    assert outcome, "the work raised in its thread"
    return outcome[0]


def _wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def test_the_stop_signals_are_ctrl_c_sigterm_and_sighup() -> None:
    assert TERMINATING_SIGNALS == (signal.SIGTERM, signal.SIGHUP)
    assert INTERRUPTING_SIGNALS == (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def test_handling_runs_the_handler_in_the_block_then_puts_back_the_handlers_found(received: list[int]) -> None:
    found = {sig: signal.getsignal(sig) for sig in INTERRUPTING_SIGNALS}
    calls: list[int] = []

    def handler(signum: int, frame: object) -> None:
        assert isinstance(frame, FrameType)  # the frame the signal came in, as Python gives a handler
        calls.append(signum)

    with pytest.raises(RuntimeError, match="in the block"), handling(INTERRUPTING_SIGNALS, handler):
        signal.raise_signal(signal.SIGHUP)
        signal.raise_signal(signal.SIGINT)
        raise RuntimeError("in the block")
    assert (calls, received) == ([signal.SIGHUP, signal.SIGINT], [])
    assert {sig: signal.getsignal(sig) for sig in INTERRUPTING_SIGNALS} == found


HELD_UNDER_THE_DEFAULT_ACTION = """
import signal
from digitgen.runtime.signals import interrupts_held
with interrupts_held():
    signal.raise_signal(signal.SIGTERM)
    print("held", flush=True)
print("after the block")
"""


def test_a_signal_held_whose_handler_is_the_default_action_ends_the_process_after_the_block() -> None:
    """A library user's process, SIGTERM left at its default: held through the block, then it ends the process."""
    result = subprocess.run(
        [sys.executable, "-c", HELD_UNDER_THE_DEFAULT_ACTION], capture_output=True, text=True, timeout=120
    )
    assert (result.returncode, result.stdout) == (-signal.SIGTERM, "held\n"), result.stderr


def test_off_the_main_thread_the_helpers_change_nothing(wakeup_socket: int) -> None:
    """Python takes handlers and wakeup fds in the main thread only (off it, ValueError)."""
    found = {sig: signal.getsignal(sig) for sig in INTERRUPTING_SIGNALS}

    def in_each_block() -> list[object]:
        seen = []
        with handling(INTERRUPTING_SIGNALS, lambda signum, _frame: None):
            seen.append({sig: signal.getsignal(sig) for sig in INTERRUPTING_SIGNALS})
        with model_calls_stop_on_signals():
            seen.append("stop")
        with model_calls_run_through_signals():
            seen.append("through")
        return seen

    assert _off_the_main_thread(in_each_block) == [found, "stop", "through"]
    assert signal.set_wakeup_fd(wakeup_socket) == wakeup_socket  # the caller's, left alone


def test_release_held_at_start_delivers_a_stop_signal_that_came_while_held(received: list[int]) -> None:
    found = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTING_SIGNALS)  # as digitgen.__main__ holds them
    try:
        signal.raise_signal(signal.SIGTERM)
        assert received == []  # held
        release_held_at_start()
        assert _wait_until(lambda: received == [signal.SIGTERM])
        assert not set(INTERRUPTING_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, found)


def test_interrupts_held_raises_each_signal_once_after_the_block_for_the_handlers_found(received: list[int]) -> None:
    found = {sig: signal.getsignal(sig) for sig in INTERRUPTING_SIGNALS}
    with pytest.raises(RuntimeError, match="in the block"), interrupts_held():
        for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.raise_signal(signum)
        time.sleep(0.01)
        assert received == []
        raise RuntimeError("in the block")
    assert received == [signal.SIGHUP, signal.SIGINT, signal.SIGTERM]  # in the order they came, each once
    assert {sig: signal.getsignal(sig) for sig in INTERRUPTING_SIGNALS} == found


def test_a_hold_within_a_hold_changes_no_handler_and_its_signals_wait_for_the_outer_block(received: list[int]) -> None:
    """A writer of many small files holds stop signals once for a group of files: the hold of each file inside it
    must cost no handler changes, and must not let a signal through at its end."""
    with interrupts_held():
        holding = {sig: signal.getsignal(sig) for sig in INTERRUPTING_SIGNALS}
        with interrupts_held():
            assert {sig: signal.getsignal(sig) for sig in INTERRUPTING_SIGNALS} == holding
            signal.raise_signal(signal.SIGTERM)
        time.sleep(0.01)
        assert received == []
    assert received == [signal.SIGTERM]


@pytest.mark.parametrize("signum", INTERRUPTING_SIGNALS, ids=lambda s: s.name)
def test_a_stop_signal_in_the_block_sets_the_model_calls_terminate_flag_and_the_end_lowers_it(
    received: list[int], wakeup_socket: int, signum: signal.Signals
) -> None:
    with model_calls_stop_on_signals():
        assert not RUN_OPTIONS.terminate
        signal.raise_signal(signum)
        assert _wait_until(lambda: RUN_OPTIONS.terminate)
    assert not RUN_OPTIONS.terminate and received == [signum]
    assert signal.set_wakeup_fd(wakeup_socket) == wakeup_socket  # the caller's wakeup fd put back


def test_the_watcher_sets_the_terminate_flag_on_stop_signals_only() -> None:
    def watch(signal_bytes: bytes) -> bool:
        RUN_OPTIONS.terminate = False
        reader, writer = socket.socketpair()
        writer.sendall(signal_bytes)
        writer.close()
        _terminate_on_stop_signals(reader)  # returns at the end of the stream
        reader.close()
        return RUN_OPTIONS.terminate

    assert not watch(bytes([signal.SIGUSR1, signal.SIGCHLD, signal.SIGWINCH]))
    assert [watch(bytes([signal.SIGUSR1, signum])) for signum in INTERRUPTING_SIGNALS] == [True] * 3
    many_others = bytes([signal.SIGUSR2]) * 100  # more than one read of the stream
    assert watch(many_others + bytes([signal.SIGTERM]))


def test_model_calls_run_through_signals_in_its_block_only(received: list[int], wakeup_socket: int) -> None:
    with model_calls_stop_on_signals():
        with model_calls_run_through_signals():
            inside = signal.set_wakeup_fd(-1)
            signal.raise_signal(signal.SIGTERM)
        assert inside == -1  # no wakeup fd: a signal reaches no model call
        time.sleep(0.05)
        assert not RUN_OPTIONS.terminate and received == [signal.SIGTERM]
        signal.raise_signal(signal.SIGTERM)  # after the block, model calls stop again
        assert _wait_until(lambda: RUN_OPTIONS.terminate)
    assert signal.set_wakeup_fd(wakeup_socket) == wakeup_socket


def test_printable_escapes_control_characters_and_keeps_the_rest() -> None:
    text = "a\x00b\nc\x1b[2J\x1f \x7e\x7f\x80\x9f\xa0é€\t"
    assert printable(text) == "a\\x00b\\nc\\x1b[2J\\x1f ~\\x7f\\x80\\x9f\xa0é€\\t"
    assert printable("plain text, 100% (ok)") == "plain text, 100% (ok)"
    # a line or paragraph separator, a right-to-left override, a zero-width space, a byte order mark, a lone
    # surrogate (an undecodable byte of a file name); other spaces and letters stay
    assert printable("a\u2028b\u2029c\u202ed\u200be\ufeff\udcff \u3000\u00e9") == (
        "a\\u2028b\\u2029c\\u202ed\\u200be\\ufeff\\udcff \u3000\u00e9"
    )


def test_quoted_keeps_a_value_of_the_limit_whole_and_cuts_one_past_it() -> None:
    """The repr up to MAX_QUOTED characters (quotes included), then the value's own length, as the page's module."""
    whole = "x" * (MAX_QUOTED - 2)  # its repr is MAX_QUOTED characters
    assert quoted(whole) == repr(whole)
    assert quoted(whole + "y") == f"'{whole}y... ({MAX_QUOTED - 1:,} characters)"  # one past: its closing quote cut
    assert quoted(10**2000) == f"{'1' + '0' * (MAX_QUOTED - 1)}... (2,001 characters)"  # not text: its repr's length
