"""What an interrupted ``train-classifier`` leaves for ``--resume``: the whole training state after a step, in one
file beside the ONNX file it was to write, read back as data only (``weights_only=True``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from digitgen.runtime.encode import ZIP_SIGNATURE
from digitgen.runtime.files import check_writable, refuse_non_files
from digitgen.training.checkpoint import (
    first_problem,
    is_exactly,
    load_optimizer_state,
    read_data_file,
    same_kinds,
    save_checkpoint,
    shown,
)
from digitgen.training.data import MnistTensors
from digitgen.training.errors import CheckpointError

STATE_KIND = "reference classifier training state"
STATE_FORMAT_VERSION = 1
RECIPE_OPTIONS = {"epochs": "--epochs", "batch_size": "batch size", "seed": "--seed"}
START_OVER = "start over with --overwrite"
START_OVER_INSTEAD = "start over with --overwrite in place of --resume"  # the advice of a state --resume cannot use


class UnusableStateError(CheckpointError):
    """A readable training state that cannot be continued: ``finding`` says why, the message adds what
    ``train-classifier`` can do about it."""

    def __init__(self, finding: str, advice: str) -> None:
        super().__init__(f"{finding}{advice}")
        self.finding = finding


def finding(error: CheckpointError) -> str:
    """Why a training state cannot be continued, without ``train-classifier``'s advice."""
    return error.finding if isinstance(error, UnusableStateError) else str(error)


def beside(onnx_path: str | Path, suffix: str) -> Path:
    """``NAME.onnx`` -> ``NAME{suffix}`` in the same folder: the files ``train-classifier`` keeps beside its model."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}{suffix}")


def state_path_beside(onnx_path: str | Path) -> Path:
    """Where ``train-classifier --out NAME.onnx`` keeps its training state until it ends: ``NAME_resume.pt``."""
    return beside(onnx_path, "_resume.pt")


def check_resume(path: Path, resume: bool, overwrite: bool) -> None:
    """Before any work: a state to resume is there when ``resume`` asks for one; one that is there is continued
    (``resume``, with ``overwrite`` too: the run that was told to replace its outputs goes on to replace them) or
    replaced (``overwrite`` alone), never lost by a new run that was given neither; a file of that name that no
    run of this command wrote is refused whatever the options."""
    refuse_non_files([path])
    if path.is_file() and _left_by_another(path):
        raise CheckpointError(
            f"{path} is not a training state of train-classifier, so no run of this command left it there; "
            "move it, or give --out another name"
        )
    if resume and not path.is_file():
        raise CheckpointError(f"nothing to resume: {path} (what an interrupted run of this command leaves) not found")
    if not resume and path.exists() and not overwrite:
        raise CheckpointError(
            f"{path} holds an interrupted run of this command: continue it with --resume, or {START_OVER}"
        )
    check_writable(path)


def _left_by_another(path: Path) -> bool:
    """Whether the file ``path`` is not this command's: not a PyTorch archive (``torch.save`` writes a zip), or a
    readable one of another kind. A damaged state is taken for this command's, which --resume or --overwrite
    then deals with."""
    with path.open("rb") as file:
        if file.read(len(ZIP_SIGNATURE)) != ZIP_SIGNATURE:
            return True
    try:
        payload = read_data_file(path, "nothing to check", "not a readable training state")
    except CheckpointError:
        return False
    return not (isinstance(payload, dict) and payload.get("kind") == STATE_KIND)


def save_state(path: Path, recipe: dict[str, Any], step: int, state: dict[str, Any]) -> None:
    """Write the training ``state`` after ``step`` steps of ``recipe`` (atomically)."""
    payload = {"kind": STATE_KIND, "format_version": STATE_FORMAT_VERSION, "recipe": recipe, "step": step, **state}
    save_checkpoint(payload, path)


def recipe_of(train: MnistTensors, epochs: int, batch_size: int, seed: int) -> dict[str, Any]:
    """What a training state must have been trained with to be resumed: the options and the training data."""
    return {"epochs": epochs, "batch_size": batch_size, "seed": seed, "data": train.sha256()}


def load_state(path: Path, recipe: dict[str, Any], total: int) -> dict[str, Any]:
    """The state in ``path``, saved after a step (``payload["step"]``, the last one too) of the ``total`` of
    ``recipe`` (the same options and training data); :class:`CheckpointError` in words otherwise."""
    payload = read_data_file(path, "nothing to resume", "not a readable training state")
    if not isinstance(payload, dict) or payload.get("kind") != STATE_KIND:
        raise CheckpointError(f"{path}: not the training state of train-classifier")
    if not is_exactly(payload.get("format_version"), STATE_FORMAT_VERSION) or not isinstance(
        payload.get("recipe"), dict
    ):
        raise UnusableStateError(
            f"{path}: training state format {shown(payload.get('format_version'))}, this version reads "
            f"{STATE_FORMAT_VERSION}",
            f"; {START_OVER_INSTEAD}",
        )
    theirs = payload["recipe"]
    for key, option in RECIPE_OPTIONS.items():
        if not is_exactly(theirs.get(key), recipe[key]):
            raise UnusableStateError(
                f"{path} is a run of {option} {shown(theirs.get(key))}, not {recipe[key]!r}",
                f": resume it with the options it was started with, or {START_OVER_INSTEAD}",
            )
    if not is_exactly(theirs.get("data"), recipe["data"]):
        raise UnusableStateError(
            f"{path} was trained on other MNIST training images than these",
            f": resume it on its own data (--data-dir), or {START_OVER_INSTEAD}",
        )
    step, order = payload.get("step"), payload.get("order")
    if type(step) is not int or not 0 < step <= total or not isinstance(order, torch.Tensor):
        raise CheckpointError(f"{path}: a damaged training state (step {step!r} of {total})")
    return payload


def training_state(parts: dict[str, Any], rng: torch.Generator, order: torch.Tensor) -> dict[str, Any]:
    """The state of the model, optimizer and schedule in ``parts``, of both random generators and of the epoch's
    ``order``: all that the next step depends on."""
    state = {name: part.state_dict() for name, part in parts.items()}
    return {**state, "rng": rng.get_state(), "torch_rng": torch.get_rng_state(), "order": order}


def restore_state(
    path: Path, payload: dict[str, Any], parts: dict[str, Any], rng: torch.Generator, num_images: int, *, trial: bool
) -> None:
    """Put the state :func:`load_state` read from ``path`` back into ``parts`` and ``rng``, and torch's own generator
    unless ``trial`` (a restore into scratch parts, to see that it restores); :class:`CheckpointError` unless every
    part fits: the epoch's order is one of the ``num_images`` training images each, the optimizer and the schedule
    hold what fresh ones hold, the schedule stands at the state's step."""
    order = payload["order"]
    whole = order.dtype == torch.int64 and order.shape == (num_images,)
    if not whole or not torch.equal(order.sort().values, torch.arange(num_images)):
        problem = f"its epoch's order is not one of the {num_images:,} images each"
        raise CheckpointError(f"{path}: a damaged training state ({problem})")
    try:
        parts["model"].load_state_dict(payload["model"])  # strict: the classifier's own keys and shapes
        load_optimizer_state(parts["optimizer"], payload["optimizer"], "classifier")
        schedule = parts["schedule"]
        fresh = schedule.state_dict()
        schedule.load_state_dict(payload["schedule"])  # takes any dict: checked against a fresh one's below
        if not same_kinds(schedule.state_dict(), fresh):
            raise ValueError("the schedule's state is not that of its kind")
        if schedule.last_epoch != payload["step"]:
            raise ValueError(f"the schedule stands at step {schedule.last_epoch!r}, the state at {payload['step']}")
        rng.set_state(payload["rng"])
        torch.Generator().set_state(payload["torch_rng"])  # checked before it replaces torch's own
        if not trial:
            torch.set_rng_state(payload["torch_rng"])
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: a damaged training state ({first_problem(exc)})") from None
