"""Where generated digits differ from MNIST's: recall by digit, and the size of each digit's box.

    python benchmarks/digit_shape.py [--data-dir ../shared/datasets] [MODEL.onnx ...]

``digitgen evaluate`` gives one recall: the share of MNIST test digits that fall inside the k-NN ball
(k=5, reference classifier features) of some generated digit. This splits it by the test digit's class,
for a real training sample of the same size and for each model's ``evaluate`` sample (10,000 digits,
classes 0-9 in turn, seed 0; default: the shipped model). MNIST scaled every digit so that the larger
side of its box is 20 pixels, then centred it in 28x28; the second table shows how often a digit's
larger side (pixels above a threshold) is 20 pixels, and the range that holds 90% of them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import describe  # noqa: E402
from digitgen.runtime.evaluate import ReferenceClassifier, coverage, knn_radii  # noqa: E402
from digitgen.runtime.generator import DigitGenerator  # noqa: E402
from digitgen.runtime.idx import read_idx  # noqa: E402

SAMPLES = 10_000
MNIST_BOX = 20  # pixels: the larger side of every MNIST digit's box


def recall_by_digit(
    features: np.ndarray, radii: np.ndarray, reference: np.ndarray, reference_labels: np.ndarray
) -> list[float]:
    """For each class, the share of its reference digits inside a k-NN ball (``radii``) of ``features``."""
    return [coverage(features, radii, reference[reference_labels == digit]) for digit in range(10)]


def _spans(present: np.ndarray) -> np.ndarray:
    """For each row of booleans, the count from its first true to its last (0 when none is)."""
    first = present.argmax(1)
    last = present.shape[1] - 1 - present[:, ::-1].argmax(1)
    return np.where(present.any(1), last - first + 1, 0)


def box_sides(images: np.ndarray, threshold: int) -> np.ndarray:
    """The larger side, in pixels, of each (N, 28, 28) image's box around its pixels above ``threshold``."""
    ink = images > threshold
    return np.maximum(_spans(ink.any(1)), _spans(ink.any(2)))


@click.command()
@click.option("--data-dir", default="../shared/datasets", show_default=True, help="torchvision root (MNIST/raw/).")
@click.argument("models", nargs=-1, type=click.Path(exists=True, dir_okay=False))
def main(data_dir: str, models: tuple[str, ...]) -> None:
    raw = Path(data_dir) / "MNIST" / "raw"
    test_images, test_labels = read_idx(raw / "t10k-images-idx3-ubyte"), read_idx(raw / "t10k-labels-idx1-ubyte")
    train_images = read_idx(raw / "train-images-idx3-ubyte")
    pick = np.random.default_rng(0).choice(len(train_images), size=SAMPLES, replace=False)  # as evaluate does
    samples = {"real (MNIST train sample)": train_images[pick]}
    for model in models or (None,):
        generator = DigitGenerator.from_path(model)
        samples[model or "shipped model"] = generator.generate(SAMPLES, seed=0).images
    classifier = ReferenceClassifier()
    reference, _ = classifier.embed(test_images)
    print(f"machine: {describe()}; reference: the {len(test_labels):,} MNIST test digits\n")
    print("| sample | recall | " + " | ".join(f"test {d}" for d in range(10)) + " |")
    print("|---|---|" + "---|" * 10)
    for name, images in samples.items():
        features, _ = classifier.embed(images)
        radii = knn_radii(features)
        by_digit = recall_by_digit(features, radii, reference, test_labels)
        overall = coverage(features, radii, reference)
        print(f"| {name} | {overall:.3f} | " + " | ".join(f"{r:.3f}" for r in by_digit) + " |", flush=True)
    print(f"\n| sample (MNIST test too) | larger side {MNIST_BOX} px, ink > 0 | 90% within | ink > 127 | 90% within |")
    print("|---|---|---|---|---|")
    for name, images in {"MNIST test": test_images, **samples}.items():
        cells = []
        for threshold in (0, 127):
            sides = box_sides(images, threshold)
            low, high = np.percentile(sides, [5, 95])
            cells += [f"{(sides == MNIST_BOX).mean():.1%}", f"{low:.0f}-{high:.0f} px"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
