"""Reference MNIST classifier for the evaluator: its logits score class accuracy, its penultimate
features define the space for FID, precision and recall."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from digitgen.training.checkpoint import is_exactly, read_data_file, shown
from digitgen.training.classifier_resume import (
    beside,
    load_state,
    recipe_of,
    restore_state,
    save_state,
    training_state,
)
from digitgen.training.data import MnistTensors, check_labels
from digitgen.training.errors import CheckpointError, TrainingError

FEATURE_DIM = 128
WEIGHTS_KIND = "reference classifier"
WEIGHTS_FORMAT_VERSION = 1
NUM_CLASSES = 10  # the reference classifier reads digits 0-9


class Classifier(nn.Module):
    """(B, 1, 28, 28) pixels in [0, 1] -> (logits (B, 10), features (B, 128))."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(1, 32), *block(32, 32), nn.MaxPool2d(2),  # (B, 32, 14, 14)
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),  # (B, 64, 7, 7)
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, FEATURE_DIM),
            nn.ReLU(inplace=True),  # (B, 128): the feature space
        )  # fmt: skip
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(images)
        return self.head(self.dropout(features)), features


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill): cheap, label-preserving."""
    padded = F.pad(images, (max_shift,) * 4)
    shifts = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    return torch.stack([p[:, dy : dy + 28, dx : dx + 28] for p, (dy, dx) in zip(padded, shifts.tolist(), strict=True)])


@dataclass(frozen=True)
class ClassifierResult:
    """A trained (or stopped) classifier, its test accuracy and its time."""

    model: Classifier
    test_accuracy: float | None  # None: stopped before the end (see train_classifier)
    seconds: float
    step: int  # steps trained, by this call or before it (a resumed run's)


@torch.no_grad()
def accuracy(model: Classifier, data: MnistTensors, batch_size: int = 1000) -> float:
    """The share of ``data`` that ``model`` labels right."""
    model.eval()
    correct = 0
    for i in range(0, len(data.images), batch_size):
        logits, _ = model(data.images[i : i + batch_size].unsqueeze(1).float() / 255.0)
        correct += int((logits.argmax(1) == data.labels[i : i + batch_size]).sum())
    return correct / len(data.images)


BATCH_SIZE = 128


def training_steps(num_images: int, epochs: int, batch_size: int = BATCH_SIZE) -> int:
    """Optimizer steps of :func:`train_classifier` (for progress bars)."""
    return epochs * (num_images // batch_size)


def check_classifier_data(train: MnistTensors, test: MnistTensors, batch_size: int = BATCH_SIZE) -> None:
    """:class:`TrainingError` unless the splits can train and score the classifier (before any work)."""
    if len(test.images) == 0:
        raise TrainingError("the test split holds no images; the classifier's accuracy is measured on it")
    check_labels(train, NUM_CLASSES, "the training split")
    check_labels(test, NUM_CLASSES, "the test split")
    if len(train.images) < batch_size:
        raise TrainingError(
            f"a batch of {batch_size} images is more than the {len(train.images)} training images; "
            "the classifier needs a larger training split"
        )


def _training_parts(total: int) -> dict[str, Any]:
    """A fresh classifier, its Adam optimizer and its one-cycle schedule over ``total`` steps (the optimizer's
    learning rate is the schedule's, set at every step)."""
    model = Classifier()
    optimizer = torch.optim.Adam(model.parameters())
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=total)
    return {"model": model, "optimizer": optimizer, "schedule": schedule}


def load_resumable_state(path: Path, recipe: dict[str, Any], total: int, num_images: int) -> dict[str, Any]:
    """What :func:`~digitgen.training.classifier_resume.load_state` reads from ``path``, once restoring it into
    scratch parts has shown that :func:`train_classifier` can continue it; :class:`CheckpointError` otherwise, so
    that a damaged state is found before any work rather than at its first step."""
    payload = load_state(path, recipe, total)
    with torch.random.fork_rng(devices=[]):  # the scratch classifier's initial weights draw from torch's generator
        restore_state(path, payload, _training_parts(total), torch.Generator(), num_images, trial=True)
    return payload


def train_classifier(
    train: MnistTensors,
    test: MnistTensors,
    *,
    epochs: int = 4,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    progress: Callable[[int, int], None] = lambda step, total: None,
    state_path: Path | None = None,
    resume_from: dict[str, Any] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> ClassifierResult:
    """Adam with a one-cycle schedule and +-2 px shifts; returns the model and its test accuracy.

    With ``state_path``, the training state is written there after each epoch (the last too: a stop during the test
    or the export that follows then keeps the whole training), and after the step at which ``should_stop`` (asked
    after each step) says to stop: the result then has no test accuracy.
    ``resume_from`` (what :func:`load_resumable_state` read from that file for this
    recipe) continues to the weights of a run never stopped; removing the file is the caller's."""
    check_classifier_data(train, test, batch_size)
    torch.manual_seed(seed)
    steps_per_epoch = len(train.images) // batch_size
    total = training_steps(len(train.images), epochs, batch_size)
    parts = _training_parts(total)
    model, optimizer, schedule = parts["model"], parts["optimizer"], parts["schedule"]
    rng = torch.Generator().manual_seed(seed)
    step, order, recipe = 0, torch.empty(0, dtype=torch.int64), {}
    if resume_from is not None:
        if state_path is None:
            raise TrainingError("a resumed training writes its state at state_path; none was given")
        restore_state(state_path, resume_from, parts, rng, len(train.images), trial=False)
        step, order, recipe = resume_from["step"], resume_from["order"], resume_from["recipe"]  # load_state checked it
    elif state_path is not None:
        recipe = recipe_of(train, epochs, batch_size, seed)
    start = time.perf_counter()
    model.train()
    while step < total:
        position = step % steps_per_epoch
        if position == 0:
            order = torch.randperm(len(train.images), generator=rng)
        idx = order[position * batch_size : (position + 1) * batch_size]
        images = random_shift(train.images[idx].unsqueeze(1).float() / 255.0, 2, rng)
        loss = F.cross_entropy(model(images)[0], train.labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        progress(step, total)
        stop = should_stop()
        if state_path is not None and (stop or step % steps_per_epoch == 0):
            save_state(state_path, recipe, step, training_state(parts, rng, order))
        # at the last step too, where a state is kept: the accuracy and what follows are then the resumed run's
        if stop and (step < total or state_path is not None):
            return ClassifierResult(model.eval(), None, time.perf_counter() - start, step)
    return ClassifierResult(model.eval(), accuracy(model, test), time.perf_counter() - start, step)


def weights_path_beside(onnx_path: str | Path) -> Path:
    """Where ``train-classifier`` keeps the weights of ``NAME.onnx``: ``NAME_weights.pt`` beside it."""
    return beside(onnx_path, "_weights.pt")


def classifier_weights(model: Classifier, test_accuracy: float) -> dict[str, Any]:
    """The weights file's payload: the state dict and its self-description (reads back with ``weights_only``)."""
    return {
        "format_version": WEIGHTS_FORMAT_VERSION,
        "kind": WEIGHTS_KIND,
        "mnist_test_accuracy": float(test_accuracy),
        "classifier": model.state_dict(),
    }


def load_classifier_weights(path: str | Path) -> tuple[Classifier, float]:
    """The classifier of a weights file (in eval mode) and its MNIST test accuracy; :class:`CheckpointError` if
    the file is missing, unreadable or not classifier weights."""
    payload = read_data_file(path, "classifier weights not found", "not a readable PyTorch weights file")
    if (
        not isinstance(payload, dict)
        or payload.get("kind") != WEIGHTS_KIND
        or not isinstance(payload.get("mnist_test_accuracy"), float)
        or not 0 <= payload["mnist_test_accuracy"] <= 1  # NaN too: an accuracy is a share of the test images
    ):
        raise CheckpointError(f"{path}: not digitgen classifier weights (see `digitgen train-classifier`)")
    if not is_exactly(payload.get("format_version"), WEIGHTS_FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: classifier weights format {shown(payload.get('format_version'))}, this version reads "
            f"{WEIGHTS_FORMAT_VERSION}"
        )
    model = Classifier()
    try:
        model.load_state_dict(payload["classifier"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: classifier weights do not fit the reference architecture") from exc
    if not all(torch.isfinite(tensor).all() for tensor in model.state_dict().values() if tensor.is_floating_point()):
        raise CheckpointError(f"{path}: classifier weights hold NaN or infinite values")
    return model.eval(), payload["mnist_test_accuracy"]
