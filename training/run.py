"""Set up a training run from command-line choices: fresh or resumed state, data, step budget."""

from __future__ import annotations

import math
import os
import shlex
import shutil
from contextlib import suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from digitgen.runtime.files import folder_problem, refuse_non_files
from digitgen.runtime.idx import data_dir_again
from digitgen.runtime.text import MAX_QUOTED, counted, cut, finite_number
from digitgen.training.classifier import Classifier, load_classifier_weights
from digitgen.training.config import DEFAULT_RUN_DIR, MAX_STEPS, GANConfig, TrainConfig
from digitgen.training.data import MnistTensors, check_labels, load_mnist_once
from digitgen.training.distributed import DistContext, on_main_first, weights_digest
from digitgen.training.errors import CheckpointError, RunDirectoryError, TrainingError, memory_errors_in_words
from digitgen.training.loop import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    REPLACED_DIR,
    SAMPLE_GRID,
    SAMPLES_DIR,
    drop_replaced,
    steps_per_epoch,
)
from digitgen.training.run_lock import RunLock, refuse_if_training
from digitgen.training.state import TrainState, new_state, numerics, state_from_checkpoint


@dataclass(frozen=True)
class RunOptions:
    """What the user asked for; ``None`` means "not given": the default, or the resumed run's own."""

    data_dir: str
    run_dir: str  # see run_folder
    epochs: int | None = None
    steps: int | None = None  # not with epochs; with neither, one epoch (or the resumed run's budget)
    batch_size: int | None = None
    lr: float | None = None
    latent_dim: int | None = None
    seed: int | None = None
    subset: int | None = None
    checkpoint_every: int | None = None
    resume: str | None = None
    overwrite: bool = False
    device_name: str = "auto"  # only to name it again in a hint: a resume does not keep it
    lr_decay_epochs: float | None = None  # None: no decay, or the resumed run's own
    lr_d: float | None = None
    conditional_norm: bool | None = None
    g_width: int | None = None
    d_width: int | None = None
    adc_weight: float | None = None
    # classifier weights (train-classifier), one or more, whose mean cross-entropy steers G
    label_classifiers: tuple[str, ...] = ()
    label_weight: float | None = None
    label_weight_falls: bool | None = None
    label_weight_floor: float | None = None
    label_digit_weights: str | None = None  # canonical "DIGIT=MULTIPLIER,..." (see parse_digit_weights)
    diffaugment: str | None = None
    precision: str | None = None
    download: bool = False  # fetch MNIST when it is missing from data_dir


def run_folder(out: str | None, resume: str | None) -> str:
    """Where a run writes: ``out`` when given, else the resumed checkpoint's folder, else ``runs/latest``."""
    if out is not None:
        return out
    return str(Path(resume).parent) if resume is not None else DEFAULT_RUN_DIR


def training_device(name: str) -> torch.device:
    """The device ``--device`` names: ``auto`` is CUDA where torch sees it, the CPU otherwise."""
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: CUDA is not available on this machine; use --device cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


# Options that define a run: on --resume they must match the checkpoint or be left out.
# name in RunOptions -> (command-line option, where the checkpoint keeps it)
FIXED_ON_RESUME = {
    "batch_size": ("--batch-size", "train"),
    "lr": ("--lr", "train"),
    "lr_d": ("--lr-d", "train"),
    "seed": ("--seed", "train"),
    "subset": ("--subset", "train"),
    "latent_dim": ("--latent-dim", "config"),
    "conditional_norm": ("--conditional-norm", "config"),
    "g_width": ("--g-width", "config"),
    "d_width": ("--d-width", "config"),
    "adc_weight": ("--adc-weight", "train"),
    "label_weight": ("--label-weight", "train"),
    "label_weight_falls": ("--label-weight-falls", "train"),
    "label_weight_floor": ("--label-weight-floor", "train"),
    "label_digit_weights": ("--label-digit-weights", "train"),
    "diffaugment": ("--diffaugment", "train"),
    "precision": ("--precision", "train"),
}
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME)  # and the sample grids in SAMPLES_DIR


def earlier_run_files(run_dir: Path) -> tuple[Path, ...]:
    """What a run leaves in ``run_dir``: its checkpoint, its metrics and its sample grids (nothing else that the
    folder, or its samples folder, may hold)."""
    files = [run_dir / name for name in RUN_FILES if os.path.lexists(run_dir / name)]
    samples = run_dir / SAMPLES_DIR
    if samples.is_dir():
        files += sorted(path for path in samples.iterdir() if SAMPLE_GRID.fullmatch(path.name))
    return tuple(files)


def describe_run_files(paths: tuple[Path, ...]) -> str:
    """``checkpoint.pt, metrics.jsonl, samples (3 grids)``: the files of :func:`earlier_run_files`, in short."""
    named = [path.name for path in paths if not SAMPLE_GRID.fullmatch(path.name)]
    grids = len(paths) - len(named)
    return ", ".join(named + ([f"{SAMPLES_DIR} ({counted(grids, 'grid')})"] if grids else []))


@dataclass(frozen=True)
class PreparedRun:
    """A checked training run, ready to start: its state, data and claimed run directory (a context manager
    that lets the directory go)."""

    state: TrainState
    data: MnistTensors
    steps_per_epoch: int
    global_batch: int
    overwritten: str  # what --overwrite did with the earlier run (empty without it)
    lock: RunLock | None  # the run directory, claimed by the main process until the run ends
    run_dir: str
    resumed: bool

    def __enter__(self) -> PreparedRun:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.lock is not None:
            try:
                settle_aside(Path(self.run_dir))
            finally:
                self.lock.release()

    def notes(self, device: torch.device, ctx: DistContext) -> list[str]:
        """What to tell the user before the run starts: the files ``--overwrite`` deleted, the :meth:`summary`,
        and what differs in a run resumed by another number of processes or spread over several."""
        state = self.state
        lines = [self.summary(device)]
        if self.overwritten:
            lines.insert(0, f"--overwrite: {self.overwritten}")
        if self.resumed and state.saved_by != ctx.world_size:
            lines.append(
                f"note: the checkpoint was saved by {state.saved_by} process(es) and resumes with "
                f"{ctx.world_size}; the run goes on, but not exactly as with {state.saved_by} "
                "(batches and noise streams differ)"
            )
        saved, now = state.saved_with, numerics()
        if self.resumed and device.type == "cpu" and saved not in (None, now):
            lines.append(
                f"note: the checkpoint was saved with torch {cut(str(saved.get('torch')), MAX_QUOTED)} on "
                f"{cut(str(saved.get('threads')), MAX_QUOTED)} thread(s) "
                f"and resumes with torch {now['torch']} on {now['threads']}; the run goes on, but not bit for bit as "
                "one never stopped (the same threads: OMP_NUM_THREADS)"
            )
        if ctx.enabled:
            lines.append(
                f"distributed: {ctx.world_size} processes, effective batch {self.global_batch} "
                f"({ctx.world_size} x {state.train.batch_size}), learning rate {state.train.lr:g} "
                "(not scaled with the batch)"
            )
        return lines

    def summary(self, device: torch.device) -> str:
        """One line on what this run will do: where, on how much data, from which step to which, and how."""
        train, state = self.state.train, self.state
        levers = [
            f" (discriminator {train.lr_d:g})" if train.lr_d is not None else "",
            f" falling to 0 over the last {train.lr_decay_steps} steps" if train.lr_decay_steps else "",
            f", ADC classifier weight {train.adc_weight:g}" if train.adc_weight else "",
            f", label classifier weight {train.label_weight:g}" if train.label_weight else "",
            f" (mean of {len(state.label_classifiers)} classifiers)" if len(state.label_classifiers) > 1 else "",
            " falling with the learning rate" if train.label_weight_falls else "",
            f" to {train.label_weight_floor:g}" if train.label_weight_floor else "",
            f" (per digit x {train.label_digit_weights})" if train.label_digit_weights else "",
            f", DiffAugment {train.diffaugment}" if train.diffaugment else "",
            f", {train.precision} autocast" if train.precision != "fp32" else "",
        ]
        return (
            f"training on {device} ({len(self.data.images)} images, {self.steps_per_epoch} steps/epoch), "
            f"steps {state.step} -> {train.total_steps}, batch {train.batch_size}, learning rate {train.lr:g}"
            + "".join(levers)
        )


def resume_with(checkpoint: str | Path, data_dir: str, device_name: str, processes: int) -> str:
    """``--resume CHECKPOINT`` and the options a resume does not keep: where MNIST is, the device, torchrun's launch."""
    hint = f"--resume {shlex.quote(str(checkpoint))}{data_dir_again(data_dir)}"
    hint += "" if device_name == "auto" else f" --device {device_name}"
    if processes > 1:  # the ranks' noise generators are in the checkpoint: the same number continues exactly
        hint += f", launched by torchrun with {processes} processes as this run was"
    return hint


def claim_run_dir(options: RunOptions, processes: int = 1) -> tuple[Path, ...]:
    """Refuse a run directory that holds another run, unless resuming it or told to overwrite.

    With ``overwrite`` it returns the earlier run's files, for :func:`set_aside` once every other check has
    passed; it moves nothing itself.
    """
    run_dir = Path(options.run_dir)
    problem = folder_problem(run_dir)  # found here on every process, not when the first one saves a file
    if problem is not None:
        raise RunDirectoryError(f"--out {run_dir} {problem}")
    refuse_if_training(run_dir)
    refuse_non_files(run_dir / name for name in RUN_FILES)  # a folder or a pipe of that name: never a run's
    samples = run_dir / SAMPLES_DIR
    if os.path.lexists(samples) and not samples.is_dir():
        raise RunDirectoryError(f"{samples} is not a folder, where a run keeps its sample grids; move it")
    existing = earlier_run_files(run_dir) if run_dir.is_dir() else ()
    refuse_non_files(existing)  # a folder of a grid's name: --overwrite could not delete it, nor a run replace it
    own_checkpoint = run_dir / CHECKPOINT_NAME
    resumes_it = options.resume is not None and own_checkpoint.exists() and own_checkpoint.samefile(options.resume)
    if resumes_it and options.overwrite:
        raise RunDirectoryError(f"--resume continues the run in {run_dir} and --overwrite would delete it: give one")
    aside = run_dir / REPLACED_DIR  # a run an --overwrite set aside, left there as that run was killed
    if aside.is_symlink() or (os.path.lexists(aside) and not aside.is_dir()):
        raise RunDirectoryError(f"{aside} is not a folder, where --overwrite sets an earlier run aside; move it")
    if options.resume is not None and aside.is_dir() and Path(options.resume).resolve().is_relative_to(aside.resolve()):
        raise RunDirectoryError(
            f"{options.resume} is in the run an --overwrite set aside; move its files back into {run_dir} first"
        )
    if resumes_it or options.overwrite or not (existing or aside.is_dir()):
        return existing if options.overwrite else ()
    kept = f"; the run it replaced is in {aside}: move its files back to keep it" if aside.is_dir() else ""
    if not existing:
        raise RunDirectoryError(f"{run_dir} holds a run set aside by a stopped --overwrite{kept}")
    found = describe_run_files(existing)
    if not own_checkpoint.exists():  # a run that stopped before its first checkpoint cannot be continued
        raise RunDirectoryError(
            f"{run_dir} holds a run that saved no checkpoint ({found}); start over with --overwrite{kept}"
        )
    raise RunDirectoryError(
        f"{run_dir} already holds a run ({found}); continue it with "
        f"{resume_with(own_checkpoint, options.data_dir, options.device_name, processes)}, "
        "or start over with --overwrite"
    )


UNTIL_SAVED = "deleted once this run saves a checkpoint (put back if it stops before)"


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)


def set_aside(paths: tuple[Path, ...], run_dir: Path) -> str:
    """Move an earlier run's files (see :func:`claim_run_dir`) into :data:`REPLACED_DIR`: renamed, all or none, so
    that a new run that stops before its first checkpoint (a full disk) can put them back (:func:`settle_aside`).
    Returns what it did, in words. A run set aside by an ``--overwrite`` killed before its first checkpoint stays
    there, the earlier run still, and ``paths`` (what the killed run wrote) are deleted; one whose new run saved a
    checkpoint is deleted, as that run replaced it."""
    aside = run_dir / REPLACED_DIR
    found = describe_run_files(paths)
    if aside.is_dir() and not os.path.lexists(run_dir / CHECKPOINT_NAME):
        remove_run_files(paths)
        gone = f"deleted the stopped run's {found} in {run_dir}; " if paths else ""
        return f"{gone}the run it replaced stays set aside in {aside}, {UNTIL_SAVED}"
    shutil.rmtree(aside, ignore_errors=True)
    moved: list[tuple[Path, Path]] = []
    try:
        for path in paths:
            target = aside / path.relative_to(run_dir)
            _move(path, target)
            moved.append((path, target))
    except OSError as exc:
        for path, target in reversed(moved):
            with suppress(OSError):
                os.replace(target, path)
        raise RunDirectoryError(f"cannot set the earlier run aside in {aside}: {exc.strerror or exc}") from exc
    with suppress(OSError):  # its samples folder, if nothing else is in it
        (run_dir / SAMPLES_DIR).rmdir()
    return f"set aside the earlier run's {found} in {run_dir}, {UNTIL_SAVED}" if paths else ""


def settle_aside(run_dir: Path) -> None:
    """At a run's end, the earlier run :func:`set_aside` moved, if still there: put back in place of this run's
    metrics and grids if this run saved no checkpoint, else deleted (as the first save does:
    :func:`~digitgen.training.loop.drop_replaced`). Left where it is if that fails, for the next run's refusal to
    name."""
    aside = run_dir / REPLACED_DIR
    if aside.is_symlink() or not aside.is_dir():
        return
    if os.path.lexists(run_dir / CHECKPOINT_NAME):
        drop_replaced(run_dir)
        return
    with suppress(OSError):
        remove_run_files(earlier_run_files(run_dir))
        for path in sorted(aside.rglob("*")):
            if not path.is_dir():
                _move(path, run_dir / path.relative_to(aside))
        shutil.rmtree(aside)


def remove_run_files(paths: tuple[Path, ...]) -> None:
    """Delete an earlier run's files (see :func:`claim_run_dir`); its samples folder too if nothing else is in it."""
    for path in paths:
        path.unlink(missing_ok=True)
    for folder in {path.parent for path in paths if SAMPLE_GRID.fullmatch(path.name)}:
        with suppress(OSError):  # the user's files are in it
            folder.rmdir()


def _check_same_data(train: TrainConfig, images: int, digest: str, data_dir: str) -> None:
    """A resumed run goes on with the images it trained on (as many, and the same: their fingerprint) or stops."""
    if train.train_images is not None and train.train_images != images:
        raise TrainingError(
            f"the resumed run trained on {train.train_images} images and {data_dir} holds {images}; "
            "resume with the --data-dir it trained on"
        )
    if train.train_data_sha256 is not None and train.train_data_sha256 != digest:
        raise TrainingError(
            f"the resumed run trained on other images than the {images} in {data_dir} (their sha256 differs); "
            "resume with the --data-dir it trained on"
        )


def _check_resume_classifiers(options: RunOptions, state: TrainState) -> None:
    """``--label-classifier`` given with ``--resume`` must hold the weights the run keeps in its checkpoint,
    in the same order."""
    if not options.label_classifiers:
        return
    given = [load_classifier_weights(path)[0] for path in options.label_classifiers]
    kept = state.label_classifiers
    if len(given) != len(kept) or not all(_same_weights(a, b) for a, b in zip(given, kept, strict=True)):
        shown = " ".join(f"--label-classifier {path}" for path in options.label_classifiers)
        count = {0: "none", 1: "the one in its checkpoint"}.get(len(kept), f"the {len(kept)} in its checkpoint")
        raise TrainingError(
            f"{shown} differs from the resumed run's label classifier ({count}); a resumed run keeps its "
            "settings: leave it out"
        )


def _setting_text(value: object) -> object:
    """A setting as a resume refusal shows it: a flag on or off, ``none`` for one not set."""
    if value is None or value == "":
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


def _check_resume_options(options: RunOptions, state: TrainState) -> None:
    saved = {"train": asdict(state.train), "config": asdict(state.config)}
    for name, (flag, part) in FIXED_ON_RESUME.items():
        given, kept = getattr(options, name), saved[part][name]
        if name == "lr_d" and kept is None:  # the run's discriminator used --lr: giving that rate changes nothing
            kept = saved["train"]["lr"]
        if given is not None and given != kept:
            shown = flag if given is True else f"{flag} {given}"
            kept = _setting_text(kept)
            raise TrainingError(
                f"{shown} differs from the resumed run's {kept}; a resumed run keeps its settings "
                "(only --steps, --epochs, --lr-decay-epochs and --checkpoint-every can change)"
            )


def _decay_too_long(epochs: float, decay: int | None, total: int, per_epoch: int) -> str:
    """The refusal of a decay longer than the run, naming the largest decay that fits and the run it needs
    (``decay`` None: more steps than any run)."""
    fits = math.floor(total / per_epoch * 1000) / 1000
    shorter = f"give --lr-decay-epochs {fits:g} or less" if fits > 0 else "leave out --lr-decay-epochs"
    steps = "more steps than any run" if decay is None else f"{decay} steps"
    longer = "" if decay is None else f", or train at least {decay} steps"
    return (
        f"the learning-rate decay (--lr-decay-epochs {epochs:g}: {steps}) is longer than the run "
        f"({total} steps); for a run this short {shorter} (the whole run is {total / per_epoch:.3g} epochs){longer}"
    )


def check_precision(train: TrainConfig, device: torch.device) -> None:
    """Refuse bf16 on a GPU without bfloat16 (on a CPU it runs everywhere, fast only with AMX or AVX512-BF16)."""
    if train.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError("this GPU has no bfloat16 support for --precision bf16; train with --precision fp32")


# weights_digest of the evaluator's classifier (artifacts/classifier_weights.pt, which a wheel does not
# carry): the guard below holds in an installed package too
EVALUATOR_WEIGHTS_SHA256 = "cc6c86a9d32ba330bab6e278d901c748b19cdc352466e313b603e1db73056861"


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    mine, theirs = a.state_dict(), b.state_dict()
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k].cpu(), theirs[k].cpu()) for k in mine)


def label_classifiers(options: RunOptions) -> tuple[Classifier, ...]:
    """The frozen classifiers of ``--label-classifier``, checked: they come with ``--label-weight`` (and the
    weight, and ``--label-weight-falls``, with them), no two are the same, and none is the evaluator's
    classifier, which would then grade its own pupil."""
    weighted = options.label_weight is not None and options.label_weight > 0
    if options.label_weight_falls and not weighted:
        raise TrainingError("--label-weight-falls needs a positive --label-weight and its --label-classifier")
    if options.label_weight_floor is not None and not options.label_weight_falls:  # 0 given is given too
        raise TrainingError("--label-weight-floor needs --label-weight-falls")
    if options.label_weight_floor is not None and not options.label_weight_floor < options.label_weight:
        raise TrainingError(
            f"--label-weight-floor {options.label_weight_floor:g} must be below --label-weight {options.label_weight:g}"
        )
    if options.label_digit_weights and not weighted:
        raise TrainingError("--label-digit-weights needs a positive --label-weight and its --label-classifier")
    if not options.label_classifiers:
        if weighted:
            raise TrainingError("--label-weight needs --label-classifier (weights written by train-classifier)")
        return ()
    if not weighted:
        raise TrainingError("--label-classifier needs a positive --label-weight, e.g. --label-weight 0.5")
    models: list[Classifier] = []
    for path in options.label_classifiers:
        model, _accuracy = load_classifier_weights(path)
        if weights_digest(model) == EVALUATOR_WEIGHTS_SHA256:
            raise TrainingError(
                f"{path} holds the evaluator's classifier (classifier_weights.pt); training against it would game "
                "`evaluate`: train another, e.g. `digitgen train-classifier --seed 1 --out label.onnx`"
            )
        if any(_same_weights(model, earlier) for earlier in models):
            raise TrainingError(f"{path} holds the same weights as an earlier --label-classifier: give each once")
        models.append(model)
    return tuple(models)


def _new_state(options: RunOptions, device: torch.device, rank: int, classifiers: tuple[Classifier, ...]) -> TrainState:
    def given(*names: str) -> dict:
        return {name: getattr(options, name) for name in names if getattr(options, name) is not None}

    fixed = {
        part: [name for name, (_flag, kept_in) in FIXED_ON_RESUME.items() if kept_in == part]
        for part in ("train", "config")
    }
    settings = TrainConfig(total_steps=1, **given(*fixed["train"], "checkpoint_every"))
    config = GANConfig(**given(*fixed["config"]))
    return new_state(config, settings, device, rank, classifiers)


def prepare_run(options: RunOptions, device: torch.device, ctx: DistContext) -> PreparedRun:
    """Build or restore the state, check the run directory and load the data; only then, with every
    option checked, claim the run directory (see :class:`RunLock`) and delete an earlier run's files for
    ``--overwrite`` (on the main process). Use the result as a context manager around the training: its
    exit releases the run directory.

    A resumed run keeps its own settings and subset (an option that would change them is an
    error); only the step budget, the learning-rate decay and the checkpoint interval can change
    (the decay is a function of the step, so a resumed run stays exact).
    """
    if options.steps is not None and options.epochs is not None:
        raise TrainingError("give --steps or --epochs, not both")
    classifiers = () if options.resume is not None else label_classifiers(options)
    if options.resume is not None:  # first: the run directory's refusals take the file for a checkpoint
        if not os.path.lexists(options.resume):  # a folder, a pipe or a device is named as one when read
            raise CheckpointError(f"checkpoint not found: {options.resume}")
        with memory_errors_in_words(f"the model of {options.resume} does not fit; resume it where more is free"):
            state = state_from_checkpoint(options.resume, device, ctx.rank)
        _check_resume_options(options, state)
        _check_resume_classifiers(options, state)
        if options.checkpoint_every is not None:
            state.train = replace(state.train, checkpoint_every=options.checkpoint_every)
    else:
        with memory_errors_in_words("a model of these widths does not fit; lower --g-width or --d-width"):
            state = _new_state(options, device, ctx.rank, classifiers)
    replaced = claim_run_dir(options, ctx.world_size)
    check_precision(state.train, device)
    data = load_mnist_once(options.data_dir, options.download, ctx, device)
    check_labels(data, state.config.num_classes, f"the training split in {options.data_dir}")
    if state.train.subset is not None:
        if state.train.subset > len(data.images):
            raise TrainingError(
                f"--subset {state.train.subset} is more than the {len(data.images)} training images in "
                f"{options.data_dir}"
            )
        data = MnistTensors(data.images[: state.train.subset], data.labels[: state.train.subset])
    digest = data.sha256()
    _check_same_data(state.train, len(data.images), digest, options.data_dir)
    state.train = replace(state.train, train_images=len(data.images), train_data_sha256=digest)
    global_batch = state.train.batch_size * ctx.world_size
    if global_batch > len(data.images):
        processes = f" ({ctx.world_size} processes x {state.train.batch_size})" if ctx.world_size > 1 else ""
        raise TrainingError(
            f"a batch of {global_batch} images{processes} is more than the {len(data.images)} training images; "
            + ("lower --batch-size" if state.train.subset is None else "lower --batch-size or raise --subset")
        )
    per_epoch = steps_per_epoch(len(data.images), global_batch)
    if options.steps is not None or options.epochs is not None or not options.resume:
        total = options.steps if options.steps is not None else (options.epochs or 1) * per_epoch
        if total > MAX_STEPS:  # --epochs: a --steps past it is refused as it is read
            raise TrainingError(
                f"--epochs {options.epochs} is {total:,} steps ({per_epoch} an epoch), more than the {MAX_STEPS:,} a "
                "run may take; give fewer"
            )
        if total < state.step:
            raise TrainingError(
                f"the resumed run is at step {state.step}, past the {total} steps asked for; "
                "give --steps or --epochs beyond it"
            )
        if options.lr_decay_epochs is None and state.train.lr_decay_steps > total:  # the run's own decay, kept whole
            raise TrainingError(
                f"the resumed run's learning-rate decay ({state.train.lr_decay_steps} steps) is longer than the "
                f"{total} steps asked for; give more steps, or a shorter decay with --lr-decay-epochs"
            )
        # within the new total until a given --lr-decay-epochs replaces it below (kept whole otherwise: checked above)
        state.train = replace(state.train, total_steps=total, lr_decay_steps=min(state.train.lr_decay_steps, total))
    if options.lr_decay_epochs is not None:
        steps = options.lr_decay_epochs * per_epoch
        if not finite_number(steps):  # 1e308 epochs: more steps than a float holds
            raise TrainingError(_decay_too_long(options.lr_decay_epochs, None, state.train.total_steps, per_epoch))
        decay = round(steps)
        if decay == 0 and options.lr_decay_epochs > 0:
            raise TrainingError(
                f"--lr-decay-epochs {options.lr_decay_epochs:g} is less than one step ({per_epoch} steps an epoch); "
                f"give at least {1 / per_epoch:.2g}, or 0 for no decay"
            )
        if decay > state.train.total_steps:
            raise TrainingError(_decay_too_long(options.lr_decay_epochs, decay, state.train.total_steps, per_epoch))
        state.train = replace(state.train, lr_decay_steps=decay)
    if state.train.label_weight_falls and state.train.lr_decay_steps == 0:
        raise TrainingError(
            "--label-weight-falls needs a learning-rate decay of at least one step: give --lr-decay-epochs"
        )
    lock = on_main_first(
        ctx,
        device,
        lambda: _claim(Path(options.run_dir)),
        "the first process could not claim the run directory (its error says why)",
    )
    try:
        overwritten = on_main_first(
            ctx,
            device,
            lambda: set_aside(replaced, Path(options.run_dir)) if options.overwrite else "",
            "the first process could not set the earlier run aside (its error says why)",
        )
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    resumed = options.resume is not None
    return PreparedRun(state, data, per_epoch, global_batch, overwritten or "", lock, options.run_dir, resumed)


def _claim(run_dir: Path) -> RunLock:
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunLock(run_dir)
