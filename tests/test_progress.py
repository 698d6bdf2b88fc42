"""Progress where stderr is a log, not a terminal: a line a minute, with the rate measured after the first update."""

from __future__ import annotations

import io
import shlex
import subprocess
import sys

import numpy as np
import pytest

from digitgen.runtime.progress import LogProgress, clock_time, progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as stderr in a shell does."""

    def isatty(self) -> bool:
        return True


def log(length: int, describe=None) -> tuple[LogProgress, Clock, io.StringIO]:
    clock, stream = Clock(), io.StringIO()
    return LogProgress(length, "training", stream, describe, 60, clock=clock), clock, stream


def test_a_line_once_a_minute_with_done_percent_elapsed_and_time_left() -> None:
    bar, clock, stream = log(1000)
    clock.now += 10
    bar.update(100)  # the rate is measured from here: 200 steps in the next 50 s, 4 a second
    clock.now += 49
    bar.update(100)
    assert stream.getvalue() == ""
    clock.now += 1
    bar.update(100)
    assert stream.getvalue() == "training: 300/1,000 (30%), 1:00 elapsed, about 2:55 left\n"
    clock.now += 59
    bar.update(100)
    assert stream.getvalue().count("\n") == 1
    clock.now += 3600
    bar.update(600, {"loss": 1})
    assert stream.getvalue().splitlines()[-1] == "training: 1,000/1,000 (100%), 1:01:59 elapsed"


def test_work_counted_at_once_does_not_shorten_the_estimate() -> None:
    bar, clock, stream = log(1000)
    bar.update(500)  # a resumed run's steps, counted before any work
    clock.now += 60
    bar.update(100)
    assert stream.getvalue() == "training: 600/1,000 (60%), 1:00 elapsed, about 4:00 left\n"


def test_the_item_is_described_after_the_line() -> None:
    bar, clock, stream = log(10, describe=lambda info: f"epoch {info['epoch']}" if info else "")
    clock.now += 60
    bar.update(1, {"epoch": 3})
    clock.now += 60
    bar.update(1)
    assert [line.split("  ")[-1] for line in stream.getvalue().splitlines()] == [
        "epoch 3",
        "training: 2/10 (20%), 2:00 elapsed, about 8:00 left",
    ]


def test_a_log_gets_the_label_first_a_terminal_a_bar_and_hidden_nothing() -> None:
    stream = io.StringIO()
    with progress(5, "generating", stream=stream) as bar:
        assert isinstance(bar, LogProgress)
    assert stream.getvalue() == "generating: 5 to do\n"

    terminal = Terminal()
    with progress(5, "generating", stream=terminal) as bar:
        bar.update(5)
    assert "generating" in terminal.getvalue() and "5/5" in terminal.getvalue()
    hidden = Terminal()
    with progress(5, "generating", stream=hidden, hidden=True) as bar:
        bar.update(5)
    assert hidden.getvalue() == ""


def test_a_resumed_run_says_what_is_left_and_counts_on_from_its_steps() -> None:
    stream = io.StringIO()
    with progress(16, "training", stream=stream, done=14) as bar:
        assert isinstance(bar, LogProgress) and bar.done == 14
    assert stream.getvalue() == "training: 2 to do (14 of 16 done before)\n"
    clock, stream = Clock(), io.StringIO()
    bar = LogProgress(1000, "training", stream, None, 60, clock=clock, done=500)
    clock.now += 60
    bar.update(100)
    assert stream.getvalue() == "training: 600/1,000 (60%), 1:00 elapsed\n"


def test_a_first_update_after_a_minute_gives_no_estimate_yet() -> None:
    bar, clock, stream = log(1000)
    clock.now += 61
    bar.update(1)
    assert stream.getvalue() == "training: 1/1,000 (0%), 1:01 elapsed\n"


def test_a_single_step_of_work_is_all_of_it() -> None:
    bar, clock, stream = log(1)
    clock.now += 60
    bar.update(1)
    assert stream.getvalue() == "training: 1/1 (100%), 1:00 elapsed\n"


def test_no_stderr_at_all_means_no_progress_and_the_same_work(monkeypatch) -> None:
    """A process started with stderr closed (``2>&-``, some service managers) has ``sys.stderr`` None."""
    monkeypatch.setattr(sys, "stderr", None)
    with progress(5, "generating") as bar:
        bar.update(5)
    assert (bar.hidden, bar.pos) == (True, 5)


def test_generate_with_stderr_closed_writes_its_files(tmp_path) -> None:
    out = tmp_path / "digits"
    command = (
        f"{shlex.quote(sys.executable)} -m digitgen generate -n 300 --batch-size 100 --format npz --out {out} 2>&-"
    )
    assert subprocess.run(["bash", "-c", command], check=False).returncode == 0
    assert np.load(out / "digits.npz")["images"].shape == (300, 28, 28)


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(59, "0:59"), (3600, "1:00:00"), (47 * 3600 + 59 * 60 + 59, "47:59:59"), (48 * 3600, "2 days"),
     (10**9, "11,574 days"), (6.5e19, "more than a century")],
)  # fmt: skip
def test_time_left_reads_as_a_clock_then_in_days(seconds: float, shown: str) -> None:
    assert clock_time(seconds) == shown


WORDS = "epoch 1  loss_d 2.037  loss_g 1.760  D(real) 0.52  D(fake) 0.48"


def _bar_lines(monkeypatch: pytest.MonkeyPatch, columns: int, describe=lambda item: WORDS if item else "") -> list[str]:
    """The lines a training bar draws on a terminal ``columns`` wide for three steps, each redraw one."""
    monkeypatch.setenv("COLUMNS", str(columns))
    terminal = Terminal()
    with progress(18_720, "training", stream=terminal, describe=describe) as bar:
        for _ in range(3):
            bar.update(1, True)
    shown = terminal.getvalue().replace("\x1b[?25l", "").replace("\x1b[?25h", "").rstrip("\n")
    return [line for line in shown.split("\r") if line.strip()]  # less the blank one that clears a wider line


@pytest.mark.parametrize("columns", [40, 80, 200])
def test_a_bar_and_its_words_fit_the_terminal(monkeypatch: pytest.MonkeyPatch, columns: int) -> None:
    """A wider line wraps, and each redraw (back to the start of its last row only) began a new one: an 80-column
    terminal got a line a training step."""
    lines = _bar_lines(monkeypatch, columns)
    assert len(lines) == 4 and all(len(line) <= columns and "[" in line for line in lines), lines
    assert any(WORDS in line for line in lines) == (columns == 200)  # whole where it fits, cut where it does not


@pytest.mark.parametrize(
    ("columns", "line"),
    [
        (80, "training  [" + "-" * 25 + "]  3/18720  epoch 1  loss_d 2.037  loss_g..."),
        (111, "training  [" + "-" * 25 + "]  3/18720  " + WORDS),  # the words just fit: whole
        (200, "training  [" + "-" * 114 + "]  3/18720  " + WORDS),
    ],
)
def test_the_words_are_cut_to_leave_the_bar_its_width(monkeypatch: pytest.MonkeyPatch, columns: int, line: str) -> None:
    """Click's own width would fit too: the bar keeps its share, and the words are cut at a word's end."""
    assert _bar_lines(monkeypatch, columns)[-1] == line


def test_no_words_show_the_bar_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _bar_lines(monkeypatch, 80, describe=lambda item: None)[-1] == "training  [" + "-" * 59 + "]  3/18720"
