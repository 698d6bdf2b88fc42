"""The CLI's small helpers and what it reads for them: the `--quality` file, training's progress text, signals as
Ctrl-C."""

from __future__ import annotations

import shlex
import signal
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import digitgen.cli as cli
from digitgen.cli import FiniteFloat, Integer, _format_progress, _StopOnce, install_command, main
from digitgen.export.quality import QualityFileError, read_evaluation
from digitgen.runtime.idx import DEFAULT_MNIST_ROOT
from digitgen.runtime.text import read_integer, read_number
from digitgen.training.run import resume_with
from tests.conftest import REPO
from tests.helpers import PIP


def named(tmp_path: Path, text: str) -> str:
    (tmp_path / "quality.json").write_text(text)
    return str(tmp_path / "quality.json")


def test_quality_file_is_read_from_its_last_line(tmp_path: Path) -> None:
    """`evaluate --json` may print progress first; the JSON object is the last line."""
    text = 'evaluating 100 digits\n{"generated": {"fid": 1.5}, "real": {"fid": 1.0}}\n\n'
    assert read_evaluation(named(tmp_path, text)) == {"generated": {"fid": 1.5}, "real": {"fid": 1.0}}


def test_a_pretty_printed_quality_file_is_read_whole(tmp_path: Path) -> None:
    text = '{\n  "generated": {"fid": 1.5},\n  "real": {"fid": 1.0}\n}\n'
    assert read_evaluation(named(tmp_path, text)) == {"generated": {"fid": 1.5}, "real": {"fid": 1.0}}


@pytest.mark.parametrize("text", ["", "  \n", "done\n", '{"generated": 1}\nnot json', "null\n", "done\nnull"], ids=repr)
def test_quality_file_without_json_is_refused_and_the_cli_names_the_option(tmp_path: Path, text: str) -> None:
    path = named(tmp_path, text)
    with pytest.raises(QualityFileError, match=r"quality\.json holds no JSON object"):
        read_evaluation(path)
    result = CliRunner().invoke(main, ["export", "--checkpoint", path, "--quality", path])
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: Invalid value for '--quality': {path} holds no JSON object")


@pytest.mark.parametrize(
    ("data_dir", "device", "processes", "hint"),
    [
        (DEFAULT_MNIST_ROOT, "auto", 1, "--resume 'my run/checkpoint.pt'"),
        ("/data", "cpu", 1, "--resume 'my run/checkpoint.pt' --data-dir /data --device cpu"),
        (
            DEFAULT_MNIST_ROOT,
            "cuda",
            4,
            "--resume 'my run/checkpoint.pt' --device cuda, launched by torchrun with 4 processes as this run was",
        ),
    ],
)
def test_a_stopped_trains_hint_names_what_a_resume_does_not_keep(
    data_dir: str, device: str, processes: int, hint: str
) -> None:
    assert resume_with("my run/checkpoint.pt", data_dir, device, processes) == hint


def test_training_progress_names_epoch_losses_and_scores() -> None:
    assert _format_progress(None) == _format_progress({}) == ""
    info = {"epoch": 3.0, "loss_d": 1.23456, "loss_g": -0.5, "d_real": 0.123, "d_fake": -0.3456}
    assert _format_progress(info) == "epoch 3  loss_d 1.235  loss_g -0.500  D(real) 0.12  D(fake) -0.35"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_raises_keyboard_interrupt_named_after_it_once(
    signum: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    let_go: list[int] = []
    monkeypatch.setattr(cli, "let_go_then_stop", lambda signum, _frame: let_go.append(signum))
    stop = _StopOnce()
    with pytest.raises(KeyboardInterrupt, match=signal.Signals(signum).name):
        stop(signum, None)
    stop(signum, None)  # while it stops: let go, no second KeyboardInterrupt
    assert let_go == [signum]


@pytest.mark.parametrize(
    ("command", "help_text"),
    [
        ("generate", "ONNX generator (default: the shipped model)."),
        ("info", "ONNX generator, the same as MODEL (default: the shipped model)."),
        ("verify", "ONNX model to check (or give it as the argument)."),
        ("evaluate", "ONNX generator (default: the shipped model)."),
    ],
)
def test_every_command_that_reads_a_generator_spells_it_generator(tmp_path: Path, command: str, help_text: str) -> None:
    from click.testing import CliRunner

    from digitgen.cli import main

    shown = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
    assert shown.exit_code == 0
    assert " ".join(shown.output.split()).count(f"--generator FILE {help_text}") == 1
    required = ["--checkpoint", "c.pt"] if command == "verify" else []
    refused = CliRunner().invoke(main, [command, "--generator", str(tmp_path), *required])
    assert refused.exit_code == 2 and f"'{tmp_path}' is a directory" in refused.output


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (["generate", "-n", "0"], "number of digits must be an integer >= 1, got 0"),
        (["generate", "--generator", "missing.onnx"], "missing.onnx"),
        (["info", "--generator", "a", "b"], "given twice"),
        (["export", "--checkpoint", "c.pt", "--quality", "missing.json"], "missing.json"),
    ],
    ids=["usage", "library", "two-models", "unreadable-file"],
)
def test_errors_go_to_stderr_as_one_line(args: list[str], culprit: str) -> None:
    from click.testing import CliRunner

    from digitgen.cli import main

    result = CliRunner().invoke(main, args)
    assert result.exit_code in (1, 2)
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("Error: ") and culprit in result.stderr


def test_the_group_takes_its_arguments_positionally_too() -> None:
    """`main(["--help"])`, as an app embedding the CLI may call it, parses that list, not sys.argv."""
    from digitgen.cli import main

    with pytest.raises(SystemExit) as exited:
        main.main(["--help"])
    assert exited.value.code == 0


def _group_raising(exc: BaseException) -> click.Group:
    """A one-command group of the CLI's kind whose command raises ``exc``."""
    from digitgen.cli import OneLineErrors

    group = OneLineErrors()

    @group.command()
    def fail() -> None:
        raise exc

    return group


@pytest.mark.parametrize(
    ("exc", "code", "line"),
    [
        (
            click.ClickException("the ranks ended with different weights"),
            1,
            "Error: the ranks ended with different weights",
        ),
        (click.Abort(), 130, "Error: interrupted; no file was left half-written"),
        (
            ModuleNotFoundError("no torch", name="torch"),
            1,
            f"Error: this needs the train extra (torch is not installed): {PIP} '{REPO}[train]'",
        ),
        (
            ModuleNotFoundError("no fastapi", name="fastapi"),
            1,
            f"Error: this needs the serve extra (fastapi is not installed): {PIP} '{REPO}[serve]'",
        ),
    ],
    ids=["click-exception", "abort", "missing-train-extra", "missing-serve-extra"],
)
def test_other_errors_are_one_line_on_stderr_with_their_status(exc: BaseException, code: int, line: str) -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(_group_raising(exc), ["fail"])
    assert result.exit_code == code
    assert result.stdout == "" and result.stderr == line + "\n"


@pytest.mark.parametrize("terminal", [False, True])
def test_a_stop_signal_is_one_line_and_ends_a_terminals_echoed_line_first(monkeypatch, terminal: bool) -> None:
    """Click writes a blank line to stderr on a KeyboardInterrupt (for the ^C a terminal echoes), then the error
    came: two lines in a log of a SIGTERM. Now the line is ended only on a terminal."""
    group = _group_raising(KeyboardInterrupt("SIGTERM"))
    monkeypatch.setattr(click.testing._NamedTextIOWrapper, "isatty", lambda self: terminal, raising=False)
    result = CliRunner().invoke(group, ["fail"])
    assert result.exit_code == 130
    assert result.stderr == "\n" * terminal + "Error: interrupted; no file was left half-written\n"


class Installed:
    """A distribution's record as importlib.metadata gives it: only ``direct_url.json`` is read."""

    def __init__(self, direct_url: str | None) -> None:
        self.direct_url = direct_url

    def read_text(self, name: str) -> str | None:
        return self.direct_url if name == "direct_url.json" else None


@pytest.mark.parametrize(
    ("records", "target"),
    [
        ([], "digitgen-mnist"),  # not installed at all (a checkout on PYTHONPATH)
        ([Installed(None)], "digitgen-mnist"),  # from an index: no direct_url.json
        ([Installed(None), Installed('{"url": "file:///src/my%20copy", "dir_info": {}}')], "/src/my copy"),
        (
            [Installed('{"url": "file:///dl/digitgen_mnist-0.1.0.tar.gz", "archive_info": {}}')],
            "/dl/digitgen_mnist-0.1.0.tar.gz",
        ),
        ([Installed('{"url": "https://example.org/digitgen.git", "vcs_info": {"vcs": "git"}}')], "digitgen-mnist"),
        ([Installed("not json")], "digitgen-mnist"),
        ([Installed("[1]")], "digitgen-mnist"),
        ([Installed('{"url": 5}')], "digitgen-mnist"),
    ],
    ids=["absent", "index", "folder-after-egg-info", "archive", "vcs", "broken", "not-an-object", "url-not-text"],
)
def test_the_install_hint_names_where_digitgen_came_from(monkeypatch, records: list[Installed], target: str) -> None:
    monkeypatch.setattr(cli.importlib.metadata, "distributions", lambda name: iter(records))
    assert install_command("train") == f"{PIP} {shlex.quote(target + '[train]')}"


@pytest.mark.parametrize(("body", "code"), [(lambda: click.get_current_context().exit(3), 3), (lambda: "done", 0)])
def test_a_command_exits_with_its_context_exit_code_and_its_return_value_is_ignored(body, code: int) -> None:
    """As in Click's standalone mode: ``ctx.exit(N)`` sets the status; a returned value does not."""
    from click.testing import CliRunner

    from digitgen.cli import OneLineErrors

    group = OneLineErrors()

    @group.command()
    def run() -> object:
        return body()

    result = CliRunner().invoke(group, ["run"])
    assert (result.exit_code, result.output) == (code, "")


def test_a_missing_module_outside_the_extras_is_not_disguised() -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(_group_raising(ModuleNotFoundError("no yaml", name="yaml")), ["fail"])
    assert isinstance(result.exception, ModuleNotFoundError) and result.exception.name == "yaml"


def _defaults(command: str) -> dict[str, object]:
    return {param.name: param.default for param in main.commands[command].params}


def test_the_servers_option_defaults_are_the_apps() -> None:
    """The command's defaults are the app's (read from ServeSettings, which loads without the serve extra)."""
    from digitgen.serve import ServeSettings

    shown, settings = _defaults("serve"), ServeSettings()
    for name in ("max_count", "max_in_flight", "queue", "time_limit", "batch_window_ms"):
        assert shown[name] == getattr(settings, name), name
    # not given, --batch-max-digits is None (so that --batch-window-ms 0 can refuse it) and the app's default applies
    batch_max_digits = next(param for param in main.commands["serve"].params if param.name == "batch_max_digits")
    assert shown["batch_max_digits"] is None and f"[default: {settings.micro_batch_digits}]" in batch_max_digits.help


def test_the_exporters_option_defaults_are_the_exporters() -> None:
    """Likewise: the lowest opset the exporter writes, and fp32."""
    from digitgen.export.onnx_export import DEFAULT_OPSET
    from digitgen.export.tolerances import PRECISIONS

    shown = _defaults("export")
    assert (shown["opset"], shown["precision"]) == (DEFAULT_OPSET, PRECISIONS[0])


@pytest.mark.parametrize(
    "args",
    [
        ["export", "--checkpoint", "c.pt", "--out", "{folder}/"],
        ["export", "--checkpoint", "c.pt", "--weights-out", "{folder}/"],
        ["export-classifier", "--weights", "w.pt", "--out", "{folder}/"],
        ["train-classifier", "--out", "{folder}/"],
    ],
    ids=["export", "weights-out", "export-classifier", "train-classifier"],
)
def test_a_file_option_ending_in_a_slash_is_refused(tmp_path: Path, args: list[str]) -> None:
    """``--out models/`` means a folder: the file is not written under the folder's name."""
    from click.testing import CliRunner

    from digitgen.cli import main

    folder = tmp_path / "models"
    result = CliRunner().invoke(main, [arg.format(folder=folder) for arg in args])
    assert result.exit_code == 2, result.output
    assert f"'{folder}/' ends in a slash, so it names a folder; give a file's name" in result.output
    assert list(tmp_path.iterdir()) == []


PYTHON_SPACE = "".join(chr(code) for code in range(0x3001) if chr(code).isspace())  # what \s matches, to U+3000


@pytest.mark.parametrize("space", PYTHON_SPACE, ids=lambda space: f"U+{ord(space):04X}")
def test_a_number_in_any_space_the_patterns_take_is_read_not_a_crash(space: str) -> None:
    """int() and float() strip less than \\s takes (not U+001C-U+001F): such a value was a ValueError in the server
    (a 500) and Python's own words in the CLI; now it reads as the page reads it."""
    assert read_number(f"{space}1.5{space}") == 1.5 and read_integer(f"{space}05{space}") == 5
    assert Integer(min=1).convert(f"{space}5", None, None) == 5
    assert FiniteFloat(min=0).convert(f"2.5{space}", None, None) == 2.5
