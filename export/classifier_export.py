"""Export the reference classifier to ONNX (inputs ``image``; outputs ``logits``, ``features``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from digitgen.export.errors import ExportVerificationError
from digitgen.export.onnx_export import check_output_files, publish_with_weights, to_onnx, write_metadata
from digitgen.export.tolerances import ATOL
from digitgen.runtime.files import check_writable, refuse_existing, refuse_one_file_twice
from digitgen.runtime.idx import MNIST_FILES, mnist_raw_folder
from digitgen.runtime.session import open_session, run_model
from digitgen.training.checkpoint import write_payload
from digitgen.training.classifier import (
    BATCH_SIZE,
    WEIGHTS_KIND,
    Classifier,
    ClassifierResult,
    check_classifier_data,
    classifier_weights,
    load_classifier_weights,
    load_resumable_state,
    train_classifier,
    training_steps,
    weights_path_beside,
)
from digitgen.training.classifier_resume import check_resume, recipe_of, state_path_beside
from digitgen.training.data import load_mnist

CLASSIFIER_FILE = "classifier.onnx"  # a file name to show in a refusal


def _check_parity(path: Path, model: Classifier) -> float:
    images = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    session = open_session(path, "cpu").session
    logits, features = run_model(session, ["logits", "features"], {"image": images})
    with torch.no_grad():
        expected = [t.numpy() for t in model(torch.from_numpy(images))]
    diff = max(float(np.abs(a - b).max()) for a, b in zip((logits, features), expected, strict=True))
    if not diff <= 10 * ATOL:  # NaN too
        raise ExportVerificationError(f"classifier ONNX differs from PyTorch by {diff:.2e}")
    return diff


def check_classifier_outputs(out: str | Path, overwrite: bool) -> Path:
    """Before any training: ``out`` and the weights beside it (returned) name files that can be written, in an
    existing directory, and replace none unless ``overwrite``."""
    weights = weights_path_beside(check_output_files(out, [], CLASSIFIER_FILE))
    refuse_existing([out, weights], overwrite)
    for path in (out, weights):
        check_writable(path)
    return weights


def export_classifier(
    model: Classifier,
    out: str | Path,
    test_accuracy: float,
    *,
    weights_out: str | Path | None = None,
    overwrite: bool = False,
) -> float:
    """Write ``out`` atomically after a parity check; returns max |torch - ort|.

    ``weights_out`` also writes the model's weights (:func:`~digitgen.training.classifier.classifier_weights`),
    from which :func:`export_classifier_weights` rebuilds ``out``. Existing files are replaced only with
    ``overwrite``.
    """
    out = check_output_files(out, [weights_out], CLASSIFIER_FILE)
    refuse_one_file_twice({"--out": out, "--weights-out": weights_out})
    replaceable = refuse_existing([out, weights_out], overwrite)
    model.eval()
    with publish_with_weights(out, weights_out, replaceable) as (tmp, weights_tmp):
        to_onnx(model, (torch.zeros(2, 1, 28, 28),), tmp, ["image"], ["logits", "features"])
        write_metadata(
            tmp, {"producer": "digitgen", "kind": WEIGHTS_KIND, "mnist_test_accuracy": f"{test_accuracy:.4f}"}
        )
        diff = _check_parity(tmp, model)
        if weights_tmp is not None:
            write_payload(classifier_weights(model, test_accuracy), weights_tmp, weights_out)
    return diff


def export_classifier_weights(weights: str | Path, out: str | Path, *, overwrite: bool = False) -> float:
    """Rebuild the classifier ONNX file ``out`` from a weights file; returns max |torch - ort|."""
    refuse_one_file_twice({"--weights": weights, "--out": out})
    model, test_accuracy = load_classifier_weights(weights)
    return export_classifier(model, out, test_accuracy, overwrite=overwrite)


class ClassifierRun:
    """``train-classifier``: the reference classifier trained on MNIST from ``data_dir`` and exported to ``out``, its
    weights beside it. Every check comes before any training; while it trains, its state is kept beside ``out``
    (``NAME_resume.pt``), so that a stopped run continues with ``resume`` to the same weights."""

    def __init__(
        self,
        data_dir: str | Path,
        out: str | Path,
        *,
        epochs: int,
        seed: int,
        download: bool = False,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.out, self.epochs, self.seed, self.overwrite = Path(out), epochs, seed, overwrite
        self.weights = check_classifier_outputs(out, overwrite)  # before the training, whose result they hold
        self.state = state_path_beside(out)
        data = {f"--data-dir's {name}": mnist_raw_folder(data_dir) / name for name in MNIST_FILES}
        refuse_one_file_twice({**data, "--out": out, "its weights": self.weights, "its state": self.state})
        check_resume(self.state, resume, overwrite)
        self.train = load_mnist(data_dir, download=download)
        self.test = load_mnist(data_dir, train=False)
        check_classifier_data(self.train, self.test)
        self.total = training_steps(len(self.train.images), epochs)
        recipe = recipe_of(self.train, epochs, BATCH_SIZE, seed) if resume else None  # a new run: train_classifier's
        self.resumed = load_resumable_state(self.state, recipe, self.total, len(self.train.images)) if recipe else None

    @property
    def done(self) -> int:
        """Steps an earlier run did, which this one continues from."""
        return self.resumed["step"] if self.resumed else 0

    def run(
        self,
        progress: Callable[[int, int], None] = lambda step, total: None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> tuple[ClassifierResult, float | None]:
        """The training's result and the written file's max |torch - ort|; ``None`` for it if ``should_stop``
        (asked after each step) stopped the training, whose state is then kept for ``resume``."""
        result = train_classifier(
            self.train,
            self.test,
            epochs=self.epochs,
            seed=self.seed,
            progress=progress,
            state_path=self.state,
            resume_from=self.resumed,
            should_stop=should_stop,
        )
        if result.test_accuracy is None:
            return result, None
        diff = export_classifier(
            result.model, self.out, result.test_accuracy, weights_out=self.weights, overwrite=self.overwrite
        )
        self.state.unlink(missing_ok=True)
        return result, diff
