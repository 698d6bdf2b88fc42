"""What ``export --quality`` stores: the headline figures of ``digitgen evaluate --json``, read from its file and
checked (a regular file of at most 1 MiB, numbers in their ranges, the same model scored)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from digitgen.export.errors import ExportError
from digitgen.runtime.evaluate import MNIST_SHA256
from digitgen.runtime.files import readable_file
from digitgen.runtime.generator import MAX_INDEX, default_model_path
from digitgen.runtime.session import model_sha256
from digitgen.runtime.text import finite_number, quoted, read_json

MAX_QUALITY_BYTES = 1 << 20  # what --quality reads at most: evaluate --json writes about 1 kB


class QualityFileError(ExportError, ValueError):
    """The ``--quality`` file cannot be read as an evaluation."""


def read_evaluation(path: str) -> object:
    """The JSON of ``path``, an ``evaluate --json`` output: a regular file (a device or a pipe could never end) of
    at most 1 MiB, read whole (pretty-printed or not), else its last line (the output captured together with the
    lines before it); not JSON's null, which would read as no evaluation at all."""
    file = Path(path)
    if not file.exists():
        raise QualityFileError(f"{path} not found")
    if not readable_file(file):
        raise QualityFileError(f"{path} is not a regular file (a folder, a pipe or a device)")
    try:
        with file.open("rb") as f:
            data = f.read(MAX_QUALITY_BYTES + 1)
    except OSError as exc:
        raise QualityFileError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_QUALITY_BYTES:
        raise QualityFileError(f"{path} is over 1 MiB: not what evaluate --json writes")
    try:
        text = data.decode().strip()
        try:
            parsed = read_json(text)
        except ValueError:
            parsed = read_json(text.splitlines()[-1])
    except (ValueError, IndexError) as exc:  # UnicodeDecodeError is a ValueError
        raise QualityFileError(f"{path} holds no JSON object") from exc
    if parsed is None:
        raise QualityFileError(f"{path} holds no JSON object (null)")
    return parsed


NOT_AN_EVALUATION = "not an evaluation from `digitgen evaluate --json`"


def _number(value: object, name: str, most: float | None = 1.0) -> float:
    """``value`` if it is a finite number from 0 to ``most`` (no bound: ``None``), else :class:`ExportError`:
    accuracies, precision and recall are fractions, FID a distance."""
    if not (finite_number(value) and 0 <= value <= (most or math.inf)):
        bounds = "0 or more" if most is None else f"from 0 to {most:g}"
        raise ExportError(f"{NOT_AN_EVALUATION}: {name} is {value!r}, not a number {bounds}")
    return float(value) + 0.0  # -0.0, which JSON can hold, stored as 0


def _section(evaluation: Mapping[str, object], part: str) -> Mapping[str, object]:
    section = evaluation.get(part)
    if not isinstance(section, Mapping):
        raise ExportError(f"{NOT_AN_EVALUATION}: missing or bad {part!r}")
    return section


def quality_metadata(evaluation: Mapping[str, Mapping[str, object]]) -> dict[str, str]:
    """Headline figures of ``digitgen evaluate --json`` as ``metadata_props`` entries; :class:`ExportError` for a
    figure missing, or not a number in its range (a NaN, an accuracy over 1)."""
    if not isinstance(evaluation, Mapping):
        raise ExportError(f"{NOT_AN_EVALUATION}: a JSON {type(evaluation).__name__}")
    scorer = evaluation.get("classifier_sha256")  # an evaluation older than this record names none
    if scorer is not None and scorer != _evaluator_sha256():
        raise ExportError(
            f"the evaluation was scored by another classifier (sha256 {quoted(scorer)}), not the project's evaluator "
            f"({default_model_path('classifier.onnx').name}): its figures are not the headline scores; evaluate "
            "without --classifier"
        )
    if evaluation.get("truncation") is not None:
        raise ExportError(
            f"the evaluation scored digits drawn with truncation {quoted(evaluation['truncation'])}, not the model's "
            "own distribution; evaluate without --truncation"
        )
    data = evaluation.get("data_sha256")  # none either in an evaluation older than this record
    if data is not None:
        other = [name for name, sha in MNIST_SHA256.items() if not isinstance(data, Mapping) or data.get(name) != sha]
        if other:
            raise ExportError(
                f"the evaluation scored the digits against other data than MNIST's {' and '.join(other)} "
                f"split{'s' if len(other) > 1 else ''} (by its data_sha256): its figures are not the headline "
                "scores; evaluate with --data-dir holding MNIST"
            )
    generated, real = _section(evaluation, "generated"), _section(evaluation, "real")
    samples, per_digit = generated.get("num_samples"), generated.get("per_digit_accuracy")
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_INDEX + 1:
        raise ExportError(f"{NOT_AN_EVALUATION}: generated.num_samples is {samples!r}, not a count of digits")
    if not isinstance(per_digit, list) or not per_digit:
        raise ExportError(f"{NOT_AN_EVALUATION}: generated.per_digit_accuracy is {per_digit!r}, not a list")
    return {
        "quality_num_samples": str(samples),
        "quality_class_accuracy": f"{_number(generated.get('class_accuracy'), 'generated.class_accuracy'):.4f}",
        "quality_min_digit_accuracy": f"{min(_number(a, 'generated.per_digit_accuracy') for a in per_digit):.4f}",
        "quality_fid": f"{_number(generated.get('fid'), 'generated.fid', None):.4f}",
        "quality_precision": f"{_number(generated.get('precision'), 'generated.precision'):.4f}",
        "quality_recall": f"{_number(generated.get('recall'), 'generated.recall'):.4f}",
        "quality_real_fid": f"{_number(real.get('fid'), 'real.fid', None):.4f}",
        "quality_real_precision": f"{_number(real.get('precision'), 'real.precision'):.4f}",
        "quality_real_recall": f"{_number(real.get('recall'), 'real.recall'):.4f}",
    }


def _evaluator_sha256() -> str:
    path = default_model_path("classifier.onnx")
    return model_sha256(path.read_bytes(), path)


def check_scored_model(evaluation: Mapping[str, object], model: Path, shown_as: Path) -> None:
    """Refuse to store ``evaluation``'s figures in ``model`` (to be published as ``shown_as``) unless they were
    measured on the same model: equal bytes, metadata aside (``evaluate --json`` records their hash)."""
    scored = evaluation.get("model_sha256_without_metadata")
    if not isinstance(scored, str):
        raise ExportError(
            "the evaluation does not say which model it scored (no model_sha256_without_metadata): "
            "run `digitgen evaluate --json` on the model again"
        )
    exported = model_sha256(model.read_bytes(), model, with_metadata=False)
    if scored != exported:
        raise ExportError(
            f"the evaluation scored another model than {shown_as} (sha256 without metadata {scored[:12]}..., this "
            f"export {exported[:12]}...): evaluate what `digitgen export` writes from this checkpoint with the same "
            "options and no --quality, then pass that evaluation"
        )
