"""`evaluate --cas`: train on generated digits, test on real ones."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import digitgen.training.cas as cas_module
from digitgen.cli import main
from digitgen.runtime import DigitGenerator
from digitgen.runtime.errors import OutputError
from digitgen.runtime.evaluate import Cas, Evaluation
from digitgen.runtime.files import locking_available
from digitgen.runtime.idx import read_mnist_split
from digitgen.training.cas import CasRun, cas_work, default_state_dir
from digitgen.training.classifier import BATCH_SIZE, ClassifierResult, training_steps
from digitgen.training.classifier_resume import recipe_of
from digitgen.training.data import MnistTensors
from digitgen.training.errors import CheckpointError, TrainingError
from tests.helpers import sigterm_in_training_step, write_tiny_mnist
from tests.test_evaluate import _scores, evaluate_args

Splits = tuple[MnistTensors, MnistTensors]


@pytest.fixture
def gen(tiny_onnx: Path) -> DigitGenerator:
    return DigitGenerator.from_path(tiny_onnx, "cpu")


@pytest.fixture
def splits(tiny_mnist: Path) -> Splits:
    """The tiny MNIST's training and test splits."""
    return read_mnist_split(tiny_mnist, "train"), read_mnist_split(tiny_mnist, "t10k")


class RecordingTrainer:
    """Stands in for ``train_classifier``: remembers its training sets, returns set accuracies."""

    def __init__(self, accuracies: list[float]) -> None:
        self.accuracies, self.seen = iter(accuracies), []

    def __call__(self, train, test, *, epochs, seed, progress, state_path=None, resume_from=None, should_stop=None):
        self.seen.append((train, test, epochs, seed))
        total = training_steps(len(train.images), epochs)
        for step in range(total):
            progress(step + 1, total)
        return ClassifierResult(model=None, test_accuracy=next(self.accuracies), seconds=0.0, step=total)


@pytest.fixture
def trainer(monkeypatch: pytest.MonkeyPatch) -> RecordingTrainer:
    """CAS's classifier training, recorded: 91% on the generated digits, then 98% on the real ones."""
    recording = RecordingTrainer([0.91, 0.98])
    monkeypatch.setattr(cas_module, "train_classifier", recording)
    return recording


def test_cas_trains_on_generated_then_real_digits_and_tests_on_real(
    tiny_onnx: Path, tiny_mnist: Path, trainer: RecordingTrainer
) -> None:
    gen = DigitGenerator.from_path(tiny_onnx, "cpu")
    train, test = read_mnist_split(tiny_mnist, "train"), read_mnist_split(tiny_mnist, "t10k")
    steps = []
    cas = CasRun(gen, train, test, seed=4, truncation=1.5, per_class=130, epochs=2)
    assert cas.done == 0 and cas.notes == []
    result = cas.run(progress=lambda: steps.append(1))
    assert result == Cas(generated=0.91, real=0.98, num_generated=1300, num_real=len(train[0]), epochs=2)
    assert round(result.gap, 6) == 7.0
    (fake, fake_test, epochs, seed), (real, real_test, _, real_seed) = trainer.seen
    expected = gen.generate(1300, seed=4, truncation=1.5)
    assert np.array_equal(fake.images.numpy(), expected.images)
    assert np.bincount(fake.labels.numpy()).tolist() == [130] * 10
    assert np.array_equal(real.images.numpy(), train[0]) and np.array_equal(real.labels.numpy(), train[1])
    for split in (fake_test, real_test):
        assert np.array_equal(split.images.numpy(), test[0]) and np.array_equal(split.labels.numpy(), test[1])
    assert (epochs, seed) == (2, real_seed)
    assert len(steps) == cas_work(len(train[0]), per_class=130, epochs=2) == cas.total


def test_cas_draws_seed_0_by_default_and_takes_labels_of_any_integer_type(
    tiny_onnx: Path, tiny_mnist: Path, trainer: RecordingTrainer
) -> None:
    gen = DigitGenerator.from_path(tiny_onnx, "cpu")
    (images, labels), test = read_mnist_split(tiny_mnist, "train"), read_mnist_split(tiny_mnist, "t10k")
    CasRun(gen, (images, labels.astype(np.uint8)), test, per_class=13, epochs=1).run()
    (fake, *_), (real, *_) = trainer.seen
    assert np.array_equal(fake.images.numpy(), gen.generate(130, seed=0).images)  # as `evaluate --cas` by default
    assert real.labels.dtype == torch.int64 and np.array_equal(real.labels.numpy(), labels)  # what the loss takes


def test_cas_with_the_real_trainer_gives_accuracies(tiny_onnx: Path, tiny_mnist: Path) -> None:
    gen = DigitGenerator.from_path(tiny_onnx, "cpu")
    train, test = read_mnist_split(tiny_mnist, "train"), read_mnist_split(tiny_mnist, "t10k")
    result = CasRun(gen, train, test, per_class=26, epochs=1).run()
    assert result.num_generated == 260 and 0 <= result.generated <= 1 and 0 <= result.real <= 1


def test_table_and_json_carry_cas() -> None:
    cas = Cas(generated=0.9874, real=0.9951, num_generated=60_000, num_real=60_000, epochs=4)
    evaluation = Evaluation(_scores(0.99, 15.4, 0.912, 0.885), _scores(0.997, 3.3, 0.944, 0.955), cas)
    row = "| CAS (trained on 60000 / 60000, tested on MNIST test) | 98.74% | 99.51% | 0.77 points below real |"
    assert row in evaluation.table().splitlines()
    assert evaluation.to_dict()["cas"] == {
        "generated": 0.9874,
        "real": 0.9951,
        "num_generated": 60_000,
        "num_real": 60_000,
        "epochs": 4,
    }
    assert "CAS" not in Evaluation(evaluation.generated, evaluation.real).table()


def test_evaluate_cas_cli(
    tiny_onnx: Path, tiny_classifier: Path, tiny_mnist: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cas_module, "train_classifier", RecordingTrainer([0.5, 0.75]))
    result = CliRunner().invoke(main, [*evaluate_args(tiny_onnx, tiny_classifier, tiny_mnist), "--cas", "--json"])
    assert result.exit_code == 0, result.output
    cas = json.loads(result.output.strip().splitlines()[-1])["cas"]
    assert cas == {"generated": 0.5, "real": 0.75, "num_generated": 60_000, "num_real": 256, "epochs": 4}


def test_evaluate_cas_refuses_a_training_split_smaller_than_a_batch_before_any_work(
    tiny_onnx: Path, tiny_classifier: Path, tmp_path: Path, monkeypatch
) -> None:
    """Not after the scores and the first classifier, some 12 minutes on MNIST's size."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    data = write_tiny_mnist(tmp_path / "small", train_count=100)
    result = CliRunner().invoke(main, [*evaluate_args(tiny_onnx, tiny_classifier, data), "--cas"])
    problem = "a batch of 128 images is more than the 100 training images; the classifier needs a larger training split"
    assert result.exit_code == 1 and result.output == f"Error: {problem}\n", result.output
    with pytest.raises(TrainingError) as refused:
        CasRun(DigitGenerator.from_path(tiny_onnx, "cpu"), *(read_mnist_split(data, s) for s in ("train", "t10k")))
    assert str(refused.value) == problem


def _stopping_after(steps: int) -> Callable[[], bool]:
    asked = itertools.count(1)
    return lambda: next(asked) >= steps


@pytest.mark.parametrize("stop_after", [1, 5])  # of 8: 4 steps on the generated digits, then 4 on the real ones
def test_cas_stopped_and_run_again_gives_the_scores_of_a_run_never_stopped(
    gen: DigitGenerator, splits: Splits, tmp_path: Path, stop_after: int
) -> None:
    request = {"seed": 2, "per_class": 26, "epochs": 2, "state_dir": tmp_path}
    whole = CasRun(gen, *splits, **{**request, "state_dir": None}).run()
    stopped = CasRun(gen, *splits, **request)
    assert stopped.total == 8 and stopped.run(should_stop=_stopping_after(stop_after)) is None
    kept = sorted(path.name.split("-", 2)[2] for path in tmp_path.iterdir())
    assert kept == (["generated.pt"] if stop_after < 4 else ["generated-accuracy.json", "real.pt"])
    again, steps = CasRun(gen, *splits, **request), []
    assert again.done == stop_after and again.notes == []
    assert again.run(progress=lambda: steps.append(1)) == whole and len(steps) == 8 - stop_after
    assert list(tmp_path.iterdir()) == []  # removed at the end
    assert CasRun(gen, *splits, **{**request, "seed": 3}).paths["real"] != again.paths["real"]  # names of the request


def test_cas_trains_again_what_it_cannot_continue_and_says_so(
    gen: DigitGenerator, splits: Splits, tmp_path: Path
) -> None:
    request = {"per_class": 26, "epochs": 2, "state_dir": tmp_path}
    whole = CasRun(gen, *splits, **request).run()
    assert CasRun(gen, *splits, **request).run(should_stop=_stopping_after(5)) is None
    paths = CasRun(gen, *splits, **request).paths
    paths["accuracy"].write_text('{"accuracy": 7}')
    paths["real"].write_bytes(b"damaged")
    again = CasRun(gen, *splits, **request)
    assert again.done == 0 and [note.split(": ", 1)[1] for note in again.notes] == [
        "not an accuracy kept by evaluate --cas (damaged?); trained again",
        "not a readable training state (not a PyTorch file of tensors and plain data; read with weights_only=True, "
        "nothing in it ran); trained again",
    ]
    assert again.run() == whole and list(tmp_path.iterdir()) == []


def test_evaluate_cas_stopped_by_a_signal_continues_where_it_stopped(
    tiny_onnx: Path, tiny_classifier: Path, tiny_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM in CAS's second of 3 steps (130 generated digits: 1 step, 256 real: 2): its state kept in the cache
    folder; the same command then ends with the scores of a run never stopped."""
    monkeypatch.setattr(cas_module, "PER_CLASS", 13)
    monkeypatch.setattr(cas_module, "EPOCHS", 1)
    command = [*evaluate_args(tiny_onnx, tiny_classifier, tiny_mnist), "--cas", "--json"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "whole"))
    whole = CliRunner().invoke(main, command)
    assert whole.exit_code == 0, whole.output
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with sigterm_in_training_step(monkeypatch, 2):
        stopped = CliRunner().invoke(main, command)
    state_dir = tmp_path / "cache" / "digitgen"
    assert stopped.exit_code == 130 and stopped.output.splitlines()[-1] == (
        f"Error: interrupted; CAS's training state is kept in {state_dir}; the same command continues it"
    )
    assert len(list(state_dir.iterdir())) == 2  # the first classifier's accuracy, the second's state
    again = CliRunner().invoke(main, command)
    assert again.exit_code == 0 and "CAS: training classifiers (steps): 1 to do (2 of 3 done before)" in again.output
    assert again.output.splitlines()[-1] == whole.output.splitlines()[-1] and list(state_dir.iterdir()) == []


def test_cas_notes_a_state_it_cannot_continue_in_its_own_words_and_trains_it_again(
    gen: DigitGenerator, splits: Splits, tmp_path: Path, trainer: RecordingTrainer
) -> None:
    """A state of another format or recipe: why, without train-classifier's advice to pass --overwrite."""
    request = {"per_class": 13, "epochs": 1, "state_dir": tmp_path}
    paths = CasRun(gen, *splits, **request).paths
    assert sorted(paths) == ["accuracy", "generated", "real"]
    for name, path in paths.items():  # stable names: a later version continues the state of an earlier one
        assert re.fullmatch(
            r"cas-[0-9a-f]{32}-" + {"accuracy": "generated-accuracy.json"}.get(name, f"{name}.pt"), path.name
        )
        assert path.parent == tmp_path
    state = {"kind": "reference classifier training state", "format_version": 1, "step": 1, "order": torch.arange(3)}
    torch.save({**state, "format_version": 2, "recipe": {}}, paths["generated"])
    torch.save({**state, "recipe": {"epochs": 3, "batch_size": BATCH_SIZE, "seed": 0, "data": ""}}, paths["real"])
    again = CasRun(gen, *splits, **request)
    assert again.done == 0 and again.resumed == {"generated": None, "real": None}
    assert again.notes == [
        f"{paths['generated']}: training state format 2, this version reads 1; trained again",
        f"{paths['real']} is a run of --epochs 3, not 1; trained again",
    ]
    assert again.run() == Cas(generated=0.91, real=0.98, num_generated=130, num_real=len(splits[0][0]), epochs=1)
    assert list(tmp_path.iterdir()) == []


def test_accuracy_when_trained_on_trains_cas_s_recipe_on_the_split_given(
    tiny_mnist: Path, trainer: RecordingTrainer
) -> None:
    train, test = read_mnist_split(tiny_mnist, "train"), read_mnist_split(tiny_mnist, "t10k")
    steps = []
    assert cas_module.accuracy_when_trained_on(train, test, epochs=3, progress=lambda: steps.append(1)) == 0.91
    assert cas_module.accuracy_when_trained_on(train, test) == 0.98  # progress optional
    (fit, tested, epochs, seed), (_, _, default_epochs, _) = trainer.seen
    assert np.array_equal(fit.images.numpy(), train[0]) and fit.labels.dtype == torch.int64
    assert np.array_equal(tested.labels.numpy(), test[1])
    assert (epochs, seed, default_epochs) == (3, 0, 4) and len(steps) == training_steps(len(train[0]), 3)


@pytest.mark.parametrize("accuracy", [0.0, 0.5, 1.0])
def test_a_kept_accuracy_reads_back(tmp_path: Path, accuracy: float) -> None:
    path = tmp_path / "accuracy.json"
    cas_module._write_accuracy(path, accuracy)
    assert json.loads(path.read_bytes()) == {"accuracy": accuracy}
    assert cas_module._read_accuracy(path) == accuracy and type(cas_module._read_accuracy(path)) is float


@pytest.mark.parametrize(
    "kept",
    [
        *(b'{"accuracy": 1}', b'{"accuracy": true}', b'{"accuracy": "0.5"}', b'{"accuracy": null}'),  # no float
        *(b'{"accuracy": -0.01}', b'{"accuracy": 1.01}', b'{"accuracy": NaN}'),  # out of [0, 1]
        *(b'{"score": 0.5}', b"[0.5]", b'"0.5"', b'{"accuracy": 0.', b"\xff"),  # no such JSON
    ],
)
def test_what_does_not_read_as_an_accuracy_is_refused_in_words(tmp_path: Path, kept: bytes) -> None:
    path = tmp_path / "accuracy.json"
    path.write_bytes(kept)
    with pytest.raises(CheckpointError) as refused:
        cas_module._read_accuracy(path)
    assert str(refused.value) == f"{path}: not an accuracy kept by evaluate --cas (damaged?)"


def test_no_kept_accuracy_is_none_and_a_folder_in_its_place_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "accuracy.json"
    assert cas_module._read_accuracy(path) is None
    path.mkdir()
    with pytest.raises(CheckpointError, match="not an accuracy kept by evaluate --cas"):
        cas_module._read_accuracy(path)


def test_cas_refuses_a_state_past_its_last_step_counting_each_classifier_s_own_steps(
    gen: DigitGenerator, splits: Splits, tmp_path: Path, trainer: RecordingTrainer
) -> None:
    """1,170 generated digits: 9 steps an epoch (1,287 would be 10); 256 real ones: 2."""
    request = {"per_class": 117, "epochs": 1, "state_dir": tmp_path}
    paths = CasRun(gen, *splits, **request).paths
    fake = gen.generate(1170, seed=0)
    for name, split, total in [("generated", (fake.images, fake.labels), 9), ("real", splits[0], 2)]:
        recipe = recipe_of(
            MnistTensors(torch.tensor(split[0]), torch.tensor(split[1], dtype=torch.int64)), 1, BATCH_SIZE, 0
        )
        state = {"kind": "reference classifier training state", "format_version": 1, "recipe": recipe}
        torch.save({**state, "step": total + 1, "order": torch.arange(3)}, paths[name])
    again = CasRun(gen, *splits, **request)
    assert again.done == 0 and again.notes == [
        f"{paths['generated']}: a damaged training state (step 10 of 9); trained again",
        f"{paths['real']}: a damaged training state (step 3 of 2); trained again",
    ]


def test_cas_trains_again_a_state_that_reads_but_does_not_restore(
    gen: DigitGenerator, splits: Splits, tmp_path: Path, trainer: RecordingTrainer
) -> None:
    """Found when the request starts, in a note, not as a traceback at the state's first step."""
    request = {"per_class": 117, "epochs": 1, "state_dir": tmp_path}
    paths = CasRun(gen, *splits, **request).paths
    recipe = recipe_of(
        MnistTensors(torch.tensor(splits[0][0]), torch.tensor(splits[0][1], dtype=torch.int64)), 1, BATCH_SIZE, 0
    )
    state = {"kind": "reference classifier training state", "format_version": 1, "recipe": recipe, "step": 1}
    torch.save({**state, "order": torch.arange(3)}, paths["real"])  # an order of 3 of the 256 real images
    again = CasRun(gen, *splits, **request)
    problem = "its epoch's order is not one of the 256 images each"
    assert again.done == 0 and again.notes == [f"{paths['real']}: a damaged training state ({problem}); trained again"]


def test_cas_with_its_first_accuracy_kept_leaves_a_leftover_first_state_alone(
    gen: DigitGenerator, splits: Splits, tmp_path: Path, trainer: RecordingTrainer
) -> None:
    """Stopped between keeping the first accuracy and removing the first classifier's state: that state is not
    read (nor its 10 * per_class digits generated) and goes at the end."""
    request = {"per_class": 26, "epochs": 2, "state_dir": tmp_path}
    paths = CasRun(gen, *splits, **request).paths
    cas_module._write_accuracy(paths["accuracy"], 0.5)
    paths["generated"].write_bytes(b"damaged")
    again = CasRun(gen, *splits, **request)
    assert (again.generated_accuracy, again.notes, again.resumed["generated"]) == (0.5, [], None)
    assert again.done == training_steps(260, 2)
    assert again.run() == Cas(generated=0.5, real=0.91, num_generated=260, num_real=len(splits[0][0]), epochs=2)
    assert [real.images.shape[0] for real, *_ in trainer.seen] == [len(splits[0][0])]  # the second classifier only
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not locking_available(), reason="no file locks here")
def test_a_second_run_of_the_same_request_at_once_keeps_no_state_and_says_so(
    gen: DigitGenerator, splits: Splits, tmp_path: Path
) -> None:
    """Two runs of one request at once would write one state file; the second keeps none, the first's is left alone,
    and once the first has ended (or been dropped) a third keeps state again."""
    request = {"per_class": 26, "epochs": 2, "state_dir": tmp_path}
    first = CasRun(gen, *splits, **request)
    lock = next(tmp_path.glob("cas-*.lock"))
    second = CasRun(gen, *splits, **request)
    assert (first.keeps_state, second.keeps_state, second.paths) == (True, False, {})
    assert second.notes == [
        f"another evaluate --cas of this request is running and keeps its state in {tmp_path}; this one keeps none "
        "(stopped, it starts over)"
    ]
    assert second.run(should_stop=_stopping_after(1)) is None and list(tmp_path.iterdir()) == [lock]  # wrote nothing
    assert CasRun(gen, *splits, **{**request, "seed": 1}).keeps_state  # another request is another lock
    assert first.run(should_stop=_stopping_after(1)) is None and not lock.exists()  # kept its state, let go of the lock
    third = CasRun(gen, *splits, **request)
    assert third.keeps_state and third.done == 1 and not CasRun(gen, *splits, **request).keeps_state
    del third  # dropped without running: lets go too
    assert CasRun(gen, *splits, **request).keeps_state


def test_a_lock_file_that_cannot_be_removed_costs_the_run_nothing(
    gen: DigitGenerator, splits: Splits, tmp_path: Path, trainer: RecordingTrainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on Windows, which removes no open file: the scores all the same, the lock let go."""
    unlink = Path.unlink

    def refused(path: Path, missing_ok: bool = False) -> None:
        if path.suffix == ".lock":
            raise PermissionError(13, "Permission denied", str(path))
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    request = {"per_class": 13, "epochs": 1, "state_dir": tmp_path}
    assert CasRun(gen, *splits, **request).run() == Cas(
        generated=0.91, real=0.98, num_generated=130, num_real=len(splits[0][0]), epochs=1
    )
    assert [path.suffix for path in tmp_path.iterdir()] == [".lock"] and CasRun(gen, *splits, **request).keeps_state


@pytest.mark.skipif(not locking_available(), reason="no file locks here")
def test_evaluate_cas_beside_another_run_of_it_notes_it_and_keeps_nothing_when_stopped(
    tiny_onnx: Path, tiny_classifier: Path, tiny_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cas_module, "PER_CLASS", 13)
    monkeypatch.setattr(cas_module, "EPOCHS", 1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    state_dir = default_state_dir()
    splits = (read_mnist_split(tiny_mnist, split) for split in ("train", "t10k"))
    # the evaluate command's request, held here
    running = CasRun(DigitGenerator.from_path(tiny_onnx, "cpu"), *splits, state_dir=state_dir)
    with sigterm_in_training_step(monkeypatch, 2):
        stopped = CliRunner().invoke(main, [*evaluate_args(tiny_onnx, tiny_classifier, tiny_mnist), "--cas"])
    assert stopped.exit_code == 130 and "note: another evaluate --cas of this request is running" in stopped.output
    assert stopped.output.splitlines()[-1] == (
        "Error: interrupted; CAS's training state is not kept (another run of it keeps its own)"
    )
    assert [path.suffix for path in state_dir.iterdir()] == [".lock"] and running.keeps_state


def test_the_state_folder_is_the_cache_of_xdg_or_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_state_dir() == tmp_path / "cache" / "digitgen" and default_state_dir().is_dir()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".cache" / "digitgen"
    monkeypatch.chdir(tmp_path)
    for ignored in ("", "relative/cache"):  # a relative one would give each working folder its own state
        monkeypatch.setenv("XDG_CACHE_HOME", ignored)
        assert default_state_dir() == tmp_path / "home" / ".cache" / "digitgen"
    assert not (tmp_path / "relative").exists()


def test_a_state_folder_that_cannot_be_made_is_named_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))
    with pytest.raises(OutputError) as refused:
        default_state_dir()
    assert str(refused.value) == (
        f"cannot make {tmp_path / 'a-file' / 'digitgen'}, where evaluate --cas keeps its state (Not a directory): "
        "set XDG_CACHE_HOME to a folder it can write"
    )


def test_no_home_and_no_cache_folder_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """A container run as a user id the system has no entry for, without HOME: Path.home() raises RuntimeError."""
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    with pytest.raises(OutputError) as refused:
        default_state_dir()
    assert str(refused.value) == (
        "no home folder to keep evaluate --cas's state in (HOME is not set): set XDG_CACHE_HOME to a folder it can "
        "write"
    )
