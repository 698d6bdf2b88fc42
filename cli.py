"""digitgen command line: train, export, verify, generate, merge, info, train-classifier, export-classifier,
evaluate, serve.

Heavy imports (torch) happen inside the commands that need them, so ``generate`` and
``info`` run with the runtime dependencies alone.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python cli.py`: prepared as the `digitgen` command is, before it loads
    try:
        from digitgen.__main__ import prepare
    except ModuleNotFoundError as missing:  # a checkout run by a Python without digitgen installed
        raise SystemExit(
            f"Error: cli.py runs the installed digitgen package, and this Python lacks {missing.name}: "
            "install it (README command 1 or 2), then run digitgen or .venv-dev/bin/python cli.py"
        ) from None

    prepare()

import dataclasses
import importlib.metadata
import json
import math
import os
import shlex
import signal
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from click.core import ParameterSource

from digitgen.__main__ import let_go_then_stop
from digitgen.export import tolerances
from digitgen.export.errors import ExportError
from digitgen.runtime.errors import DigitgenError, InvalidRequestError
from digitgen.runtime.evaluate import MAX_SAMPLES, MIN_SAMPLES
from digitgen.runtime.generator import (
    DEFAULT_BATCH_SIZE,
    MAX_BATCH_SIZE,
    DigitGenerator,
    check_count,
    check_seed,
    check_truncation,
    parse_digit_list,
)
from digitgen.runtime.idx import DEFAULT_MNIST_ROOT
from digitgen.runtime.layout import FORMATS
from digitgen.runtime.merge import merge_shards
from digitgen.runtime.noise import MAX_SEED, NOISE_SCHEME
from digitgen.runtime.progress import clock_time, progress
from digitgen.runtime.session import PROVIDER_CHOICES
from digitgen.runtime.shards import Shard
from digitgen.runtime.signals import (
    INTERRUPTING_SIGNALS,
    handling,
    model_calls_run_through_signals,
    model_calls_stop_on_signals,
    release_held_at_start,
)
from digitgen.runtime.text import (
    INTEGER_TEXT,
    counted,
    printable,
    quoted,
    read_integer,
    read_json,
    read_number,
)
from digitgen.runtime.writers import plan_generation
from digitgen.serve.settings import BATCH_MAX_DIGITS, MAX_COUNT_LIMIT, ServerOptions, ServeSettings
from digitgen.training.config import (
    AUGMENTATIONS,
    DEFAULT_RUN_DIR,
    MAX_LR,
    MAX_SIZE,
    MAX_STEPS,
    MIN_G_WIDTH,
    PRECISIONS,
    TRAIN_MAX_SEED,
    GANConfig,
    TrainConfig,
    parse_digit_weights,
    parse_policy,
)
from digitgen.training.errors import TrainingError

if TYPE_CHECKING:
    from digitgen.export.verify import ParityReport

DISTRIBUTION = "digitgen-mnist"  # the name pip knows digitgen by
Parsed = TypeVar("Parsed")
Command = TypeVar("Command", bound=Callable[..., Any])


# The typed errors of every layer (torch-free modules): the one place they become one-line messages.
LIBRARY_ERRORS = (DigitgenError, TrainingError, ExportError)
# What training, export and `evaluate --cas` import beyond the runtime's dependencies.
TRAINING_MODULES = ("torch", "torchvision", "onnx", "onnxscript")
# What `serve` imports beyond the runtime's dependencies.
SERVE_MODULES = ("fastapi", "starlette", "uvicorn", "prometheus_client")


def install_command(extra: str) -> str:
    """The command that adds ``extra`` to the environment running this: from the folder or file digitgen was
    installed from (a checkout: it is not on an index), by name otherwise."""
    # every record of the name on sys.path: a checkout's build metadata (egg-info, no direct_url.json) can come
    # before the installed one when the command runs from the checkout
    records = (found.read_text("direct_url.json") for found in importlib.metadata.distributions(name=DISTRIBUTION))
    try:
        record = next((text for text in records if text), None)
        parsed = read_json(record) if record else None
    except ValueError:  # a record that is not UTF-8 or not JSON
        parsed = None
    url = parsed.get("url") if isinstance(parsed, dict) else None
    source = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    local = source is not None and source.scheme == "file"
    target = urllib.request.url2pathname(source.path) if local else DISTRIBUTION
    return f"{shlex.quote(sys.executable)} -m pip install {shlex.quote(f'{target}[{extra}]')}"


class _StopOnce:
    """The command's stop-signal handler: the first signal raises :class:`KeyboardInterrupt`, as Ctrl-C does;
    one that comes while the command stops (its own handler took the first, or this one did) meets
    :func:`~digitgen.__main__.let_go_then_stop`."""

    def __init__(self) -> None:
        self.stopping = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.stopping:
            let_go_then_stop(signum, frame)
            return
        self.stopping = True
        raise KeyboardInterrupt(signal.Signals(signum).name)


_STOP = _StopOnce()  # one per process: the handlers of training's own stop (_stop_on_signals) set it too


class OptionsOnce(click.Command):
    """A command that refuses an option given twice (``-n 5 --count 7``), which Click would settle silently by
    keeping the last; options that collect several values (``multiple``) may repeat. Counted on Click's own
    parse, so a value that looks like an option (``--out -nine``) is a value."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _values, _rest, order = self.make_parser(ctx).parse_args(args=list(args))
        if not any(getattr(param, "is_eager", False) for param in order):  # --help, --version: answered first
            seen: set[str | None] = set()
            for param in order:
                if isinstance(param, click.Option) and not param.multiple:
                    if param.name in seen:
                        names = " / ".join(param.opts)
                        raise click.UsageError(f"{names} is given twice; give it once", ctx)
                    seen.add(param.name)
        return super().parse_args(ctx, args)


def _say(line: str, err: bool = False) -> None:
    """Say ``line`` as one line, whatever it quotes (a path with a newline or a terminal's escape codes)."""
    click.echo(printable(line), err=err)


def _fail(message: str, exit_code: int = 1) -> NoReturn:
    """Say ``message`` as one line of stderr, whatever it quotes (a path with a newline or a terminal's escape
    codes among them), and exit."""
    _say(f"Error: {message}", err=True)
    sys.exit(exit_code)


def _refuse_without_output(command: str) -> None:
    """Refuse, before any work, a command whose answer is its output where there is none to write it to (started
    with stdout closed, ``>&-``, or in an app without one)."""
    if sys.stdout is None or getattr(sys.stdout, "closed", False):
        raise click.ClickException(f"standard output is closed, and {command} writes its answer there")


class Interrupted(Exception):
    """A command stopped by a stop signal with its work kept; the message says what was kept and how to continue.
    The group says it as an error and exits 130, as for any stop."""


class _Stopped(Exception):
    """A stop signal that ended a command, carried past Click, which would write a blank line to stderr first."""


class OneLineErrors(click.Group):
    """A group whose errors are one line on stderr: no usage block, no traceback; its commands take each option
    once."""

    command_class = OptionsOnce

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _Stopped from exc

    def main(self, *args: Any, **kwargs: Any) -> NoReturn:
        kwargs["standalone_mode"] = False
        _STOP.stopping = False  # called again in one process (an app, a test): a new command
        try:
            with (
                handling(INTERRUPTING_SIGNALS, _STOP),  # SIGTERM and SIGHUP stop a command as Ctrl-C does
                model_calls_stop_on_signals(),  # in a model call too
            ):
                release_held_at_start()
                try:
                    result = super().main(*args, **kwargs)
                except click.exceptions.NoArgsIsHelpError as exc:  # plain `digitgen`: the help, not an error
                    click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())  # a failure: handled below
                    result = 0
        except click.UsageError as exc:
            _fail(f"{exc.format_message()} (see --help)", exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except MemoryError as exc:  # the library's words where it knows the cause, else numpy's
            advice = "" if isinstance(exc, TrainingError) else "; ask for less"  # training's words name the options
            _fail(f"not enough memory{f': {exc}' if str(exc) else ''}{advice}")
        except LIBRARY_ERRORS as exc:
            _fail(str(exc))
        except OSError as exc:  # what the library did not foresee (a folder it cannot list, a full disk)
            _fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
        except ModuleNotFoundError as exc:
            extra = "train" if exc.name in TRAINING_MODULES else "serve" if exc.name in SERVE_MODULES else None
            if extra is None:
                raise
            _fail(f"this needs the {extra} extra ({exc.name} is not installed): {install_command(extra)}")
        except Interrupted as exc:
            _fail(f"interrupted; {exc}", 130)
        except (click.Abort, KeyboardInterrupt, _Stopped):  # KeyboardInterrupt: held while the command loaded
            if sys.stderr.isatty():  # the line a terminal's ^C was echoed on ends first
                click.echo(err=True)
            _fail("interrupted; no file was left half-written", 130)
        sys.exit(result if isinstance(result, int) else 0)


class GivenPath(click.Path):
    """A path that is not the empty string (which would mean the current folder without saying so), nor, where a
    file is wanted, one ending in a slash (a folder, which the file would otherwise be named after)."""

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        try:
            if value == "":
                self.fail("an empty path; name a file or folder (. for the current folder)", param, ctx)
            if not self.dir_okay and isinstance(value, str) and value.endswith(("/", os.sep)):
                self.fail(f"{quoted(value)} ends in a slash, so it names a folder; give a file's name", param, ctx)
            return super().convert(value, param, ctx)
        except click.BadParameter as exc:  # a path from the environment (MNIST_ROOT) is named as the user set it
            if ctx is None or param is None or ctx.get_parameter_source(param.name) is not ParameterSource.ENVIRONMENT:
                raise
            given = f"the environment's {param.envvar} (read as {param.opts[0]})"
            raise click.BadParameter(exc.message, ctx, param_hint=given) from None


class Integer(click.IntRange):
    """An integer in a range, read as the server reads one (no underscores, only the digits 0-9); a value that is
    no integer is called that ("'abc' is not a valid integer"), not Click's "integer range"."""

    name = "integer"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, str):
            if not INTEGER_TEXT.fullmatch(value):
                self.fail(f"{quoted(value)} is not a valid integer.", param, ctx)
            value = value.strip()  # all the space the pattern takes: int() leaves U+001C-U+001F in place
        return super().convert(value, param, ctx)


class FiniteFloat(click.FloatRange):
    """A float in a range, read as the server reads one: never nan or infinity (which Click's FloatRange lets
    through), no underscores, only the digits 0-9."""

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = read_number(value) if isinstance(value, str) else value  # as the server reads its numbers
        if isinstance(number, str):
            self.fail(f"{quoted(value)} is not a finite number", param, ctx)
        number = super().convert(number, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{quoted(value)} is not a finite number", param, ctx)
        return number


def _parsed_by(parse: Callable[[str], Parsed]) -> Callable[[click.Context, click.Parameter, str | None], Parsed | None]:
    """A Click callback that reads an option's text with ``parse``, whose ValueError (the runtime's
    InvalidRequestError is one) becomes a usage error."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> Parsed | None:
        try:
            return None if value is None else parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc

    return callback


def _not_empty(parse: Callable[[str], Parsed]) -> Callable[[str], Parsed]:
    """``parse``, refusing an empty value, which it would read as the option's default (none)."""

    def parse_given(text: str) -> Parsed:
        if not text.strip():
            raise ValueError("empty: give a value, or leave the option out")
        return parse(text)

    return parse_given


def _runtime_integer(check: Callable[[object], int]) -> dict[str, Any]:
    """The type and callback of an integer option that the runtime reads and checks as the HTTP API does, so that
    both refuse a value in the same words."""
    return {"type": str, "callback": _parsed_by(lambda text: check(read_integer(text)))}


data_dir_option = click.option(
    "--data-dir",
    envvar="MNIST_ROOT",
    default=DEFAULT_MNIST_ROOT,
    show_default=True,
    type=GivenPath(file_okay=False),
    help="torchvision root holding MNIST/raw/ (env MNIST_ROOT).",
)
download_option = click.option(
    "--download", is_flag=True, help="Download MNIST into --data-dir when it is missing there (default: never)."
)

truncation_option = click.option(
    "--truncation",
    metavar="T",
    callback=_parsed_by(lambda text: check_truncation(read_number(text))),
    help="Redraw noise components beyond +-T (T >= 0.1): cleaner digits, less variety [default: none].",
)


provider_option = click.option(
    "--provider",
    default="auto",
    show_default=True,
    type=click.Choice(PROVIDER_CHOICES),
    help="onnxruntime execution provider; auto: CUDA where onnxruntime-gpu can run it.",
)


def generator_option(help_text: str) -> Callable[[Command], Command]:
    """``--generator MODEL.onnx``: every command that reads a generator spells it this way."""
    return click.option("--generator", "model", type=GivenPath(dir_okay=False), help=help_text)


def atol_option(default_text: str) -> Callable[[Command], Command]:
    """``--atol``, the pixel tolerance of ``export`` and ``verify``."""
    return click.option(
        "--atol",
        type=FiniteFloat(min=0),
        help="Largest allowed |torch - onnxruntime| of any pixel; the mean's limit stays the precision's "
        f"[default: {default_text}].",
    )


def _one_model(positional: str | None, option: str | None) -> str | None:
    """The model named as an argument or by ``--generator`` (both only if they agree)."""
    if positional is not None and option is not None and positional != option:
        raise click.UsageError(f"the model is given twice ({positional} and --generator {option}): give it once")
    return positional if positional is not None else option


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name=DISTRIBUTION, message="digitgen %(version)s")
def main() -> None:
    """Generate handwritten digits with a GAN trained on MNIST."""


@contextmanager
def _stop_on_signals() -> Iterator[Callable[[], bool]]:
    """Turn Ctrl-C, SIGTERM and SIGHUP into a polled flag so training can checkpoint and exit cleanly (off the
    main thread, where Python delivers no signals, the flag stays down)."""
    requested: list[int] = []

    def request(signum: int, _frame: object) -> None:
        requested.append(signum)
        _STOP.stopping = True  # a signal after this block is a second one, not a new stop

    with handling(INTERRUPTING_SIGNALS, request):
        yield lambda: bool(requested)


@main.command()
@data_dir_option
@download_option
@click.option(
    "--out",
    "run_dir",
    type=GivenPath(),
    help=f"Run directory for checkpoint, sample grids and metrics [default: {DEFAULT_RUN_DIR}; with --resume, "
    "the checkpoint's folder].",
)
@click.option(
    "--epochs",
    type=Integer(min=1),
    help="Passes over the data in the whole run (on --resume too: the total, not more on top) "
    "[default: 1, or the resumed run's].",
)
@click.option(
    "--steps", type=Integer(min=1, max=MAX_STEPS), help="Steps in the whole run, resumed or not (instead of --epochs)."
)
@click.option("--batch-size", type=Integer(min=1), help=f"Images per step [default: {TrainConfig.batch_size}].")
@click.option(
    "--lr",
    type=FiniteFloat(min=0, min_open=True, max=MAX_LR),
    help=f"Adam learning rate [default: {TrainConfig.lr:g}].",
)
@click.option(
    "--lr-d",
    type=FiniteFloat(min=0, min_open=True, max=MAX_LR),
    help="The discriminator's own learning rate (two time-scales) [default: --lr].",
)
@click.option("--latent-dim", type=Integer(1, MAX_SIZE), help=f"Noise size [default: {GANConfig.latent_dim}].")
@click.option(
    "--conditional-norm",
    is_flag=True,
    default=None,
    help="Generator BatchNorm gain and bias chosen by the digit (kept on --resume).",
)
@click.option(
    "--g-width",
    type=Integer(MIN_G_WIDTH, MAX_SIZE),
    help=f"The generator's channels at 7x7 (2x after its first conv, then 1x, 1/2x) [default: {GANConfig.g_width}].",
)
@click.option(
    "--d-width",
    type=Integer(1, MAX_SIZE),
    help=f"The discriminator's first-layer channels (then 2x, 4x) [default: {GANConfig.d_width}].",
)
@click.option(
    "--adc-weight",
    type=FiniteFloat(min=0),
    help="Weight of an auxiliary discriminative classifier (ADC-GAN) in both losses [default: 0, none].",
)
@click.option(
    "--label-classifier",
    "label_classifiers",
    multiple=True,
    type=GivenPath(dir_okay=False),
    help="Classifier weights (from train-classifier, not the evaluator's) whose cross-entropy on the generated "
    "digits joins the generator's loss; saved in the checkpoint. Given more than once: their mean.",
)
@click.option(
    "--label-weight",
    type=FiniteFloat(min=0),
    help="Weight of --label-classifier's cross-entropy in the generator's loss, e.g. 0.5.",
)
@click.option(
    "--label-weight-falls",
    is_flag=True,
    default=None,
    help="Lower --label-weight linearly with the learning rate over the last --lr-decay-epochs, reaching zero "
    "(or --label-weight-floor) at the end of the run (kept on --resume).",
)
@click.option(
    "--label-weight-floor",
    type=FiniteFloat(min=0),
    help="With --label-weight-falls: the weight it falls to at the end of the run instead of zero, e.g. 0.05 "
    "(kept on --resume).",
)
@click.option(
    "--label-digit-weights",
    callback=_parsed_by(_not_empty(parse_digit_weights)),
    help="Multiply --label-weight for the generated digits of some classes, e.g. 4=2.5,7=2.5 (the rest: 1; "
    "kept on --resume).",
)
@click.option(
    "--diffaugment",
    callback=_parsed_by(_not_empty(parse_policy)),
    help="DiffAugment: transforms of every digit the discriminator sees, comma-separated from "
    f"{', '.join(AUGMENTATIONS)}, e.g. translation,cutout [default: none].",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    help="bf16: convolutions and matrix products in bfloat16 (autocast), weights and optimiser in fp32; faster on "
    "CPUs with AMX or AVX512-BF16 and on recent GPUs, slower on others (kept on --resume) [default: fp32].",
)
@click.option(
    "--seed",
    type=Integer(0, TRAIN_MAX_SEED),
    help=f"Seed of weights and noise (0 to 2^32-1) [default: {TrainConfig.seed}].",
)
@click.option("--device", "device_name", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--resume", type=GivenPath(dir_okay=False), help="Continue the run saved in this checkpoint.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start over in an --out that holds another run, deleting it once this run saves a checkpoint.",
)
@click.option("--subset", type=Integer(min=1), help="Use only the first N training images (kept on --resume).")
@click.option(
    "--checkpoint-every",
    type=Integer(min=1),
    help=f"Steps between checkpoints, besides one at each epoch's end [default: {TrainConfig.checkpoint_every}].",
)
@click.option(
    "--lr-decay-epochs",
    type=FiniteFloat(min=0),
    help="Lower the learning rate linearly to zero over the run's last N epochs [default: no decay; on --resume "
    "the run's own, which a shorter --steps or --epochs must not cut].",
)
def train(run_dir: str | None, resume: str | None, device_name: str, **choices: Any) -> None:
    """Train the conditional GAN on MNIST (under torchrun: one process per device, DDP).

    A --resume keeps the run's own settings (the defaults below are a new run's); only --steps or --epochs,
    --lr-decay-epochs and --checkpoint-every may change.
    """
    from digitgen.training.distributed import init_distributed, shutdown
    from digitgen.training.loop import train as run_training
    from digitgen.training.run import RunOptions, prepare_run, resume_with, run_folder, training_device

    device = training_device(device_name)
    run_dir = run_folder(run_dir, resume)
    options = RunOptions(run_dir=run_dir, resume=resume, device_name=device_name, **choices)
    ctx, device = init_distributed(device)
    say = _say if ctx.is_main else lambda *args, **kwargs: None
    try:
        with prepare_run(options, device, ctx) as run:
            state = run.state
            for line in run.notes(device, ctx):
                say(line, err=True)
            complete = state.step >= state.train.total_steps  # a finished run resumed: nothing to train
            with (
                _stop_on_signals() as should_stop,
                progress(
                    state.train.total_steps,
                    "training",
                    describe=_format_progress,
                    hidden=not ctx.is_main or complete,
                    done=state.step,
                ) as bar,
            ):
                result = run_training(
                    state,
                    run.data,
                    run_dir,
                    should_stop=should_stop,
                    ctx=ctx,
                    progress=lambda step, info: bar.update(1, info),
                )
    finally:
        shutdown(ctx)
    if ctx.enabled:
        say(f"generator weights identical on all {ctx.world_size} ranks", err=True)
    if result.interrupted:
        if not ctx.is_main:  # the first rank says it for all
            sys.exit(130)
        raise Interrupted(
            f"stopped at step {result.step}; checkpoint saved to {result.checkpoint}; "
            + f"continue with {resume_with(result.checkpoint, options.data_dir, options.device_name, ctx.world_size)}"
        )
    if complete:
        say(
            f"the run was complete already, at step {result.step}: nothing to train (checkpoint {result.checkpoint}); "
            f"to train it further, resume it with --steps or --epochs past step {result.step}",
            err=True,
        )
        return
    say(
        f"done: step {result.step} in {result.seconds:.0f}s ({result.images_per_s:.0f} images/s); "
        f"checkpoint {result.checkpoint}",
        err=True,
    )


def _quality_file(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, object] | None:
    """``--quality``'s file and the evaluation read from it, refused before any export work."""
    from digitgen.export.quality import read_evaluation

    return None if value is None else (value, _parsed_by(read_evaluation)(ctx, param, value))


def _echo_report(report: ParityReport) -> None:
    for line in report.lines():
        _say(line)


@main.command("export")
@click.option("--checkpoint", required=True, type=GivenPath(dir_okay=False), help="Training checkpoint.")
@click.option(
    "--out", default="generator.onnx", show_default=True, type=GivenPath(dir_okay=False), help="ONNX file to write."
)
@click.option(
    "--opset",
    default=tolerances.DEFAULT_OPSET,
    show_default=True,
    type=Integer(min=tolerances.DEFAULT_OPSET),
    help=f"ONNX opset to write (the web page runs up to {tolerances.PAGE_OPSET}).",
)
@click.option(
    "--precision",
    default=tolerances.PRECISIONS[0],
    show_default=True,
    type=click.Choice(tolerances.PRECISIONS),
    help="fp16 weights and activations, or int8 static QDQ quantization; inputs and output stay float32.",
)
@atol_option(", ".join(f"{tolerance.max_abs:g} {name}" for name, tolerance in tolerances.TOLERANCES.items()))
@click.option(
    "--quality",
    type=GivenPath(dir_okay=False),
    callback=_quality_file,
    help="JSON of `digitgen evaluate --json` to store as metadata.",
)
@click.option(
    "--weights-out",
    type=GivenPath(dir_okay=False),
    help="Also write the EMA generator weights (what a release ships beside its ONNX file).",
)
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
def export_cmd(
    checkpoint: str,
    out: str,
    opset: int,
    precision: str,
    atol: float | None,
    quality: tuple[str, dict] | None,
    weights_out: str | None,
    overwrite: bool,
) -> None:
    """Export the EMA generator to ONNX and verify it numerically against PyTorch (fp32)."""
    from digitgen.export.onnx_export import export_generator

    quality_file, evaluation = quality or (None, None)
    report = export_generator(
        checkpoint,
        out,
        opset=opset,
        precision=precision,
        atol=atol,
        evaluation=evaluation,
        evaluation_file=quality_file,
        weights_out=weights_out,
        overwrite=overwrite,
    )
    _echo_report(report)
    _say(f"wrote {out} ({Path(out).stat().st_size / 1e6:.2f} MB), verified on {len(report.cases)} cases")
    if opset > tolerances.PAGE_OPSET:
        _say(
            f"note: the web page's onnxruntime-web runs opsets up to {tolerances.PAGE_OPSET}, so it refuses this "
            f"file; for the page, export with --opset {tolerances.PAGE_OPSET} or lower",
            err=True,
        )


@main.command()
@click.argument("model_argument", metavar="[MODEL]", required=False, type=GivenPath(dir_okay=False))
@generator_option("ONNX model to check (or give it as the argument).")
@click.option("--checkpoint", required=True, type=GivenPath(dir_okay=False), help="Checkpoint it came from.")
@atol_option("by the model's precision")
def verify(model_argument: str | None, model: str | None, checkpoint: str, atol: float | None) -> None:
    """Check an existing ONNX model against the PyTorch checkpoint it was exported from."""
    from digitgen.export.onnx_export import verify_file

    model = _one_model(model_argument, model)
    if model is None:
        raise click.UsageError("name the model to check: digitgen verify MODEL --checkpoint CHECKPOINT")
    report = verify_file(model, checkpoint, atol)
    _echo_report(report)
    _say(f"{model}: matches {checkpoint} on {len(report.cases)} cases")


@main.command()
@generator_option("ONNX generator (default: the shipped model).")
@click.option(
    "-n",
    "--num-digits",
    "--num_digits",
    "--count",
    "num_digits",
    default=10,
    show_default=True,
    metavar="N",
    **_runtime_integer(check_count),
    help="How many digits to generate, 1 or more (--count: as the HTTP API's count).",
)
@click.option("--digits", callback=_parsed_by(parse_digit_list), help="Digits to generate, repeated to N (e.g. 0,3,7).")
@click.option("--digit", metavar="D", callback=_parsed_by(read_integer), help="Generate only this digit.")
@click.option(
    "--seed",
    default=0,
    show_default=True,
    metavar="SEED",
    **_runtime_integer(check_seed),
    help="Noise seed, 0 to 2^64-1: the same seed, the same digits.",
)
@click.option("--out", default="digits", show_default=True, type=GivenPath(), help="Output directory.")
@click.option("--format", "fmt", default="png", show_default=True, type=click.Choice(FORMATS))
@provider_option
@click.option("--batch-size", default=DEFAULT_BATCH_SIZE, show_default=True, type=Integer(min=1, max=MAX_BATCH_SIZE))
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run: keep files that hold exactly what this command writes, redo the rest "
    "(with --overwrite: continue an interrupted overwrite).",
)
@click.option(
    "--test-count",
    type=Integer(min=1),
    help="--format mnist: digits in the test split, after the N train digits [default: 10000].",
)
@click.option(
    "--num-shards",
    default=1,
    show_default=True,
    type=Integer(min=1),
    help="Split the request into this many parts (run one per process or job).",
)
@click.option(
    "--shard-index",
    default=0,
    show_default=True,
    type=Integer(min=0),
    help="Which part this run writes (0-based).",
)
@truncation_option
def generate(
    model: str | None,
    num_digits: int,
    digits: list[int] | None,
    digit: int | None,
    seed: int,
    out: str,
    fmt: str,
    provider: str,
    batch_size: int,
    overwrite: bool,
    resume: bool,
    test_count: int | None,
    num_shards: int,
    shard_index: int,
    truncation: float | None,
) -> None:
    """Generate digits with an ONNX generator (no PyTorch needed)."""
    if digits is not None and digit is not None:
        raise click.UsageError("give --digits or --digit, not both")
    requested = [digit] if digit is not None else digits
    shard = Shard(shard_index, num_shards)
    gen = DigitGenerator.from_path(model, provider)
    try:
        job = plan_generation(
            gen,
            out,
            num_digits,
            fmt,
            digits=requested,
            seed=seed,
            batch_size=batch_size,
            shard=shard,
            overwrite=overwrite,
            resume=resume,
            truncation=truncation,
            test_count=test_count,
        )
    except InvalidRequestError as exc:  # options that cannot go together, or that this model cannot honour
        raise click.UsageError(str(exc)) from None
    part = f" (shard {shard_index} of {num_shards})" if num_shards > 1 else ""  # shards that run side by side
    how = " (by the digest the interrupted run recorded, or else by making its digit again)" if fmt == "png" else ""
    try:
        if gen.note:  # said before the work, so that a run that fails or is stopped still says where it ran
            _say(f"note: {gen.note}", err=True)
        if resume and job.plan.existing:
            there = counted(len(job.plan.existing), "file")
            _say(f"resuming: {there} already there, each kept if it holds exactly what this run writes{how}", err=True)
        start = time.perf_counter()
        with progress(job.plan.count, f"generating{part}", hidden=job.plan.count <= batch_size) as bar:
            written = job.run(on_batch=bar.update)
    except KeyboardInterrupt:
        job.discard()  # stopped before the run began writing: no folder made for nothing
        raise Interrupted(
            "any file it wrote is complete, none is partial; the same command with --resume continues"
        ) from None
    seconds = time.perf_counter() - start
    where = written.paths[0] if len(written.paths) == 1 else Path(out)  # the folder, written as for png
    timing = f"in {seconds:.2f}s" if seconds < 60 else f"in {clock_time(seconds)}"
    timing += f" on {gen.provider}"
    made = f"{counted(job.plan.count, 'digit')}{part} as {fmt}"
    if not resume:
        earlier = len(job.plan.existing)  # what --overwrite let it replace: said, as nothing else tells of them
        gone = f"; it replaced or removed {counted(earlier, 'file')} already there (--overwrite)" if earlier else ""
        _say(f"wrote {made} to {where} {timing}{gone}")
        return
    if written.kept:
        kept = f"kept {counted(written.kept, 'complete file')} of the earlier run"
    else:
        kept = "found no complete file to keep"
    _say(f"{made} in {where}: {kept}, wrote {written.written:,}, {timing}")


@main.command()
@click.argument("out_dir", type=GivenPath(file_okay=False))
@click.option("--format", "fmt", default="idx", show_default=True, type=click.Choice(["idx", "npz"]))
@click.option("--overwrite", is_flag=True, help="Replace existing merged files.")
def merge(out_dir: str, fmt: str, overwrite: bool) -> None:
    """Join the shard files of a sharded `generate` into the unsharded files."""
    files = merge_shards(out_dir, fmt, overwrite=overwrite)
    _say("merged into " + ", ".join(str(f) for f in files))


@main.command()
@click.argument("model_argument", metavar="[MODEL]", required=False, type=GivenPath(dir_okay=False))
@generator_option("ONNX generator, the same as MODEL (default: the shipped model).")
def info(model_argument: str | None, model: str | None) -> None:
    """Print a model's contract and metadata (default: the shipped model)."""
    _refuse_without_output("info")
    gen = DigitGenerator.from_path(_one_model(model_argument, model), "cpu")
    _say(f"model: {gen.path}")
    _say(f"sha256: {gen.sha256}")  # the names `evaluate --json` records them by
    _say(f"sha256_without_metadata: {gen.sha256_without_metadata}")
    for kind, args in (("input", gen.inputs), ("output", gen.outputs)):
        for arg in args:
            _say(f"{kind:<7} {arg.name:<6} {arg.type:<14} {arg.shape}")
    for key, value in sorted(gen.info.metadata.items()):  # the file's words, never a line or a cursor move of theirs
        _say(f"{key}: {value}")
    _say(f"noise (runtime, any model): {NOISE_SCHEME}")


@main.command("train-classifier")
@data_dir_option
@download_option
@click.option("--out", required=True, type=GivenPath(dir_okay=False), help="ONNX file to write.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace existing files; without --resume, start over an interrupted run.",
)
@click.option(
    "--resume", is_flag=True, help="Continue the interrupted run of this command (its state: NAME_resume.pt)."
)
@click.option("--epochs", default=4, show_default=True, type=Integer(min=1))
@click.option("--seed", default=0, show_default=True, type=Integer(0, TRAIN_MAX_SEED))
def train_classifier_cmd(
    data_dir: str, download: bool, out: str, overwrite: bool, resume: bool, epochs: int, seed: int
) -> None:
    """Train the evaluator's reference MNIST classifier and export it to ONNX (its weights beside it)."""
    from digitgen.export.classifier_export import ClassifierRun

    run = ClassifierRun(data_dir, out, epochs=epochs, seed=seed, download=download, resume=resume, overwrite=overwrite)
    with (
        _stop_on_signals() as should_stop,
        progress(run.total, "training classifier (steps)", done=run.done) as bar,
    ):
        result, diff = run.run(progress=lambda step, total: bar.update(1), should_stop=should_stop)
    if diff is None:
        raise Interrupted(
            f"stopped at step {result.step:,} of {run.total:,}; its state is saved to {run.state}; continue with "
            "the same command and --resume"
        )
    timing = f"in {result.seconds:.0f}s" + (f" (resumed at step {run.done:,}: this part's time)" if run.done else "")
    _say(
        f"MNIST test accuracy {result.test_accuracy:.2%} after {counted(epochs, 'epoch')} {timing}; "
        f"wrote {out} (max |torch-ort| {diff:.1e}) and {run.weights}"
    )


@main.command("export-classifier")
@click.option(
    "--weights",
    required=True,
    type=GivenPath(dir_okay=False),
    help="Classifier weights, e.g. artifacts/classifier_weights.pt (written by train-classifier).",
)
@click.option("--out", required=True, type=GivenPath(dir_okay=False), help="ONNX file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
def export_classifier_cmd(weights: str, out: str, overwrite: bool) -> None:
    """Rebuild the reference classifier's ONNX file from its weights."""
    from digitgen.export.classifier_export import export_classifier_weights

    diff = export_classifier_weights(weights, out, overwrite=overwrite)
    _say(f"wrote {out} (max |torch-ort| {diff:.1e})")


@main.command()
@generator_option("ONNX generator (default: the shipped model).")
@click.option("--classifier", type=GivenPath(dir_okay=False), help="Default: the shipped reference classifier.")
@click.option(
    "--num-samples",
    default=10_000,
    show_default=True,
    type=Integer(min=MIN_SAMPLES, max=MAX_SAMPLES),
    help="Generated digits to score (at most as many as MNIST's training digits, which they are compared with).",
)
@click.option("--seed", default=0, show_default=True, type=Integer(min=0, max=MAX_SEED))
@data_dir_option
@truncation_option
@click.option(
    "--cas",
    is_flag=True,
    help="Also train a classifier on 60,000 generated digits and test it on real ones (needs the train extra).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def evaluate(
    model: str | None,
    classifier: str | None,
    num_samples: int,
    seed: int,
    data_dir: str,
    truncation: float | None,
    cas: bool,
    as_json: bool,
) -> None:
    """Score a generator against MNIST test: class accuracy, FID, precision, recall (and CAS)."""
    _refuse_without_output("evaluate")
    from digitgen.runtime.evaluate import (
        ReferenceClassifier,
        check_evaluation,
        check_reference_data,
        embed_samples,
        evaluation_work,
        score_samples,
        scoring_work,
    )
    from digitgen.runtime.idx import read_mnist_split

    if cas:  # imported first: without the train extra, the refusal comes before any work
        from digitgen.training.cas import CasRun, default_state_dir

    gen = DigitGenerator.from_path(model, "cpu")
    check_evaluation(gen, num_samples)
    state_dir = default_state_dir() if cas else None
    reference = ReferenceClassifier(classifier)
    test, train = read_mnist_split(data_dir, "t10k"), read_mnist_split(data_dir, "train")
    check_reference_data(test, train, num_samples)
    # made before the scores, so that data it cannot train on is refused before any work
    run = CasRun(gen, train, test, seed=seed, truncation=truncation, state_dir=state_dir) if cas else None
    work = evaluation_work(len(test[0]), len(train[0]), num_samples)
    with progress(work, "evaluating (images made or scored)") as bar:
        samples = embed_samples(
            gen, reference, test, train, num_samples=num_samples, seed=seed, truncation=truncation, progress=bar.update
        )
    with progress(scoring_work(len(test[0]), num_samples), "scoring (feature distances measured)") as bar:
        result = score_samples(samples, reference, progress=bar.update)
    if run is not None:
        for note in run.notes:
            _say(f"note: {note}", err=True)
        label = "CAS: training classifiers (steps)"
        with _stop_on_signals() as should_stop, progress(run.total, label, done=run.done) as bar:
            scores = run.run(progress=lambda: bar.update(1), should_stop=should_stop)
        if scores is None:
            raise Interrupted(
                f"CAS's training state is kept in {state_dir}; the same command continues it"
                if run.keeps_state
                else "CAS's training state is not kept (another run of it keeps its own)"
            )
        result = dataclasses.replace(result, cas=scores)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    click.echo(result.table())


@main.command()
@generator_option("ONNX generator (default: the shipped model).")
@provider_option
@click.option(
    "--host", default=ServerOptions.host, show_default=True, help="Address to bind (0.0.0.0: every interface)."
)
@click.option("--port", default=ServerOptions.port, show_default=True, type=Integer(min=0, max=65535))
@click.option(
    "--workers",
    default=ServerOptions.workers,
    show_default=True,
    type=Integer(min=1),
    help="Server processes, at most the cores this process may use; each loads the model.",
)
@click.option(
    "--threads",
    type=Integer(min=1),
    help="onnxruntime intra-op threads per worker, at most the cores this process may use [default: usable cores / "
    "workers - 1, at least 1].",
)
@click.option(
    "--max-count",
    default=ServeSettings.max_count,
    show_default=True,
    type=Integer(min=1, max=MAX_COUNT_LIMIT),
    help="Most digits per request.",
)
@click.option(
    "--max-in-flight",
    default=ServeSettings.max_in_flight,
    show_default=True,
    type=Integer(min=1),
    help="Generations at once per worker.",
)
@click.option(
    "--queue",
    default=ServeSettings.queue,
    show_default=True,
    type=Integer(min=0),
    help="Requests that may wait for a generation; more get 503 with Retry-After.",
)
@click.option(
    "--time-limit",
    default=ServeSettings.time_limit,
    show_default=True,
    type=FiniteFloat(min=0, min_open=True),
    help="Seconds a request may wait and generate before it gets 503.",
)
@click.option(
    "--graceful-timeout",
    default=ServerOptions.graceful_timeout,
    show_default=True,
    type=FiniteFloat(min=0),
    help="On SIGTERM or Ctrl-C, seconds to finish requests in flight.",
)
@click.option("--cors-origin", "cors_origins", multiple=True, help="Allow browser pages from this origin (repeatable).")
@click.option(
    "--root-path",
    default="",
    metavar="PREFIX",
    help="Behind a reverse proxy that strips this path prefix (e.g. /digits): the API docs and error messages give "
    "addresses under it.",
)
@click.option(
    "--web",
    "web_dir",
    type=GivenPath(exists=True, file_okay=False),
    help="Serve this built page at / (web/dist).",
)
@click.option(
    "--batch-window-ms",
    default=ServeSettings.batch_window_ms,
    show_default=True,
    type=FiniteFloat(min=0),
    help="Micro-batching: ms small requests wait to share one model call (0: off).",
)
@click.option(
    "--batch-max-digits",
    default=None,
    type=Integer(min=1),
    help=f"Micro-batching: digits in one shared model call [default: {BATCH_MAX_DIGITS}].",
)
@click.option(
    "--quiet", is_flag=True, help="No access log or start-up lines (with --port 0, one line: the address chosen)."
)
def serve(
    model: str | None,
    provider: str,
    host: str,
    port: int,
    workers: int,
    threads: int | None,
    max_count: int,
    max_in_flight: int,
    queue: int,
    time_limit: float,
    graceful_timeout: float,
    cors_origins: tuple[str, ...],
    root_path: str,
    web_dir: str | None,
    batch_window_ms: float,
    batch_max_digits: int | None,
    quiet: bool,
) -> None:
    """Serve digits over HTTP (FastAPI + uvicorn; needs the serve extra)."""
    if batch_window_ms == 0 and batch_max_digits is not None:
        raise click.UsageError(
            "--batch-max-digits sizes a micro-batch and --batch-window-ms 0 turns them off: give one"
        )
    from digitgen.serve.run import serve as run_server

    settings = ServeSettings(
        max_count=max_count,
        max_in_flight=max_in_flight,
        queue=queue,
        time_limit=time_limit,
        cors_origins=cors_origins,
        web_dir=web_dir,
        batch_window_ms=batch_window_ms,
        batch_max_digits=batch_max_digits,
        access_log=not quiet,
    )
    options = ServerOptions(
        model=model,
        provider=provider,
        host=host,
        port=port,
        workers=workers,
        threads=threads,
        graceful_timeout=graceful_timeout,
        root_path=root_path,
        settings=settings,
    )
    # a busy port is refused before the model loads; port 0 becomes a free one; clients that connect from now on
    # wait in its queue (none is refused), so a caller may connect as soon as it reads the line below
    options, listening = options.listen()
    with listening:
        generator = options.load()  # a bad model or provider is refused here, before any worker starts
        if generator.note:
            _say(f"note: {generator.note}", err=True)
        if quiet and port == 0:  # the one thing a caller cannot know otherwise
            _say(f"digitgen serve: {options.url}", err=True)
        elif not quiet:
            url = root_path or options.url  # behind a proxy, its addresses are the ones that work
            where = f"the page at {url}/, API docs at {url}/docs" if web_dir else f"API docs at {url}/docs"
            if root_path:
                where += f" through the proxy that strips {root_path} (listening on {options.url})"
            _say(
                f"digitgen serve: {generator.path} on {generator.provider}, {workers} worker(s) with "
                f"{options.intra_op_threads} onnxruntime thread(s) each; {where}",
                err=True,
            )
        with model_calls_run_through_signals():  # SIGTERM stops the server, which finishes its requests in flight
            run_server(options, generator, listening)


def _format_progress(info: dict[str, float] | None) -> str:
    if not info:
        return ""
    return (
        f"epoch {info['epoch']:.0f}  loss_d {info['loss_d']:.3f}  loss_g {info['loss_g']:.3f}  "
        f"D(real) {info['d_real']:.2f}  D(fake) {info['d_fake']:.2f}"
    )


if __name__ == "__main__":
    main()
