"""Progress of long work on stderr: click's bar on a terminal; elsewhere (``nohup``, a job scheduler's log,
CI), where a bar shows only its label, the size of the work, then a plain line once a minute."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, Protocol

import click

LOG_INTERVAL_S = 60.0


class Progress(Protocol):
    """What long work reports to: ``update`` after each step, with what it is working on."""

    def update(self, n_steps: int, current_item: Any = None) -> None: ...


def clock_time(seconds: float) -> str:
    """``seconds`` as a clock, ``m:ss`` or ``h:mm:ss``, or in days past 48 hours."""
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours >= 48:  # a clock of thousands of hours reads as noise
        days = hours // 24
        return f"{days:,} days" if days < 36_500 else "more than a century"
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class LogProgress:
    """Progress as a line every ``interval`` seconds: ``label: done/length (percent), elapsed, about ETA
    left  item``. The rate is measured from the first update on, so that work counted at once (a resumed
    run's steps) does not make the estimate optimistic."""

    def __init__(
        self,
        length: int,
        label: str,
        stream: IO[str],
        describe: Callable[[Any], str] | None,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        done: int = 0,
    ) -> None:
        self.length, self.label, self.stream, self.describe = length, label, stream, describe
        self.clock, self.interval = clock, interval
        self.done = done
        self.started = clock()
        self._base: tuple[int, float] | None = None  # (done, time) after the first update
        self._last_line = self.started

    def update(self, n_steps: int, current_item: Any = None) -> None:
        self.done += n_steps
        now = self.clock()
        if self._base is None:
            self._base = (self.done, now)
        if now - self._last_line >= self.interval:
            self._write(now, current_item)

    def _write(self, now: float, item: Any) -> None:
        self._last_line = now
        line = f"{self.label}: {self.done:,}/{self.length:,} ({self.done / self.length:.0%}), "
        line += f"{clock_time(now - self.started)} elapsed"
        base_done, base_time = self._base
        if base_done < self.done < self.length:
            left = (now - base_time) * (self.length - self.done) / (self.done - base_done)
            line += f", about {clock_time(left)} left"
        extra = self.describe(item) if self.describe is not None else ""
        self.stream.write(f"{line}  {extra}\n" if extra else f"{line}\n")
        self.stream.flush()


MIN_BAR = 10  # characters of a bar narrower than which it says little
# the rest of a bar's line besides its label, position and words: two spaces and the brackets around the bar, two
# before the position, an estimate of time left with its two, two before the words
BAR_LINE_CLUTTER = 4 + 2 + 10 + 2


def _fitted(describe: Callable[[Any], str], label: str, length: int) -> Callable[[Any], str]:
    """``describe``, its words cut so that the bar's whole line fits the terminal's width (click then gives the
    bar the rest): a longer line wraps, and each redraw, which goes back to the start of its last row only,
    begins a new one."""

    def fitted(item: Any) -> str:
        words = describe(item) or ""
        fixed = len(label) + len(f"{length}/{length}") + MIN_BAR + BAR_LINE_CLUTTER
        room = shutil.get_terminal_size().columns - 1 - fixed
        if len(words) <= room:
            return words
        return words[: room - 3] + "..." if room > 3 else ""

    return fitted


@contextmanager
def progress(
    length: int,
    label: str,
    *,
    hidden: bool = False,
    describe: Callable[[Any], str] | None = None,
    stream: IO[str] | None = None,
    done: int = 0,
) -> Iterator[Progress]:
    """Report ``length`` steps of work, ``done`` of them before (a resumed run's), on ``stream`` (default
    stderr); ``update(n, item)`` adds ``n`` done, ``describe(item)`` adds a few words. Where the stream is not a
    terminal, a first line names the label and the steps left; ``hidden`` shows nothing."""
    stream = stream or sys.stderr
    hidden = hidden or stream is None  # no stderr at all (closed, or a GUI interpreter): no progress, same work
    if hidden or stream.isatty():
        shown = _fitted(describe, label, length) if describe is not None else None
        with click.progressbar(
            length=length, label=label, file=stream, item_show_func=shown, show_pos=True, hidden=hidden, width=0
        ) as bar:
            bar.update(done)
            yield bar
        return
    before = f" ({done:,} of {length:,} done before)" if done else ""
    stream.write(f"{label}: {length - done:,} to do{before}\n")
    stream.flush()
    # the interval read here, so that a test can shorten it
    yield LogProgress(length, label, stream, describe, LOG_INTERVAL_S, done=done)
