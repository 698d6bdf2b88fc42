"""The `digitgen` command's entry point: a light package import, and stop signals while the command loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import digitgen.__main__
from digitgen import cli
from digitgen.runtime.signals import INTERRUPTING_SIGNALS, handling
from tests.conftest import REPO
from tests.helpers import default_sigint

# Runs the command's entry point with a stop signal sent to itself the moment the CLI starts loading,
# i.e. during the slow imports (numpy, onnxruntime) before any handler of the command's is in place.
SIGNAL_WHILE_LOADING = """
import builtins, os, sys
import digitgen.__main__

real_import = builtins.__import__

def import_and_signal(name, *args, **kwargs):
    if name == "digitgen.cli":
        os.kill(os.getpid(), {signum})
    return real_import(name, *args, **kwargs)

builtins.__import__ = import_and_signal
sys.argv = ["digitgen", "generate", "-n", "3", "--out", "digits"]
digitgen.__main__.run()
"""


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={"PYTHONPATH": str(REPO.parent), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=default_sigint,
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_while_the_command_loads_ends_it_in_one_line(tmp_path: Path, signum: signal.Signals) -> None:
    """Not a traceback (Ctrl-C) or a silent kill (SIGTERM, SIGHUP): the words and status of an interrupt."""
    result = _python(SIGNAL_WHILE_LOADING.format(signum=int(signum)), tmp_path)
    assert (result.returncode, result.stderr, result.stdout) == (
        130,
        "Error: interrupted; no file was left half-written\n",
        "",
    )
    assert list(tmp_path.iterdir()) == []


def test_importing_the_package_loads_no_runtime(tmp_path: Path) -> None:
    """What lets the entry point hold signals before the slow imports; the API's names still load on use."""
    code = (
        "import sys, digitgen\n"
        "print(sorted(m for m in ('numpy', 'onnxruntime', 'digitgen.runtime') if m in sys.modules))\n"
        "from digitgen import DigitGenerator, NOISE_SCHEME\n"
        "print(DigitGenerator.__module__, NOISE_SCHEME)\n"
    )
    result = _python(code, tmp_path)
    assert result.stdout.splitlines() == ["[]", "digitgen.runtime.generator splitmix64-boxmuller-v1"], result.stderr


def test_an_unknown_name_of_the_package_is_an_attribute_error() -> None:
    import digitgen

    with pytest.raises(AttributeError, match="module 'digitgen' has no attribute 'Generator'"):
        digitgen.Generator  # noqa: B018
    assert set(digitgen.__all__) <= set(dir(digitgen))


def test_the_installed_command_is_the_entry_point() -> None:
    (command,) = entry_points(group="console_scripts", name="digitgen")
    assert command.load() is digitgen.__main__.run


def test_the_entry_point_holds_the_signals_the_command_handles() -> None:
    assert set(INTERRUPTING_SIGNALS) == digitgen.__main__.STOP_SIGNALS


# A first stop signal at the first model call, and a second one in the clean-up after it (as a file is removed)
# or once the command has stopped (as the process exits): the command still ends as one interrupt, status 130.
SECOND_SIGNAL = """
import atexit, os, pathlib, signal, sys
from digitgen.runtime.generator import DigitGenerator

real_run, real_unlink = DigitGenerator.run, pathlib.Path.unlink
stopping = []

def run(self, *args):
    stopping.append(True)
    os.kill(os.getpid(), signal.SIGINT)
    return real_run(self, *args)

def unlink(self, *args, **kwargs):
    if "{when}" == "clean-up" and stopping:
        os.kill(os.getpid(), {signum})
    return real_unlink(self, *args, **kwargs)

DigitGenerator.run, pathlib.Path.unlink = run, unlink
if "{when}" == "stopped":
    atexit.register(os.kill, os.getpid(), {signum})
sys.argv = ["digitgen", "generate", "-n", "40", "--batch-size", "8", "--format", "npz", "--out", "digits"]
import digitgen.__main__
digitgen.__main__.run()
"""


@pytest.mark.parametrize("when", ["clean-up", "stopped"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_second_stop_signal_does_not_change_how_the_command_ends(
    tmp_path: Path, signum: signal.Signals, when: str
) -> None:
    result = _python(SECOND_SIGNAL.format(signum=int(signum), when=when), tmp_path)
    assert result.returncode == 130, result.stderr
    assert result.stderr.splitlines()[-1].startswith("Error: interrupted"), result.stderr  # said once, last
    assert list(tmp_path.iterdir()) == []


# The command says when it makes its first digits, then waits for a stop signal there.
SAYS_WHEN_GENERATING = """
import sys, time
from digitgen.runtime.generator import DigitGenerator

real_run = DigitGenerator.run

def run(self, *args):
    print("generating", flush=True)
    time.sleep(30)
    return real_run(self, *args)

DigitGenerator.run = run
sys.argv = ["digitgen", "generate", "-n", "40", "--batch-size", "8", "--format", "npz", "--out", "digits"]
import digitgen.__main__
digitgen.__main__.run()
"""


def test_a_second_sigterm_as_python_shuts_down_leaves_the_status_130(tmp_path: Path) -> None:
    """Python gives its handlers' signals back their default action as it shuts down: a scheduler's SIGTERM a few
    ms after the first ended the process with status 143 once the command had said it was interrupted. The gap
    that hit it depends on the machine, so several are tried."""
    for gap in (0.005, 0.015, 0.03, 0.045, 0.07, 0.1):
        command = subprocess.Popen(
            [sys.executable, "-c", SAYS_WHEN_GENERATING],
            cwd=tmp_path,
            env={"PYTHONPATH": str(REPO.parent), "PATH": "/usr/bin:/bin"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert command.stdout.readline() == "generating\n"
        command.send_signal(signal.SIGTERM)
        time.sleep(gap)
        command.send_signal(signal.SIGTERM)
        _, stderr = command.communicate(timeout=60)
        assert command.returncode == 130, f"{gap} s apart: {command.returncode} {stderr}"
        assert stderr.splitlines()[-1].startswith("Error: interrupted"), stderr


# Two stop signals once the command has ended, as the process exits and something there hangs (an exit function
# registered during the command, as a library does): the first is let go, the second ends the process at once, as
# by default.
HANGING_EXIT = """
import atexit, os, sys, time
import digitgen.__main__
from digitgen.runtime.generator import DigitGenerator

real_run = DigitGenerator.run

def hang():
    os.kill(os.getpid(), {signum})
    time.sleep(0.1)
    os.kill(os.getpid(), {signum})
    time.sleep(60)

def run(self, *args):
    atexit.register(hang)
    return real_run(self, *args)

DigitGenerator.run = run
sys.argv = ["digitgen", "generate", "-n", "3", "--out", "digits"]
digitgen.__main__.run()
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_second_stop_signal_ends_a_process_that_hangs_after_its_command(
    tmp_path: Path, signum: signal.Signals
) -> None:
    started = time.monotonic()
    result = _python(HANGING_EXIT.format(signum=int(signum)), tmp_path)
    assert result.returncode == -signum, result.stderr
    assert time.monotonic() - started < 30
    assert len(list((tmp_path / "digits").iterdir())) == 3  # the command itself had finished


def test_a_signal_after_trainings_own_stop_is_not_a_new_stop() -> None:
    """Training takes the first signal itself (to save its state and say how to resume); one that comes after
    must not start a second stop with other words."""
    with handling(INTERRUPTING_SIGNALS, cli._STOP):
        cli._STOP.stopping = False
        with cli._stop_on_signals() as should_stop:
            signal.raise_signal(signal.SIGTERM)
            assert should_stop()
        signal.raise_signal(signal.SIGTERM)  # let go: no KeyboardInterrupt
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the next one would end the process


# The same from a checkout: `python cli.py` (runpy runs it as the script), the signal sent as it imports click.
SIGNAL_WHILE_CLI_PY_LOADS = """
import builtins, os, runpy, sys

real_import = builtins.__import__

def import_and_signal(name, *args, **kwargs):
    if name == "click":
        builtins.__import__ = real_import
        os.kill(os.getpid(), {signum})
    return real_import(name, *args, **kwargs)

builtins.__import__ = import_and_signal
sys.argv = ["cli.py", "generate", "-n", "3", "--out", "digits"]
runpy.run_path({cli!r}, run_name="__main__")
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_stop_signal_while_cli_py_loads_ends_it_in_one_line(tmp_path: Path, signum: signal.Signals) -> None:
    result = _python(SIGNAL_WHILE_CLI_PY_LOADS.format(signum=int(signum), cli=str(REPO / "cli.py")), tmp_path)
    assert (result.returncode, result.stderr, result.stdout) == (
        130,
        "Error: interrupted; no file was left half-written\n",
        "",
    )
    assert list(tmp_path.iterdir()) == []


def test_the_checkout_s_cli_in_a_python_without_digitgen_says_so_in_one_line(tmp_path: Path) -> None:
    """``-S``: no site-packages, so no installed digitgen, as in a Python the README's commands did not set up."""
    run = subprocess.run(
        [sys.executable, "-S", str(REPO / "cli.py"), "info"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == (
        "Error: cli.py runs the installed digitgen package, and this Python lacks digitgen: install it "
        "(README command 1 or 2), then run digitgen or .venv-dev/bin/python cli.py\n"
    )


@pytest.mark.parametrize("command", [["-m", "digitgen"], [str(REPO / "cli.py")]], ids=["digitgen", "cli.py"])
def test_the_command_keeps_onnxruntime_from_writing_telemetry_files(tmp_path: Path, command: list[str]) -> None:
    """Unless the environment turns telemetry on, as the second run here does."""
    env = {key: value for key, value in os.environ.items() if key not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    store = Path(".cache", "Microsoft")
    for home, turned_on in ((tmp_path / "default", {}), (tmp_path / "on", {"ORT_DISABLE_TELEMETRY": "0"})):
        home.mkdir()
        info = [sys.executable, *command, "info"]
        done = subprocess.run(info, env={**env, "HOME": str(home), **turned_on}, capture_output=True, timeout=60)
        assert done.returncode == 0 and done.stderr == b"", done.stderr
    if not (tmp_path / "on" / store).exists():
        pytest.skip("this onnxruntime writes no telemetry files even when told to")
    assert not (tmp_path / "default" / store).exists()


def _digitgen(cwd: Path, *args: str, env: dict | None = None, **streams: object) -> subprocess.CompletedProcess:
    """The command in a process of its own, its streams as given (``stdout=subprocess.DEVNULL``, say)."""
    environment = {"PYTHONPATH": str(REPO.parent), "PATH": "/usr/bin:/bin", **(env or {})}
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **streams}
    return subprocess.run(
        [sys.executable, "-m", "digitgen", *args], cwd=cwd, env=environment, text=True, timeout=120, **streams
    )


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_a_stderr_that_cannot_be_written_costs_the_diagnostics_not_the_work(tmp_path: Path) -> None:
    """Progress, notes and the error line are best effort: the digits are made and the status is the work's."""
    with open("/dev/full", "w") as full:
        made = _digitgen(tmp_path, "generate", "-n", "300", "--out", "digits", stderr=full)
        refused = _digitgen(tmp_path, "info", "--generator", "missing.onnx", stderr=full)
    assert made.returncode == 0 and len(list((tmp_path / "digits").iterdir())) == 300
    assert made.stdout.startswith("wrote 300 digits as png to digits in ")
    assert refused.returncode == 1


@pytest.mark.parametrize(
    ("args", "answer"),
    [
        ("info", "Error: standard output is closed, and info writes its answer there\n"),  # before any work
        ("evaluate --num-samples 100 --data-dir nowhere", "Error: standard output is closed, and evaluate writes"),
        ("generate -n 3 --out digits", ""),  # its report goes nowhere, its digits are made
    ],
)
def test_a_closed_stdout_refuses_the_commands_whose_answer_it_is(tmp_path: Path, args: str, answer: str) -> None:
    """``info >&-`` had ended with nothing written and status 0."""
    closed = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -m digitgen {args} >&-'],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO.parent), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (closed.returncode, closed.stderr[: len(answer)]) == ((1 if answer else 0), answer), closed.stderr
    assert len(list(tmp_path.rglob("*.png"))) == (0 if answer else 3)


def test_the_help_into_a_pipe_already_closed_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    reader, writer = os.pipe()
    os.close(reader)
    try:
        shown = _digitgen(tmp_path, stdout=writer)
    finally:
        os.close(writer)
    assert (shown.returncode, shown.stderr) == (1, "Error: Broken pipe\n")


def test_text_stdout_cannot_encode_is_escaped_after_the_work_not_a_traceback(tmp_path: Path) -> None:
    """A folder named with an emoji, stdout in Latin-1 (as Windows' cp1252 where output is redirected)."""
    made = _digitgen(tmp_path, "generate", "-n", "1", "--out", "d\U0001f600", env={"PYTHONIOENCODING": "latin-1"})
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("wrote 1 digit as png to d\\U0001f600 in ")
    assert len(list((tmp_path / "d\U0001f600").iterdir())) == 1
