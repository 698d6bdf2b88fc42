"""The evaluator: metric maths on known inputs, and the CLI end to end on tiny data."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import digitgen.runtime.evaluate as evaluate_module
from digitgen.cli import main
from digitgen.runtime import DigitGenerator, InvalidRequestError, ModelContractError, default_model_path
from digitgen.runtime.evaluate import (
    MNIST_SHA256,
    Evaluation,
    ReferenceClassifier,
    Scores,
    check_reference_data,
    coverage,
    evaluate,
    evaluation_work,
    frechet_distance,
    knn_radii,
    label_accuracy,
    score,
    scoring_work,
    split_sha256,
)
from digitgen.runtime.idx import read_mnist_split
from tests.conftest import SHARED_MNIST


def test_fid_is_zero_for_identical_sets_and_grows_with_a_shift() -> None:
    a = np.random.default_rng(0).standard_normal((2000, 8))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    shift = np.full(8, 0.5)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_fid_matches_closed_form_for_scaled_gaussians() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((50_000, 4)), 2 * rng.standard_normal((50_000, 4))
    # N(0, I) vs N(0, 4I): tr(I + 4I - 2 * 2I) = 4 * (1 + 4 - 4) = 4
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)


def test_precision_and_recall_of_same_and_disjoint_sets() -> None:
    rng = np.random.default_rng(2)
    real = rng.standard_normal((500, 4))
    radii = knn_radii(real)
    assert coverage(real, radii, real) == 1.0
    assert coverage(real, radii, real + 100.0) == 0.0
    half = np.concatenate([real[:250], real[:250] + 100.0])
    assert coverage(real, radii, half) == pytest.approx(0.5)


def evaluate_args(generator: Path, classifier: Path, data_dir: Path) -> list[str]:
    """`digitgen evaluate` on the tiny models, 100 samples."""
    models = ["--generator", str(generator), "--classifier", str(classifier)]
    return ["evaluate", *models, "--data-dir", str(data_dir), "--num-samples", "100"]


def test_evaluate_cli_prints_json_and_table(tiny_onnx: Path, tiny_classifier: Path, tiny_mnist: Path) -> None:
    args = evaluate_args(tiny_onnx, tiny_classifier, tiny_mnist)
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output.strip().splitlines()[-1])
    for part in ("generated", "real"):
        assert set(scores[part]) == {
            "num_samples",
            "class_accuracy",
            "per_digit_accuracy",
            "fid",
            "precision",
            "recall",
        }
        assert len(scores[part]["per_digit_accuracy"]) == 10 and scores[part]["fid"] >= 0
    assert (scores["cas"], scores["truncation"]) == (None, None)
    # what the progress counts: 64 test images scored, 100 samples made and scored, 100 real ones scored; then the
    # feature distances, which at 60,000 samples take most of the time: 64 x 64, and for each sample 2 x 100 x 64
    # and 100 x 100
    assert result.stderr.splitlines()[0] == "evaluating (images made or scored): 364 to do"
    assert result.stderr.splitlines()[1] == "scoring (feature distances measured): 49,696 to do"
    table = CliRunner().invoke(main, args)
    assert table.exit_code == 0 and "| class accuracy |" in table.output and "x real" in table.output


def test_evaluate_without_data_is_a_clear_error(tiny_onnx: Path, tiny_classifier: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["evaluate", "--generator", str(tiny_onnx), "--classifier", str(tiny_classifier), "--data-dir", str(tmp_path)],
    )
    assert result.exit_code == 1 and result.output.strip().startswith("Error: MNIST not found")
    assert result.output.strip().endswith("; point --data-dir (or MNIST_ROOT) at the folder that holds MNIST/raw/")


@pytest.mark.parametrize("samples", ["99", "60001", "100000000"])
def test_the_cli_refuses_a_number_of_samples_in_one_line_before_any_progress(
    tiny_onnx: Path, tiny_classifier: Path, tiny_mnist: Path, samples: str
) -> None:
    args = evaluate_args(tiny_onnx, tiny_classifier, tiny_mnist)
    result = CliRunner().invoke(main, [*args[:-1], samples])
    assert result.exit_code == 2 and result.output == (  # a usage error, as every other number out of range
        f"Error: Invalid value for '--num-samples': {samples} is not in the range 100<=x<=60000. (see --help)\n"
    )


def test_the_cli_refuses_too_small_a_train_split_before_any_progress(
    tiny_onnx: Path, tiny_classifier: Path, tiny_mnist: Path
) -> None:
    args = evaluate_args(tiny_onnx, tiny_classifier, tiny_mnist)
    result = CliRunner().invoke(main, [*args[:-1], "1000"])  # the tiny train split holds 256
    assert result.exit_code == 1 and result.output.startswith(
        "Error: the MNIST train split holds 256 images, fewer than the 1,000 samples"
    )
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_export_stores_evaluation_as_metadata(
    tmp_path: Path, tiny_onnx: Path, tiny_classifier: Path, tiny_mnist: Path, tiny_checkpoint: Path
) -> None:
    from digitgen.runtime import DigitGenerator
    from digitgen.runtime.evaluate import ReferenceClassifier

    quality, out = tmp_path / "quality.json", tmp_path / "g.onnx"
    export = ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--quality", str(quality)]
    # scored by another classifier than the evaluator: not the model's headline scores
    quality.write_text(
        CliRunner().invoke(main, [*evaluate_args(tiny_onnx, tiny_classifier, tiny_mnist), "--json"]).output
    )
    result = CliRunner().invoke(main, export)
    assert result.exit_code == 1 and result.output.startswith("Error: the evaluation was scored by another classifier")
    assert "not the headline scores; evaluate without --classifier" in result.output and not out.exists()
    by_evaluator = ["evaluate", "--generator", str(tiny_onnx), "--data-dir", str(tiny_mnist), "--num-samples", "100"]
    evaluation = CliRunner().invoke(main, [*by_evaluator, "--json"])
    scored = json.loads(evaluation.output.strip().splitlines()[-1])
    # scored against the tiny data, not MNIST's splits: not the model's headline scores either
    assert scored["data_sha256"] == {
        "test": split_sha256(read_mnist_split(tiny_mnist, "t10k")),
        "train": split_sha256(read_mnist_split(tiny_mnist, "train")),
    }
    quality.write_text(evaluation.output)
    result = CliRunner().invoke(main, export)
    assert (result.exit_code, result.output) == (
        1,
        "Error: the evaluation scored the digits against other data than MNIST's test and train splits (by its "
        "data_sha256): its figures are not the headline scores; evaluate with --data-dir holding MNIST\n",
    )
    assert not out.exists()
    quality.write_text(json.dumps({**scored, "data_sha256": {**MNIST_SHA256, "train": "0" * 64}}))
    result = CliRunner().invoke(main, export)
    assert result.exit_code == 1 and "other data than MNIST's train split (by" in result.output, result.output
    scored["data_sha256"] = MNIST_SHA256  # as if scored against MNIST
    quality.write_text(json.dumps(scored))
    result = CliRunner().invoke(main, export)
    assert result.exit_code == 0, result.output
    metadata = DigitGenerator.from_path(out, "cpu").info.metadata
    assert float(metadata["quality_fid"]) == pytest.approx(scored["generated"]["fid"], abs=5e-5)  # 4 decimals
    assert metadata["quality_num_samples"] == "100"
    evaluated = DigitGenerator.from_path(tiny_onnx, "cpu")
    assert (scored["seed"], scored["model_sha256"], scored["model_sha256_without_metadata"]) == (
        0,
        evaluated.sha256,
        evaluated.sha256_without_metadata,
    )
    assert scored["classifier_sha256"] == ReferenceClassifier().sha256
    assert DigitGenerator.from_path(out, "cpu").sha256_without_metadata == evaluated.sha256_without_metadata

    # figures measured on another model are refused: here the fp32 model's, for an fp16 export
    half = tmp_path / "half.onnx"
    args = ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(half), "--quality", str(quality)]
    result = CliRunner().invoke(main, [*args, "--precision", "fp16"])
    assert result.exit_code == 1 and result.output.startswith(
        f"Error: the evaluation scored another model than {half} (sha256 without metadata "
        f"{evaluated.sha256_without_metadata[:12]}..., this export "
    ), result.output
    assert not half.exists()
    quality.write_text(json.dumps({key: value for key, value in scored.items() if not key.startswith("model_")}))
    result = CliRunner().invoke(main, args)
    assert (result.exit_code, result.output) == (
        1,
        "Error: the evaluation does not say which model it scored (no model_sha256_without_metadata): run `digitgen "
        "evaluate --json` on the model again\n",
    )
    assert not half.exists()

    quality.write_text('{"unrelated": 1}')
    result = CliRunner().invoke(
        main,
        ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "h.onnx"), "--quality", str(quality)],
    )
    assert result.exit_code == 1 and "not an evaluation" in result.output
    assert not (tmp_path / "h.onnx").exists()

    # scores of truncated digits are not the model's: refused, not stored as its quality
    args = [*by_evaluator, "--truncation", "0.5", "--json"]
    truncated = CliRunner().invoke(main, args)
    assert json.loads(truncated.output.strip().splitlines()[-1])["truncation"] == 0.5
    quality.write_text(truncated.output.strip().splitlines()[-1])
    result = CliRunner().invoke(
        main,
        ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "h.onnx"), "--quality", str(quality)],
    )
    assert (result.exit_code, result.output) == (
        1,
        "Error: the evaluation scored digits drawn with truncation 0.5, not the model's own distribution; evaluate "
        "without --truncation\n",
    )
    assert not (tmp_path / "h.onnx").exists()


def test_a_split_is_hashed_as_its_idx_files_hold_it_after_their_headers(tiny_mnist: Path) -> None:
    raw = tiny_mnist / "MNIST" / "raw"
    images, labels = (raw / "t10k-images-idx3-ubyte").read_bytes(), (raw / "t10k-labels-idx1-ubyte").read_bytes()
    expected = hashlib.sha256(images[16:] + labels[8:]).hexdigest()
    assert split_sha256(read_mnist_split(tiny_mnist, "t10k")) == expected


SPLITS = (("test", "t10k"), ("train", "train"))


@pytest.mark.skipif(
    not (SHARED_MNIST / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file(), reason="MNIST is not beside the repo"
)
def test_mnist_sha256_names_the_real_mnist_splits() -> None:
    assert {name: split_sha256(read_mnist_split(SHARED_MNIST, split)) for name, split in SPLITS} == MNIST_SHA256


def test_knn_radius_is_the_fifth_neighbour() -> None:
    line = np.arange(21, dtype=np.float64)[:, None]
    radii = knn_radii(line)
    assert radii[10] == 9.0  # neighbours at 1, 1, 2, 2, 3: the fifth is 3 away
    assert radii[0] == 25.0  # an end point's fifth neighbour is 5 away


def test_scores_on_hand_made_predictions_and_features() -> None:
    labels = np.repeat(np.arange(10), 10)
    correct = np.concatenate([np.arange(10) < d for d in range(10)])  # digit d: d of its 10 right
    predictions = np.where(correct, labels, (labels + 1) % 10)
    reference = np.stack([np.arange(100.0), np.zeros(100)], axis=1)  # points on a line, 1 apart
    near, far = reference[:50], reference[:50] + np.array([1000.0, 0.0])
    scores = score(np.concatenate([near, far]), predictions, labels, reference, knn_radii(reference))
    assert scores.num_samples == 100
    assert scores.class_accuracy == pytest.approx(0.45)
    assert scores.per_digit_accuracy == pytest.approx([d / 10 for d in range(10)])
    assert scores.precision == pytest.approx(0.5)  # the near half lies on the reference, the far half nowhere
    # reference 0..49 coincide with samples; 50..54 lie within 5 of sample 49, whose fifth neighbour is 5 away
    assert scores.recall == pytest.approx(0.55)
    a, b = reference[:, 0], np.concatenate([near, far])[:, 0]  # the second coordinate is constant
    expected = (a.mean() - b.mean()) ** 2 + a.var(ddof=1) + b.var(ddof=1) - 2 * np.sqrt(a.var(ddof=1) * b.var(ddof=1))
    assert scores.fid == pytest.approx(expected, rel=1e-9)


def test_chunked_neighbours_and_coverage_match_one_pass() -> None:
    points = np.random.default_rng(3).standard_normal((40, 3)) * 0.1  # distances well below 1
    radii = knn_radii(points)
    assert np.array_equal(knn_radii(points, chunk=7), radii)
    assert radii.max() < 0.5  # squared distances are not floored at 1
    queries = np.concatenate([points[:10], points[:10] + 50.0])
    assert coverage(points, radii, queries, chunk=3) == coverage(points, radii, queries) == 0.5


def _scores(accuracy: float, fid: float, precision: float, recall: float) -> Scores:
    per_digit = [accuracy] * 10
    per_digit[7] = accuracy - 0.05
    return Scores(10_000, accuracy, per_digit, fid, precision, recall)


def test_table_prints_every_figure_beside_the_real_reference() -> None:
    table = Evaluation(_scores(0.99, 15.4, 0.912, 0.885), _scores(0.997, 3.3, 0.944, 0.955)).table()
    assert table.splitlines() == [
        "| metric | generated | real (MNIST train sample) | ratio |",
        "|---|---|---|---|",
        "| samples | 10000 | 10000 |  |",
        "| class accuracy | 99.00% | 99.70% |  |",
        "| worst digit accuracy | 94.00% (digit 7) | 94.70% (digit 7) |  |",
        "| FID (classifier features) | 15.400 | 3.300 | 4.67x real |",
        "| precision (k=5) | 0.912 | 0.944 | 0.966x real |",
        "| recall (k=5) | 0.885 | 0.955 | 0.926x real |",
        "",
        "per-digit accuracy (generated): " + " ".join(f"{d}:{'94.0' if d == 7 else '99.0'}%" for d in range(10)),
    ]


@pytest.mark.parametrize(
    ("fid", "precision", "recall", "shown"),
    [
        (8.253, 0.9495, 0.95, ("2.51x real", "0.949x real", "0.950x real")),  # just short of 2.5x and 0.95x: short
        (8.25, 0.95, 1.0, ("2.50x real", "0.950x real", "1.000x real")),  # on the targets: as measured
    ],
)
def test_ratios_are_rounded_toward_the_worse_side(fid: float, precision: float, recall: float, shown: tuple) -> None:
    """A ratio just short of a target (FID <= 2.5x, precision and recall >= 0.95x) never prints as meeting it."""
    table = Evaluation(_scores(0.99, fid, precision, recall), _scores(0.997, 3.3, 1.0, 1.0)).table()
    ratios = tuple(line.rsplit(" | ", 1)[1].removesuffix(" |") for line in table.splitlines()[5:8])
    assert ratios == shown


def test_evaluate_reports_progress_uses_its_seed_and_needs_100_samples(
    tiny_onnx: Path, tiny_classifier: Path, tiny_mnist: Path
) -> None:
    gen, reference = DigitGenerator.from_path(tiny_onnx, "cpu"), ReferenceClassifier(tiny_classifier)
    test, train = read_mnist_split(tiny_mnist, "t10k"), read_mnist_split(tiny_mnist, "train")
    done: list[int] = []
    measured: list[int] = []
    first = evaluate(
        gen, reference, test, train, num_samples=100, seed=1, progress=done.append, scoring=measured.append
    )
    assert sum(done) == evaluation_work(len(test[0]), len(train[0]), 100) == 64 + 2 * 100 + 100
    assert sum(measured) == scoring_work(len(test[0]), 100) == 64 * 64 + 2 * (2 * 100 * 64 + 100 * 100)
    again = evaluate(gen, reference, test, train, num_samples=100, seed=1)
    other = evaluate(gen, reference, test, train, num_samples=100, seed=2)
    assert first == again
    assert first.generated.fid != other.generated.fid and first.real.fid != other.real.fid
    for wrong in 99, 60_001, 10**10, 100.0:
        with pytest.raises(InvalidRequestError) as refused:
            evaluate(gen, reference, test, train, num_samples=wrong)
        assert str(refused.value) == (
            "evaluation needs 100 to 60000 samples (as many as MNIST's training digits, the real sample they are "
            f"compared with), got {wrong!r}"
        )


def test_a_model_of_other_than_ten_classes_is_refused_before_any_work(
    tmp_path: Path, tiny_onnx: Path, tiny_classifier: Path, tiny_mnist: Path
) -> None:
    """Scored as MNIST digits, one class gave NaN figures and a 100% class accuracy."""
    model = onnx.load(str(tiny_onnx))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, "num_classes": "1"})
    path = tmp_path / "one-class.onnx"
    onnx.save(model, str(path))
    gen, reference = DigitGenerator.from_path(path, "cpu"), ReferenceClassifier(tiny_classifier)
    test, train = read_mnist_split(tiny_mnist, "t10k"), read_mnist_split(tiny_mnist, "train")
    done: list[int] = []
    refusal = f"^{re.escape(str(path))} has num_classes 1; the evaluator scores MNIST's 10 digits$"
    with pytest.raises(InvalidRequestError, match=refusal):
        evaluate(gen, reference, test, train, num_samples=100, progress=done.append)
    assert done == []


def test_reference_classifier_defaults_to_the_shipped_one_and_checks_its_outputs(tiny_onnx: Path) -> None:
    assert ReferenceClassifier().path == default_model_path("classifier.onnx")
    with pytest.raises(
        ModelContractError, match="is not a digitgen classifier \\(inputs/outputs \\(\\['z', 'digit'\\]"
    ):
        ReferenceClassifier(tiny_onnx)


def identity_classifier(path: Path, classes: int = 10, lit: float = 1.0) -> Path:
    """A stand-in classifier whose features are its input and whose class 3 wins when the first pixel is lit
    (its logit: the pixel times ``lit``)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Reshape", ["image", "flat"], ["features"]),
        helper.make_node("MatMul", ["features", "w"], ["logits"]),
    ]
    weights = np.zeros((784, classes), dtype=np.float32)
    weights[0, 3] = lit
    graph = helper.make_graph(
        nodes,
        "identity-classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "classes"]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 784]),
        ],
        [numpy_helper.from_array(np.array([-1, 784]), "flat"), numpy_helper.from_array(weights, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_a_classifier_with_the_right_names_but_not_ten_logits_is_refused_before_use(tmp_path: Path) -> None:
    classifier = ReferenceClassifier(identity_classifier(tmp_path / "seven.onnx", classes=7))
    images = np.zeros((3, 28, 28), np.uint8)
    expected = "it returned logits float32 [3, 7] and features float32 [3, 784], not float [3, 10]"
    for use in (classifier.embed, classifier.probabilities):
        with pytest.raises(ModelContractError, match=re.escape(expected)):
            use(images)


def test_classifier_sees_pixels_in_zero_to_one(tmp_path: Path) -> None:
    """embed must feed the classifier uint8 / 255."""
    path = identity_classifier(tmp_path / "identity.onnx")
    images = np.random.default_rng(4).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = [0, 255, 0, 255, 0, 255, 0]
    features, predictions = ReferenceClassifier(path).embed(images, batch_size=3)
    assert features.dtype == np.float64
    assert np.allclose(features, images.reshape(7, -1) / 255.0)
    assert predictions.tolist() == [0, 3, 0, 3, 0, 3, 0]
    probabilities = ReferenceClassifier(path).probabilities(images, batch_size=3)
    lit = np.full(10, 1 / (np.e + 9))
    lit[3] = np.e / (np.e + 9)  # softmax of logit 1 for class 3, 0 for the rest
    expected = np.array([lit if i % 2 else np.full(10, 0.1) for i in range(7)])
    assert probabilities.dtype == np.float64 and np.allclose(probabilities, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("images", "kwargs", "refusal"),
    [
        (np.zeros((0, 28, 28), np.uint8), {}, "images must be a uint8 array of shape (N, 28, 28), N >= 1, got uint8"),
        (np.zeros((3, 784), np.uint8), {}, "images must be a uint8 array of shape (N, 28, 28), N >= 1, got uint8 (3,"),
        (np.zeros((3, 28, 28)), {}, "images must be a uint8 array of shape (N, 28, 28), N >= 1, got float64 (3, 28"),
        ([[0] * 28] * 28, {}, "images must be a uint8 array of shape (N, 28, 28), N >= 1, got list"),
        (np.zeros((3, 28, 28), np.uint8), {"batch_size": 0}, "batch size must be an integer from 1 to 8192, got 0"),
    ],
)
def test_the_classifier_refuses_images_it_cannot_read_as_the_caller_s(
    tmp_path: Path, images: object, kwargs: dict, refusal: str
) -> None:
    """Not the classifier's failure to run, nor numpy's words: the caller's input, named."""
    classifier = ReferenceClassifier(identity_classifier(tmp_path / "identity.onnx"))
    for use in (classifier.embed, classifier.probabilities):
        with pytest.raises(InvalidRequestError, match=re.escape(refusal)):
            use(images, **kwargs)


def test_label_accuracy_overall_and_per_digit() -> None:
    labels = np.repeat(np.arange(10), 2)
    predictions = labels.copy()
    predictions[[0, 15]] = [1, 2]  # one of the two zeros and one of the two sevens read wrong
    overall, per_digit = label_accuracy(predictions, labels)
    assert overall == 18 / 20
    assert per_digit == [0.5, 1, 1, 1, 1, 1, 1, 0.5, 1, 1]


def test_a_classifier_of_nan_logits_or_one_feature_cannot_score(tmp_path: Path) -> None:
    """Its figures would mean nothing (every image misread, a FID of a single number), so it is refused."""
    nan = ReferenceClassifier(identity_classifier(tmp_path / "nan.onnx", lit=float("nan")))
    with pytest.raises(ModelContractError, match=r"nan.onnx returned NaN or infinite logits or features; it cannot"):
        nan.embed(np.zeros((3, 28, 28), np.uint8))
    narrow = ReferenceClassifier(identity_classifier(tmp_path / "identity.onnx"))
    for width in (0, 1):
        with pytest.raises(ModelContractError, match=re.escape(f"features float32 [3, {width}], not float [3, 10]")):
            narrow._check_outputs(3, np.zeros((3, 10), np.float32), np.zeros((3, width), np.float32))
    narrow._check_outputs(3, np.zeros((3, 10), np.float32), np.zeros((3, 2), np.float32))  # two are enough
    for logits, features in ((np.int64, np.float32), (np.float32, np.int64)):  # each must be float
        with pytest.raises(ModelContractError, match="is not a digitgen classifier"):
            narrow._check_outputs(3, np.zeros((3, 10), logits), np.zeros((3, 4), features))


def test_a_classifier_of_float64_features_past_float32s_range_cannot_score(tmp_path: Path) -> None:
    """Finite, but squared and summed they overflow: evaluate had ended in numpy's LinAlgError and a traceback."""
    classifier = ReferenceClassifier(identity_classifier(tmp_path / "identity.onnx"))
    logits = np.zeros((3, 10), np.float32)
    huge = np.full((3, 4), 1e160)
    with pytest.raises(ModelContractError) as refused:
        classifier._check_outputs(3, logits, huge)
    assert str(refused.value) == (
        f"{tmp_path / 'identity.onnx'} returned features beyond float32's range (up to 1e+160); the distances "
        "between them overflow, so it cannot score"
    )
    classifier._check_outputs(3, logits, np.full((3, 4), float(np.finfo(np.float32).max)))  # float32's largest
    widest = np.full((100, 4), float(np.finfo(np.float32).max))
    widest[::2] *= -1
    assert np.isfinite(frechet_distance(widest, widest[::-1]))


def test_features_numpy_cannot_decompose_are_refused_in_words(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(*args: object) -> None:
        raise np.linalg.LinAlgError("Eigenvalues did not converge")

    monkeypatch.setattr(evaluate_module, "score", fails)
    path = identity_classifier(tmp_path / "identity.onnx")
    rng = np.random.default_rng(0)
    split = (rng.integers(0, 256, (120, 28, 28), dtype=np.uint8), np.arange(120) % 10)
    with pytest.raises(ModelContractError) as refused:
        evaluate(DigitGenerator.from_path(threads=1), ReferenceClassifier(path), split, split, num_samples=100)
    assert str(refused.value) == f"{path}: its features cannot be scored (Eigenvalues did not converge)"


def test_a_digit_missing_from_a_sample_has_no_accuracy_and_is_not_the_worst() -> None:
    labels = np.array([0, 0, 1, 2, 3, 4, 5, 6, 8, 9])  # no 7, as a small real sample may lack one
    predictions = labels.copy()
    predictions[0] = 5
    overall, per_digit = label_accuracy(predictions, labels)
    assert overall == 0.9 and per_digit == [0.5, 1, 1, 1, 1, 1, 1, None, 1, 1]
    real = Scores(10, overall, per_digit, 1.0, 1.0, 1.0)
    table = Evaluation(_scores(0.99, 15.4, 0.912, 0.885), real).table()
    assert "| worst digit accuracy | 94.00% (digit 7) | 50.00% (digit 0) |  |" in table.splitlines()
    assert json.loads(json.dumps(Evaluation(real, real).to_dict()))["real"]["per_digit_accuracy"][7] is None


@pytest.mark.parametrize(
    ("labels", "refusal"),
    [
        ([0, 1, 2, 10, 3, 4], "item 3 is labelled 10, not a digit 0-9 (1 such label)"),
        ([0, -1, 2, 12, 3, 4], "item 1 is labelled -1, not a digit 0-9 (2 such labels)"),
        ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 15, 16], "item 10 is labelled 14, not a digit 0-9 (3 such labels)"),
    ],
)
def test_labels_outside_the_digits_are_named_the_first_and_counted(labels: list[int], refusal: str) -> None:
    fine = (np.zeros((6, 28, 28), np.uint8), np.arange(6))
    with pytest.raises(InvalidRequestError) as refused:
        check_reference_data(fine, (np.zeros((len(labels), 28, 28), np.uint8), np.array(labels)), 6)
    assert str(refused.value) == f"the MNIST train split: {refusal}"
    check_reference_data(fine, fine, 6)  # 6 images, labels 0-5: enough


@pytest.mark.parametrize(
    ("labels", "refusal"),
    [
        (np.arange(5), "int64 (5,)"),
        (np.zeros((6, 1), np.int64), "int64 (6, 1)"),
        (np.arange(6) + 0.5, "float64 (6,)"),
        ([0, 1, 2, 3, 4, 5], "list"),
    ],
)
def test_labels_that_are_not_one_integer_for_each_image_are_refused(labels: object, refusal: str) -> None:
    fine = (np.zeros((6, 28, 28), np.uint8), np.arange(6))
    with pytest.raises(InvalidRequestError) as refused:
        check_reference_data(fine, (fine[0], labels), 6)  # type: ignore[arg-type]
    assert str(refused.value) == f"the MNIST train split's labels must be 6 integers, one for each image, got {refusal}"
    with pytest.raises(InvalidRequestError, match=re.escape("the MNIST test split's images must be a uint8 array")):
        check_reference_data((fine[0].astype(np.float32), fine[1]), fine, 6)


def test_an_evaluation_records_numpy_seeds_and_truncations_as_json_numbers(
    tiny_onnx: Path, tiny_classifier: Path, tiny_mnist: Path
) -> None:
    gen, reference = DigitGenerator.from_path(tiny_onnx, "cpu"), ReferenceClassifier(tiny_classifier)
    test, train = read_mnist_split(tiny_mnist, "t10k"), read_mnist_split(tiny_mnist, "train")
    scored = evaluate(gen, reference, test, train, num_samples=100, seed=np.int64(3), truncation=np.float32(0.5))
    assert (type(scored.seed), type(scored.truncation)) == (int, float)
    assert json.loads(json.dumps(scored.to_dict()))["seed"] == 3
    assert scored == evaluate(gen, reference, test, train, num_samples=100, seed=3, truncation=0.5)


def test_a_train_split_smaller_than_the_generated_sample_is_refused() -> None:
    """The real sample is as large as the generated one (FID falls with the sample's size); it had been smaller
    without a word."""
    split = (np.zeros((200, 28, 28), np.uint8), np.arange(200) % 10)
    with pytest.raises(InvalidRequestError) as refused:
        check_reference_data(split, split, 1000)
    assert str(refused.value) == (
        "the MNIST train split holds 200 images, fewer than the 1,000 samples: the real sample is as large as the "
        "generated one; ask for at most 200"
    )
    check_reference_data(split, split, 200)
    with pytest.raises(InvalidRequestError, match=r"ask for at most 100$"):  # as many as the smallest evaluation
        check_reference_data(split, (split[0][:100], split[1][:100]), 200)
    small = (split[0][:99], split[1][:99])  # "at most 99" would be advice the option refuses
    with pytest.raises(InvalidRequestError) as refused:
        check_reference_data(split, small, 100)
    assert str(refused.value).endswith(
        "is as large as the generated one; an evaluation needs at least 100: give the whole of MNIST"
    )


@pytest.mark.parametrize(
    ("split", "count", "labels", "refusal"),
    [
        ("test", 5, 0, "the MNIST test split holds 5 images; the evaluator needs more than 5"),
        ("train", 0, 0, "the MNIST train split holds 0 images; the evaluator needs more than 5"),
        ("train", 8, 200, "the MNIST train split: item 0 is labelled 200, not a digit 0-9 (8 such labels)"),
    ],
)
def test_splits_too_small_or_mislabelled_are_refused_before_any_work(
    tiny_onnx: Path, tiny_classifier: Path, tiny_mnist: Path, split: str, count: int, labels: int, refusal: str
) -> None:
    gen, reference = DigitGenerator.from_path(tiny_onnx, "cpu"), ReferenceClassifier(tiny_classifier)
    data = {name: read_mnist_split(tiny_mnist, name) for name in ("t10k", "train")}
    data["t10k" if split == "test" else "train"] = (np.zeros((count, 28, 28), np.uint8), np.full(count, labels))
    made = []
    with pytest.raises(InvalidRequestError) as refused:
        evaluate(gen, reference, data["t10k"], data["train"], num_samples=100, progress=made.append)
    assert str(refused.value) == refusal and made == []
