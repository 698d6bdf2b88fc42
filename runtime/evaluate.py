"""Digit quality in the reference classifier's feature space, torch-free.

- class accuracy: share of samples the classifier assigns to the requested digit (also per digit);
- FID: Fréchet distance between Gaussians fitted to sample and MNIST-test features;
- precision / recall: k-NN manifold estimates (Kynkäänniemi et al. 2019, k=5): the share of
  samples inside the real manifold, and of real images inside the sample manifold.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from digitgen.runtime.errors import InvalidRequestError, ModelContractError, ModelRunError
from digitgen.runtime.generator import (
    IMAGE_SIDE,
    MAX_BATCH_SIZE,
    DigitGenerator,
    check_int,
    check_path,
    default_model_path,
    empty_digits,
    fill_digits,
    shown_array,
)
from digitgen.runtime.session import ORT_ERRORS, open_session, ort_reason, run_model
from digitgen.runtime.text import counted

K_NEAREST = 5
MNIST_CLASSES = 10  # what the reference classifier tells apart
MIN_SAMPLES = 100  # generated digits scored at least: fewer make a meaningless FID
MAX_SAMPLES = 60_000  # generated digits scored at most: as many as the real ones they are compared with
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the largest feature scored: squared and summed, it stays finite
Progress = Callable[[int], None]
Split = tuple[np.ndarray, np.ndarray]  # MNIST images and their labels
# MNIST's own splits by split_sha256: what an evaluation must have scored against for its figures to be the model's
MNIST_SHA256 = {
    "test": "c3f9adf9c66efb572b1f9326c3a511b45910c7173b97be66ceceeeeaef6b802b",
    "train": "edc0d1098aa497be14ace79ddd5171e5a3dcf9c4d196c015389203eb3ba1f59b",
}


class ReferenceClassifier:
    """The shipped MNIST classifier (ONNX): ``image`` [B,1,28,28] -> ``logits`` [B,10], ``features`` [B,D]."""

    def __init__(self, path: str | Path | None = None, provider: str = "cpu") -> None:
        self.path = (
            check_path(path, "the classifier's path") if path is not None else default_model_path("classifier.onnx")
        )
        opened = open_session(self.path, provider)
        self._session, self.sha256 = opened.session, opened.sha256  # which classifier scored: the evaluator or not
        names = ([i.name for i in self._session.get_inputs()], [o.name for o in self._session.get_outputs()])
        if names != (["image"], ["logits", "features"]):
            raise ModelContractError(f"{self.path} is not a digitgen classifier (inputs/outputs {names})")

    def embed(
        self, images: np.ndarray, batch_size: int = 500, progress: Progress = lambda n: None
    ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, 28, 28) -> (features float64 (N, D), predicted classes int64 (N,))."""
        features, predictions = [], []
        for count, (logits, feats) in self._outputs(images, batch_size):
            features.append(feats.astype(np.float64))
            predictions.append(logits.argmax(1))
            progress(count)
        return np.concatenate(features), np.concatenate(predictions)

    def probabilities(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """uint8 (N, 28, 28) -> float64 (N, classes): the softmax of the logits, each row summing to 1."""
        logits = np.concatenate([logits for _, (logits, _) in self._outputs(images, batch_size)]).astype(np.float64)
        exp = np.exp(logits - logits.max(1, keepdims=True))
        return exp / exp.sum(1, keepdims=True)

    def _outputs(self, images: np.ndarray, batch_size: int) -> Iterator[tuple[int, list[np.ndarray]]]:
        """(batch size, (logits, features)) for each batch of ``images``, scaled to [0, 1]."""
        check_images(images, "images")
        batch_size = check_int(batch_size, "batch size", maximum=MAX_BATCH_SIZE)
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size, None].astype(np.float32) / 255.0
            try:
                outputs = run_model(self._session, ["logits", "features"], {"image": batch})
            except ORT_ERRORS as exc:
                raise ModelRunError(f"{self.path}: the classifier failed to run: {ort_reason(exc)}") from exc
            self._check_outputs(len(batch), *outputs)
            yield len(batch), outputs

    def _check_outputs(self, count: int, logits: np.ndarray, features: np.ndarray) -> None:
        """:class:`ModelContractError` unless the outputs are finite float logits (count, 10) and features
        (count, D), D at least 2 (a distance between sets of features needs a covariance)."""
        floats = logits.dtype.kind == "f" and features.dtype.kind == "f"
        shaped = logits.shape == (count, MNIST_CLASSES) and features.ndim == 2 and len(features) == count
        if not floats or not shaped or features.shape[1] < 2:
            raise ModelContractError(
                f"{self.path} is not a digitgen classifier: for {count} images it returned logits "
                f"{logits.dtype} {list(logits.shape)} and features {features.dtype} {list(features.shape)}, "
                f"not float [{count}, 10] and float [{count}, D >= 2]"
            )
        if not (np.isfinite(logits).all() and np.isfinite(features).all()):
            raise ModelContractError(f"{self.path} returned NaN or infinite logits or features; it cannot score")
        largest = float(np.abs(features).max()) if features.size else 0.0
        if largest > FLOAT32_MAX:  # float64 ones: their squares overflow
            raise ModelContractError(
                f"{self.path} returned features beyond float32's range (up to {largest:.3g}); "
                "the distances between them overflow, so it cannot score"
            )


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between feature sets: |mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    sqrt_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum((x * x).sum(1)[:, None] - 2 * x @ y.T + (y * y).sum(1)[None, :], 0)


def knn_radii(x: np.ndarray, k: int = K_NEAREST, chunk: int = 1000, progress: Progress = lambda n: None) -> np.ndarray:
    """Squared distance from each point of ``x`` to its k-th nearest other point of ``x``; ``progress`` is told
    the distances measured, chunk by chunk."""
    radii = np.empty(len(x))
    for i in range(0, len(x), chunk):
        d = _squared_distances(x[i : i + chunk], x)
        radii[i : i + chunk] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
        progress(d.size)
    return radii


def coverage(
    manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray, chunk: int = 1000, progress: Progress = lambda n: None
) -> float:
    """Share of ``queries`` inside at least one k-NN ball of ``manifold``; ``progress`` as for :func:`knn_radii`."""
    inside = 0
    for i in range(0, len(queries), chunk):
        d = _squared_distances(queries[i : i + chunk], manifold)
        inside += int((d <= radii[None, :]).any(1).sum())
        progress(d.size)
    return inside / len(queries)


@dataclass(frozen=True)
class Scores:
    """The evaluator's figures for one sample of digits, generated or real."""

    num_samples: int
    class_accuracy: float
    per_digit_accuracy: list[float | None]  # None: no digit of that class in the sample
    fid: float
    precision: float
    recall: float


def label_accuracy(predictions: np.ndarray, labels: np.ndarray) -> tuple[float, list[float | None]]:
    """The share of predictions equal to the label: overall, and for each digit 0-9 (``None`` for a digit the labels
    lack, as a small real sample may)."""
    per_digit = [
        float((predictions[labels == d] == d).mean()) if (labels == d).any() else None for d in range(MNIST_CLASSES)
    ]
    return float((predictions == labels).mean()), per_digit


def score(
    features: np.ndarray,
    predictions: np.ndarray,
    labels: np.ndarray,
    reference: np.ndarray,
    reference_radii: np.ndarray,
    progress: Progress = lambda n: None,
) -> Scores:
    """Scores of one sample set (features, predicted and requested labels) against the reference; ``progress`` is
    told the feature distances measured."""
    overall, per_digit = label_accuracy(predictions, labels)
    return Scores(
        num_samples=len(labels),
        class_accuracy=overall,
        per_digit_accuracy=per_digit,
        fid=frechet_distance(features, reference),
        precision=coverage(reference, reference_radii, features, progress=progress),
        recall=coverage(features, knn_radii(features, progress=progress), reference, progress=progress),
    )


@dataclass(frozen=True)
class Cas:
    """Classification accuracy score: MNIST test accuracy of the reference architecture trained
    on generated digits, beside the same recipe trained on real ones (``evaluate --cas``)."""

    generated: float
    real: float
    num_generated: int
    num_real: int
    epochs: int

    @property
    def gap(self) -> float:
        """Points of test accuracy lost by training on generated digits instead of real ones."""
        return 100 * (self.real - self.generated)


@dataclass(frozen=True)
class Evaluation:
    """A model's scores beside a real sample's, with what was scored and how (the ``--json`` of ``evaluate``)."""

    generated: Scores
    real: Scores  # an MNIST train sample of the same size, scored the same way
    cas: Cas | None = None
    truncation: float | None = None  # of the generated digits' noise (None: the model's own distribution)
    seed: int | None = None  # of the generated digits and the real sample
    model_sha256: str | None = None  # of the scored model (DigitGenerator.sha256)
    model_sha256_without_metadata: str | None = None  # the same less its metadata, as `export --quality` checks
    classifier_sha256: str | None = None  # of the classifier that scored it (ReferenceClassifier.sha256)
    data_sha256: dict[str, str] | None = None  # of the test and train splits scored against (split_sha256)

    def to_dict(self) -> dict[str, dict | float | str | None]:
        """The figures as plain data, as ``digitgen evaluate --json`` prints them."""
        return asdict(self)

    def table(self) -> str:
        """The evaluation as a Markdown table: generated digits beside the real-data reference."""
        g, r = self.generated, self.real
        rows = [
            ("samples", f"{g.num_samples}", f"{r.num_samples}", ""),
            ("class accuracy", f"{g.class_accuracy:.2%}", f"{r.class_accuracy:.2%}", ""),
            ("worst digit accuracy", _worst(g.per_digit_accuracy), _worst(r.per_digit_accuracy), ""),
            ("FID (classifier features)", f"{g.fid:.3f}", f"{r.fid:.3f}", _ratio(g.fid, r.fid, 2, round_up=True)),
            (
                f"precision (k={K_NEAREST})",
                f"{g.precision:.3f}",
                f"{r.precision:.3f}",
                _ratio(g.precision, r.precision, 3),
            ),
            (f"recall (k={K_NEAREST})", f"{g.recall:.3f}", f"{r.recall:.3f}", _ratio(g.recall, r.recall, 3)),
        ]
        if self.cas is not None:
            c = self.cas
            rows.append(
                (
                    f"CAS (trained on {c.num_generated} / {c.num_real}, tested on MNIST test)",
                    f"{c.generated:.2%}",
                    f"{c.real:.2%}",
                    f"{c.gap:.2f} points below real",
                )
            )
        lines = ["| metric | generated | real (MNIST train sample) | ratio |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in rows]
        per_digit = " ".join(f"{d}:{acc:.1%}" for d, acc in enumerate(g.per_digit_accuracy))
        return "\n".join(lines) + f"\n\nper-digit accuracy (generated): {per_digit}"


def _ratio(generated: float, real: float, decimals: int, round_up: bool = False) -> str:
    """``generated / real`` to ``decimals`` places, rounded toward the worse side (down where more is better, up for
    FID), so that a ratio just short of a target never prints as meeting it (0.9495x is "0.949x", not "0.950x")."""
    scaled = generated / max(real, 1e-12) * 10**decimals
    rounded = math.ceil(scaled - 1e-9) if round_up else math.floor(scaled + 1e-9)  # no float-noise step
    return f"{rounded / 10**decimals:.{decimals}f}x real"


def _worst(per_digit: list[float | None]) -> str:
    digit = min((d for d, accuracy in enumerate(per_digit) if accuracy is not None), key=per_digit.__getitem__)
    return f"{per_digit[digit]:.2%} (digit {digit})"


def split_sha256(split: Split) -> str:
    """sha256 of a split's pixels, then its labels, a byte each: of its IDX files' contents after their headers."""
    images, labels = split
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    digest.update(np.asarray(labels).astype(np.uint8).tobytes())
    return digest.hexdigest()


def evaluation_work(num_test: int, num_train: int, num_samples: int) -> int:
    """Images :func:`evaluate` makes or embeds (its ``progress`` total): test set, samples made and embedded, real
    reference."""
    return num_test + 2 * num_samples + min(num_samples, num_train)


def scoring_work(num_test: int, num_samples: int) -> int:
    """Feature distances :func:`score_samples` measures (its ``progress`` total): the test set's k-NN radii, then
    for the generated and the real sample each, precision (samples x test), their own radii (samples x samples)
    and recall (test x samples). With many samples, the longest part of an evaluation."""
    return num_test * num_test + 2 * (2 * num_samples * num_test + num_samples * num_samples)


def check_evaluation(generator: DigitGenerator, num_samples: int) -> None:
    """Refuse what :func:`evaluate` cannot score, before any work: a model of other classes than MNIST's, a number
    of samples out of range."""
    if generator.num_classes != MNIST_CLASSES:
        raise InvalidRequestError(
            f"{generator.path} has num_classes {generator.num_classes}; "
            f"the evaluator scores MNIST's {MNIST_CLASSES} digits"
        )
    try:
        check_int(num_samples, "num_samples", MIN_SAMPLES, MAX_SAMPLES)
    except InvalidRequestError:
        raise InvalidRequestError(
            f"evaluation needs {MIN_SAMPLES} to {MAX_SAMPLES} samples (as many as MNIST's training digits, the real "
            f"sample they are compared with), got {num_samples!r}"
        ) from None


def check_images(images: object, name: str) -> None:
    """:class:`InvalidRequestError` naming ``name`` unless ``images`` is a uint8 array of one or more digits,
    (N, 28, 28), as the classifier reads them."""
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE)
        or not len(images)
    ):
        shape = f"(N, {IMAGE_SIDE}, {IMAGE_SIDE})"
        raise InvalidRequestError(f"{name} must be a uint8 array of shape {shape}, N >= 1, got {shown_array(images)}")


def check_reference_data(test: Split, train: Split, num_samples: int) -> None:
    """:class:`InvalidRequestError` unless each split holds more than :data:`K_NEAREST` images (a k-NN ball needs
    k other points) and labels that are digits 0-9 (the real sample's accuracy is read from them), and the train
    split at least ``num_samples`` (the real sample is as large as the generated one: FID falls with the size)."""
    for name, (images, labels) in (("test", test), ("train", train)):
        if len(images) <= K_NEAREST:
            raise InvalidRequestError(
                f"the MNIST {name} split holds {len(images)} images; the evaluator needs more than {K_NEAREST}"
            )
        check_images(images, f"the MNIST {name} split's images")
        if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu" or labels.shape != (len(images),):
            raise InvalidRequestError(
                f"the MNIST {name} split's labels must be {counted(len(images), 'integer')}, one for each image, "
                f"got {shown_array(labels)}"
            )
        bad = np.flatnonzero((labels < 0) | (labels >= MNIST_CLASSES))
        if len(bad):
            raise InvalidRequestError(
                f"the MNIST {name} split: item {bad[0]} is labelled {labels[bad[0]]}, not a digit 0-9 "
                f"({counted(len(bad), 'such label')})"
            )
    if len(train[0]) < num_samples:
        fix = (
            f"ask for at most {len(train[0]):,}"
            if len(train[0]) >= MIN_SAMPLES
            else f"an evaluation needs at least {MIN_SAMPLES}: give the whole of MNIST"
        )
        raise InvalidRequestError(
            f"the MNIST train split holds {len(train[0]):,} images, fewer than the {num_samples:,} samples: the real "
            f"sample is as large as the generated one; {fix}"
        )


@dataclass(frozen=True)
class Samples:
    """The classifier's view of an evaluation's digits (:func:`embed_samples`), to score (:func:`score_samples`):
    features and predicted classes of the generated digits and of a real sample of as many, with their labels, the
    test set's features, and what :class:`Evaluation` records of how they were made."""

    generated: tuple[np.ndarray, np.ndarray, np.ndarray]  # features, predictions, labels
    real: tuple[np.ndarray, np.ndarray, np.ndarray]
    reference: np.ndarray  # the test set's features
    provenance: dict[str, object]  # Evaluation's fields other than the scores


def evaluate(
    generator: DigitGenerator,
    classifier: ReferenceClassifier,
    test: Split,
    train: Split,
    *,
    num_samples: int = 10_000,
    seed: int = 0,
    truncation: float | None = None,
    progress: Progress = lambda n: None,
    scoring: Progress = lambda n: None,
) -> Evaluation:
    """Score ``num_samples`` generated digits (classes 0-9 in turn) and a real reference sample: ``progress`` is
    told the images made or embedded (:func:`evaluation_work` in all), then ``scoring`` the feature distances
    measured (:func:`scoring_work`)."""
    samples = embed_samples(
        generator, classifier, test, train, num_samples=num_samples, seed=seed, truncation=truncation, progress=progress
    )
    return score_samples(samples, classifier, progress=scoring)


def embed_samples(
    generator: DigitGenerator,
    classifier: ReferenceClassifier,
    test: Split,
    train: Split,
    *,
    num_samples: int = 10_000,
    seed: int = 0,
    truncation: float | None = None,
    progress: Progress = lambda n: None,
) -> Samples:
    """The first part of :func:`evaluate`: make the digits and embed them, the test set and a real sample."""
    check_evaluation(generator, num_samples)
    check_reference_data(test, train, num_samples)
    request = generator.check_request(num_samples, seed=seed, truncation=truncation)  # as JSON writes them
    seed, truncation = request.seed, request.truncation
    scored = generator.sha256_without_metadata  # before the work: the file is read again to hash it
    batches = generator.iter_batches(num_samples, seed=seed, truncation=truncation)
    fake = fill_digits(batches, *empty_digits(num_samples), progress)
    reference, _ = classifier.embed(test[0], progress=progress)
    fake_features, fake_predictions = classifier.embed(fake.images, progress=progress)
    pick = np.random.default_rng(seed).choice(len(train[0]), size=num_samples, replace=False)
    real_features, real_predictions = classifier.embed(train[0][pick], progress=progress)
    provenance = {
        "truncation": truncation,
        "seed": seed,
        "model_sha256": generator.sha256,
        "model_sha256_without_metadata": scored,
        "classifier_sha256": classifier.sha256,
        "data_sha256": {"test": split_sha256(test), "train": split_sha256(train)},
    }
    generated = (fake_features, fake_predictions, fake.labels)
    return Samples(generated, (real_features, real_predictions, train[1][pick]), reference, provenance)


def score_samples(samples: Samples, classifier: ReferenceClassifier, progress: Progress = lambda n: None) -> Evaluation:
    """The second part of :func:`evaluate`: score the embedded samples; ``progress`` is told the feature distances
    measured (:func:`scoring_work` in all)."""
    try:
        radii = knn_radii(samples.reference, progress=progress)
        scores = [score(*sample, samples.reference, radii, progress) for sample in (samples.generated, samples.real)]
    except np.linalg.LinAlgError as exc:  # features of a classifier no covariance of which numpy can decompose
        raise ModelContractError(f"{classifier.path}: its features cannot be scored ({exc})") from None
    return Evaluation(*scores, **samples.provenance)
