"""The evaluator's reference classifier rebuilds from its shipped weights, through the torch.export exporter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from digitgen.cli import main
from digitgen.export.classifier_export import export_classifier_weights
from digitgen.export.onnx_export import DEFAULT_OPSET
from digitgen.runtime import DigitGenerator, default_model_path
from digitgen.runtime.errors import OutputError
from digitgen.runtime.noise import standard_normal
from digitgen.runtime.session import open_session
from digitgen.training.classifier import WEIGHTS_KIND, load_classifier_weights
from digitgen.training.errors import CheckpointError
from tests.conftest import REPO
from tests.helpers import sigterm_in_training_step, write_idx, write_tiny_mnist

SHIPPED_WEIGHTS = REPO / "artifacts" / "classifier_weights.pt"
SHIPPED_CLASSIFIER = REPO / "artifacts" / "classifier.onnx"


def _fixed_batch() -> np.ndarray:
    """64 digits of the shipped generator (seed 0, classes 0-9 in turn) and 16 uniform-noise images."""
    gen = DigitGenerator.from_path(default_model_path(), "cpu")
    digits = gen.run(standard_normal(0, 0, 64, gen.latent_dim), np.arange(64) % gen.num_classes)
    noise = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    return np.concatenate([digits, noise])


def _outputs(model: Path, images: np.ndarray) -> list[np.ndarray]:
    return open_session(model, "cpu").session.run(["logits", "features"], {"image": images})


def _metadata(model: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(model)).metadata_props}


def _cli(*args: object) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output.strip().splitlines()


def test_shipped_weights_rebuild_the_shipped_classifier(tmp_path: Path) -> None:
    rebuilt = tmp_path / "classifier.onnx"
    code, lines = _cli("export-classifier", "--weights", SHIPPED_WEIGHTS, "--out", rebuilt)
    assert code == 0 and lines[0].startswith(f"wrote {rebuilt} "), lines
    assert rebuilt.read_bytes() == SHIPPED_CLASSIFIER.read_bytes()  # with the pinned torch and CI's exporter


def test_shipped_classifier_is_the_torch_export_exporters_file() -> None:
    opsets = {o.domain: o.version for o in onnx.load(str(SHIPPED_CLASSIFIER)).opset_import}
    assert opsets[""] == DEFAULT_OPSET


def test_shipped_weights_load_as_data_only_and_describe_themselves() -> None:
    payload = torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True)
    assert set(payload) == {"format_version", "kind", "mnist_test_accuracy", "classifier"}
    assert payload["kind"] == WEIGHTS_KIND
    _, accuracy = load_classifier_weights(SHIPPED_WEIGHTS)
    assert f"{accuracy:.4f}" == _metadata(SHIPPED_CLASSIFIER)["mnist_test_accuracy"]


def test_export_classifier_replaces_a_file_only_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "classifier.onnx"
    out.write_bytes(b"mine")
    code, lines = _cli("export-classifier", "--weights", SHIPPED_WEIGHTS, "--out", out)
    assert code == 1 and lines == [f"Error: {out} already exists; pass --overwrite to replace it"]
    assert out.read_bytes() == b"mine"
    code, lines = _cli("export-classifier", "--weights", SHIPPED_WEIGHTS, "--out", out, "--overwrite")
    assert code == 0 and _metadata(out)["kind"] == WEIGHTS_KIND, lines


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("missing.pt", "classifier weights not found: {path}"),
        ("generator_weights.pt", "{path}: not digitgen classifier weights (see `digitgen train-classifier`)"),
    ],
    ids=["missing", "generator weights"],
)
def test_export_classifier_from_other_files_is_one_line(tmp_path: Path, weights: str, message: str) -> None:
    path = REPO / "artifacts" / weights
    code, lines = _cli("export-classifier", "--weights", path, "--out", tmp_path / "c.onnx")
    assert code == 1 and lines == ["Error: " + message.format(path=path)]
    assert not (tmp_path / "c.onnx").exists()


def test_export_classifier_into_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "missing" / "c.onnx"
    code, lines = _cli("export-classifier", "--weights", SHIPPED_WEIGHTS, "--out", out)
    assert code == 1 and lines == [f"Error: output directory {out.parent} does not exist"]


def test_train_classifier_into_a_missing_directory_is_refused_before_training(tmp_path: Path) -> None:
    """The folder is checked first: no data is read (there is none here) and no minute of training is lost."""
    out = tmp_path / "missing" / "c.onnx"
    code, lines = _cli("train-classifier", "--data-dir", tmp_path / "no-mnist", "--out", out)
    assert code == 1 and lines == [f"Error: output directory {out.parent} does not exist"]


def test_corrupt_weights_are_a_checkpoint_error(tmp_path: Path) -> None:
    corrupt = tmp_path / "w.pt"
    corrupt.write_bytes(SHIPPED_WEIGHTS.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable PyTorch weights file"):
        export_classifier_weights(corrupt, tmp_path / "c.onnx")


def test_export_classifier_weights_keeps_an_existing_file_by_default(tmp_path: Path) -> None:
    out = tmp_path / "c.onnx"
    out.write_bytes(b"mine")
    with pytest.raises(OutputError, match="already exists"):
        export_classifier_weights(SHIPPED_WEIGHTS, out)
    assert out.read_bytes() == b"mine"


def test_train_classifier_keeps_weights_that_rebuild_its_file(tmp_path: Path, tiny_mnist: Path) -> None:
    out = tmp_path / "classifier.onnx"
    code, lines = _cli("train-classifier", "--data-dir", tiny_mnist, "--out", out, "--epochs", "1")
    weights = tmp_path / "classifier_weights.pt"
    assert code == 0 and lines[-1].endswith(f" and {weights}"), lines
    assert " after 1 epoch in " in lines[-1] and "resumed" not in lines[-1], lines
    again = tmp_path / "again.onnx"
    export_classifier_weights(weights, again)
    images = _fixed_batch()
    assert all(np.array_equal(a, b) for a, b in zip(_outputs(out, images), _outputs(again, images), strict=True))


def test_train_classifier_refuses_weights_beside_its_file_before_training(tmp_path: Path, tiny_mnist: Path) -> None:
    weights = tmp_path / "classifier_weights.pt"
    weights.write_bytes(b"mine")
    code, lines = _cli("train-classifier", "--data-dir", tiny_mnist, "--out", tmp_path / "classifier.onnx")
    assert code == 1 and lines == [f"Error: {weights} already exists; pass --overwrite to replace it"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier_weights.pt"]


def test_the_guard_against_training_on_the_evaluator_knows_the_shipped_weights() -> None:
    """The guard holds where the weights file is not installed (a wheel): it keeps their digest instead."""
    from digitgen.training.distributed import weights_digest
    from digitgen.training.run import EVALUATOR_WEIGHTS_SHA256

    assert weights_digest(load_classifier_weights(SHIPPED_WEIGHTS)[0]) == EVALUATOR_WEIGHTS_SHA256


def test_train_classifier_refuses_a_folder_where_its_weights_go_before_training(
    tmp_path: Path, tiny_mnist: Path
) -> None:
    """--overwrite replaces files: a folder in the way would otherwise be found after training, between the
    two files of the pair, with the ONNX file already published."""
    (tmp_path / "classifier_weights.pt").mkdir()
    out = tmp_path / "classifier.onnx"
    code, lines = _cli("train-classifier", "--data-dir", tiny_mnist, "--out", out, "--overwrite")
    assert code == 1 and lines == [
        f"Error: {tmp_path / 'classifier_weights.pt'} is a folder, not a file; move it, or name another file"
    ]
    assert not out.exists()


def _mnist_with(tmp_path: Path, test_count: int = 64, train_label_12_at: int | None = None) -> Path:
    root = write_tiny_mnist(tmp_path / "data", test_count=test_count)
    if train_label_12_at is not None:
        labels = np.arange(256) % 10
        labels[train_label_12_at] = 12
        write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte", labels)
    return root


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"test_count": 0}, "the test split holds no images; the classifier's accuracy is measured on it"),
        (
            {"train_label_12_at": 200},
            "the training split: item 200 is labelled 12, not a class 0-9 of this model (1 such label)",
        ),
    ],
)
def test_train_classifier_refuses_data_it_cannot_learn_or_score_before_training(
    tmp_path: Path, data: dict, words: str
) -> None:
    out = tmp_path / "classifier.onnx"
    code, lines = _cli("train-classifier", "--data-dir", _mnist_with(tmp_path, **data), "--out", out)
    assert code == 1 and lines == [f"Error: {words}"] and not out.exists()


@pytest.mark.parametrize("accuracy", [float("nan"), -0.5, 1.5])
def test_classifier_weights_whose_accuracy_is_not_a_share_are_refused(tmp_path: Path, accuracy: float) -> None:
    """It goes into the exported file's metadata: `export-classifier` wrote "mnist_test_accuracy: nan"."""
    payload = torch.load(SHIPPED_WEIGHTS, weights_only=True)
    payload["mnist_test_accuracy"] = accuracy
    odd = tmp_path / "odd.pt"
    torch.save(payload, odd)
    code, lines = _cli("export-classifier", "--weights", odd, "--out", tmp_path / "c.onnx")
    assert code == 1 and lines == [f"Error: {odd}: not digitgen classifier weights (see `digitgen train-classifier`)"]
    assert not (tmp_path / "c.onnx").exists()


def test_classifier_weights_whose_format_is_a_tensor_are_refused_in_one_line(tmp_path: Path) -> None:
    payload = torch.load(SHIPPED_WEIGHTS, weights_only=True)
    payload["format_version"] = torch.zeros(3)
    odd = tmp_path / "odd.pt"
    torch.save(payload, odd)
    code, lines = _cli("export-classifier", "--weights", odd, "--out", tmp_path / "c.onnx")
    assert (code, lines) == (1, [f"Error: {odd}: classifier weights format a Tensor, this version reads 1"])


def test_classifier_weights_that_are_not_numbers_are_refused(tmp_path: Path) -> None:
    payload = torch.load(SHIPPED_WEIGHTS, weights_only=True)
    payload["classifier"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                             for k, v in payload["classifier"].items()}  # fmt: skip
    nan = tmp_path / "nan.pt"
    torch.save(payload, nan)
    code, lines = _cli("export-classifier", "--weights", nan, "--out", tmp_path / "c.onnx")
    assert code == 1 and lines == [f"Error: {nan}: classifier weights hold NaN or infinite values"]
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_classifier_weights(nan)


def _stopped_by_sigterm_in_step_3(monkeypatch: pytest.MonkeyPatch, *args: object) -> tuple[int, list[str]]:
    """``_cli(*args)`` with a SIGTERM during the third training step."""
    with sigterm_in_training_step(monkeypatch, 3):
        return _cli(*args)


def test_train_classifier_stopped_by_a_signal_resumes_to_the_files_of_a_run_never_stopped(
    tmp_path: Path, tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM during the third of 4 steps (256 images, 2 epochs): the state kept, nothing else written; the same
    command refuses to lose it, one with other options cannot resume it, the same with --resume ends the run."""
    whole = tmp_path / "whole" / "classifier.onnx"
    whole.parent.mkdir()
    assert _cli("train-classifier", "--data-dir", tiny_mnist, "--out", whole, "--epochs", 2)[0] == 0
    out, state = tmp_path / "classifier.onnx", tmp_path / "classifier_resume.pt"
    command = ("train-classifier", "--data-dir", tiny_mnist, "--out", out, "--epochs", 2)
    code, lines = _stopped_by_sigterm_in_step_3(monkeypatch, *command)
    assert code == 130 and lines[-1] == (
        f"Error: interrupted; stopped at step 3 of 4; its state is saved to {state}; "
        "continue with the same command and --resume"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier_resume.pt", "whole"]
    assert _cli(*command) == (
        1,
        [f"Error: {state} holds an interrupted run of this command: continue it with --resume, or start over with "
         "--overwrite"],
    )  # fmt: skip
    code, lines = _cli(*command, "--resume", "--seed", 1)
    assert code == 1 and lines[-1].startswith(f"Error: {state} is a run of --seed 0, not 1: resume it with")
    code, lines = _cli(*command, "--resume")
    assert code == 0 and lines[-1].endswith(f" and {tmp_path / 'classifier_weights.pt'}"), lines
    assert "s (resumed at step 3: this part's time); wrote " in lines[-1], lines
    assert not state.exists() and out.read_bytes() == whole.read_bytes()
    out.write_bytes(b"mine")
    assert _stopped_by_sigterm_in_step_3(monkeypatch, *command, "--overwrite")[0] == 130
    assert out.read_bytes() == b"mine" and state.is_file()  # replaced only at the end
    code, lines = _cli(*command, "--overwrite")  # starts over: the state replaced, then removed
    assert code == 0 and out.read_bytes() == whole.read_bytes() and not state.exists()
    out.write_bytes(b"mine")
    assert _stopped_by_sigterm_in_step_3(monkeypatch, *command, "--overwrite")[0] == 130
    assert _cli(*command, "--resume")[1] == [  # the outputs are the user's: only --overwrite replaces them
        f"Error: {out} and 1 more already exist; pass --overwrite to replace them"
    ]
    code, lines = _cli(*command, "--overwrite", "--resume")  # the same command, and --resume: it goes on
    assert code == 0 and out.read_bytes() == whole.read_bytes() and not state.exists(), lines
