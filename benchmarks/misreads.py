"""The generated digits the evaluator misreads, and how a second classifier reads the same digits.

    python benchmarks/misreads.py --second label_classifier.onnx MODEL.onnx [MODEL.onnx ...]

``train --label-classifier`` pulls each generated digit towards its label through a frozen classifier's
cross-entropy. That term can only move a digit the frozen classifier finds wrong: if it reads the
evaluator's misreads as right, a larger weight cannot help; if it reads them as wrong too, the term sees
them, and what keeps them is the term's weight against the adversarial loss. For each model's
``evaluate`` sample (10,000 digits, classes 0-9 in turn, seed 0) this prints how many digits each
classifier misreads and how many both do, the second classifier's probability of the right digit on
the evaluator's misreads, and, per digit, what the evaluator read its misreads as.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import describe  # noqa: E402
from digitgen.runtime.evaluate import ReferenceClassifier  # noqa: E402
from digitgen.runtime.generator import DigitGenerator  # noqa: E402

SAMPLES, SEED = 10_000, 0


def misread_report(labels: np.ndarray, evaluator: np.ndarray, second: np.ndarray) -> list[str]:
    """Lines comparing two classifiers' probabilities (N, classes) on digits whose true classes are ``labels``."""
    read, second_read = evaluator.argmax(1), second.argmax(1)
    wrong, second_wrong = read != labels, second_read != labels
    right_probability = second[np.arange(len(labels)), labels][wrong]
    lines = [
        f"evaluator misreads {wrong.sum()} of {len(labels)}, the second classifier {second_wrong.sum()}, "
        f"both {(wrong & second_wrong).sum()}"
    ]
    if wrong.any():
        lines.append(
            f"on the evaluator's misreads the second classifier gives the right digit a median probability of "
            f"{np.median(right_probability):.2f}, over 0.5 on {(right_probability > 0.5).sum()}, "
            f"over 0.9 on {(right_probability > 0.9).sum()}"
        )
    for digit in range(evaluator.shape[1]):
        mine = wrong & (labels == digit)
        if mine.any():
            counts = np.bincount(read[mine], minlength=evaluator.shape[1])
            as_what = ", ".join(f"{n} as {other}" for other, n in enumerate(counts) if n)
            lines.append(f"digit {digit}: {mine.sum()} misread ({as_what})")
    return lines


@click.command()
@click.option(
    "--second",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A second classifier's ONNX file (e.g. train-classifier --seed 1), read beside the evaluator's.",
)
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def main(second: str, models: tuple[str, ...]) -> None:
    print(describe())
    evaluator, other = ReferenceClassifier(), ReferenceClassifier(second)
    for model in models:
        digits = DigitGenerator.from_path(model, threads=1).generate(SAMPLES, seed=SEED)
        print(f"{model}:")
        images = digits.images
        for line in misread_report(digits.labels, evaluator.probabilities(images), other.probabilities(images)):
            print(f"  {line}")


if __name__ == "__main__":
    main()
