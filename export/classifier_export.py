"""Export the reference classifier to ONNX (inputs ``image``; outputs ``logits``, ``features``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from digitgen.export.errors import ExportError, ExportVerificationError
from digitgen.export.onnx_export import publish_with_weights, to_onnx, write_metadata
from digitgen.export.verify import ATOL
from digitgen.runtime.files import check_writable, refuse_existing, refuse_one_file_twice
from digitgen.runtime.session import open_session, run_model
from digitgen.training.checkpoint import write_payload
from digitgen.training.classifier import (
    WEIGHTS_KIND,
    Classifier,
    classifier_weights,
    load_classifier_weights,
    weights_path_beside,
)


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


def check_classifier_out(out: str | Path) -> Path:
    """``out`` as a path; :class:`ExportError` unless it names a file in an existing directory."""
    out = Path(out)
    if out.is_dir() or not out.parent.is_dir():
        raise ExportError(f"output {out}: give a file name in an existing directory, such as classifier.onnx")
    return out


def check_classifier_outputs(out: str | Path, overwrite: bool) -> Path:
    """Before any training: ``out`` and the weights beside it (returned) name files that can be written, in an
    existing directory, and replace none unless ``overwrite``."""
    weights = weights_path_beside(check_classifier_out(out))
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
    out = check_classifier_out(out)
    refuse_one_file_twice({"--out": out, "--weights-out": weights_out})
    refuse_existing([out, weights_out], overwrite)
    model.eval()
    with publish_with_weights(out, weights_out) as (tmp, weights_tmp):
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
