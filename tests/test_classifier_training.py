"""The reference classifier's training recipe: what `train-classifier` runs to rebuild the evaluator."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from digitgen.runtime.errors import OutputError
from digitgen.training import classifier as classifier_module
from digitgen.training.classifier import (
    BATCH_SIZE,
    WEIGHTS_FORMAT_VERSION,
    ClassifierResult,
    check_classifier_data,
    classifier_weights,
    load_classifier_weights,
    load_resumable_state,
    random_shift,
    train_classifier,
    training_steps,
)
from digitgen.training.classifier_resume import (
    START_OVER_INSTEAD,
    UnusableStateError,
    check_resume,
    finding,
    load_state,
    recipe_of,
    save_state,
    state_path_beside,
)
from digitgen.training.data import MnistTensors, load_mnist
from digitgen.training.errors import CheckpointError, TrainingError
from tests.helpers import one_torch_thread, write_tiny_mnist


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[MnistTensors, MnistTensors]:
    root = write_tiny_mnist(tmp_path_factory.mktemp("mnist"), train_count=1024, test_count=256)
    return load_mnist(root), load_mnist(root, train=False)


def _first(data: MnistTensors, count: int) -> MnistTensors:
    return MnistTensors(data.images[:count], data.labels[:count])


def test_random_shift_moves_each_image_by_its_own_drawn_offset() -> None:
    images = torch.rand(6, 1, 28, 28)
    shifted = random_shift(images, 2, torch.Generator().manual_seed(5))
    offsets = torch.randint(0, 5, (6, 2), generator=torch.Generator().manual_seed(5)).tolist()
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for image, original, (dy, dx) in zip(shifted, padded, offsets, strict=True):
        assert torch.equal(image, original[:, dy : dy + 28, dx : dx + 28])
    assert {tuple(offset) for offset in offsets} != {(2, 2)}  # some image did move


def test_train_classifier_follows_its_recipe(
    splits: tuple[MnistTensors, MnistTensors], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches in the order of the seed's own generator, pixels in [0, 1], +-2 px shifts drawn from it too, and one
    progress call per step, with a batch size of the caller's (100 images: fewer than the default batch)."""
    train, test = _first(splits[0], 100), splits[1]
    shifted: list[tuple[torch.Tensor, int, torch.Generator]] = []

    def recording_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
        shifted.append((images.clone(), max_shift, generator))
        return random_shift(images, max_shift, generator)

    monkeypatch.setattr(classifier_module, "random_shift", recording_shift)
    calls: list[tuple[int, int]] = []
    train_classifier(train, test, epochs=2, batch_size=32, seed=3, progress=lambda *call: calls.append(call))
    total = training_steps(100, 2, 32)
    assert total == 6 and calls == [(step, total) for step in range(1, total + 1)]
    rng, batches = torch.Generator().manual_seed(3), []  # one generator: each epoch's order, then its batches' shifts
    for _epoch in range(2):
        order = torch.randperm(100, generator=rng)
        for step in range(3):
            batches.append(order[step * 32 : (step + 1) * 32])
            torch.randint(0, 5, (32, 2), generator=rng)
    for (images, max_shift, generator), indices in zip(shifted, batches, strict=True):
        assert torch.equal(images, train.images[indices].unsqueeze(1).float() / 255.0)
        assert max_shift == 2 and isinstance(generator, torch.Generator)
    assert max(images.max() for images, _, _ in shifted) == 1.0


@pytest.mark.usefixtures("one_thread")
def test_the_default_recipe_learns_the_tiny_set_and_repeats_itself(splits: tuple[MnistTensors, MnistTensors]) -> None:
    """4 epochs and seed 0 by default; a learning rate, loss and scaling that learn; the same weights every run."""
    started = time.perf_counter()
    default = train_classifier(*splits)
    wall = time.perf_counter() - started
    explicit = train_classifier(*splits, epochs=4, seed=0)
    assert default.test_accuracy >= 0.95, default.test_accuracy
    assert 0 < default.seconds <= wall
    weights, again = default.model.state_dict(), explicit.model.state_dict()
    assert all(torch.equal(weights[name], again[name]) for name in weights)


def test_the_data_checks_name_the_split_and_the_batch(splits: tuple[MnistTensors, MnistTensors]) -> None:
    train, test = splits
    bad_test = MnistTensors(test.images, test.labels.clone())
    bad_test.labels[7] = 11
    with pytest.raises(TrainingError) as caught:
        check_classifier_data(train, bad_test)
    assert str(caught.value) == "the test split: item 7 is labelled 11, not a class 0-9 of this model (1 such label)"
    check_classifier_data(_first(train, 128), test)  # one whole batch is enough
    with pytest.raises(TrainingError) as caught:
        check_classifier_data(_first(train, 127), test)
    assert str(caught.value) == (
        "a batch of 128 images is more than the 127 training images; the classifier needs a larger training split"
    )


def _payload(**changes: object) -> dict:
    from digitgen.training.classifier import Classifier

    return {**classifier_weights(Classifier(), 0.99), **changes}


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (["not", "a", "dict"], "not digitgen classifier weights (see `digitgen train-classifier`)"),
        (_payload(kind="generator"), "not digitgen classifier weights (see `digitgen train-classifier`)"),
        (_payload(mnist_test_accuracy="99%"), "not digitgen classifier weights (see `digitgen train-classifier`)"),
        (
            _payload(format_version=WEIGHTS_FORMAT_VERSION + 1),
            f"classifier weights format {WEIGHTS_FORMAT_VERSION + 1}, this version reads {WEIGHTS_FORMAT_VERSION}",
        ),
        (
            _payload(classifier={"head.weight": torch.zeros(3)}),
            "classifier weights do not fit the reference architecture",
        ),
    ],
    ids=["list", "other kind", "accuracy not a number", "newer format", "other architecture"],
)
def test_weights_that_are_not_reference_classifier_weights_are_refused_in_words(
    tmp_path: Path, payload: object, words: str
) -> None:
    path = tmp_path / "weights.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as caught:
        load_classifier_weights(path)
    assert str(caught.value) == f"{path}: {words}"


def test_weights_that_are_no_pytorch_file_are_refused_in_words(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(CheckpointError) as caught:
        load_classifier_weights(path)
    assert str(caught.value) == (
        f"{path}: not a readable PyTorch weights file (not a PyTorch file of tensors and plain data; read with "
        "weights_only=True, nothing in it ran)"
    )


def _stopping_after(steps: int) -> Callable[[], bool]:
    """A ``should_stop`` that says stop once asked ``steps`` times (once a step)."""
    asked = itertools.count(1)
    return lambda: next(asked) >= steps


@pytest.fixture(scope="module")
def small(splits: tuple[MnistTensors, MnistTensors]) -> tuple[MnistTensors, MnistTensors]:
    """512 training images: 4 steps an epoch."""
    return _first(splits[0], 512), _first(splits[1], 64)


@pytest.fixture(scope="module")
def never_stopped(small: tuple[MnistTensors, MnistTensors]) -> ClassifierResult:
    with one_torch_thread():  # as the resumed runs it is compared with
        return train_classifier(*small, epochs=2, seed=1)


# in the first epoch, at its end, in the second, at the last step (of 8): the accuracy comes on resume
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("stop_after", [1, 4, 7, 8])
def test_an_interrupted_training_resumes_to_the_weights_of_one_never_stopped(
    small: tuple[MnistTensors, MnistTensors], never_stopped: ClassifierResult, tmp_path: Path, stop_after: int
) -> None:
    train, test = small
    state = tmp_path / "classifier_resume.pt"
    stopped = train_classifier(train, test, epochs=2, seed=1, state_path=state, should_stop=_stopping_after(stop_after))
    assert (stopped.test_accuracy, stopped.step) == (None, stop_after) and state.is_file()
    with pytest.raises(CheckpointError, match=r"is a run of --seed 1, not 2: resume it with the options"):
        load_state(state, recipe_of(train, 2, BATCH_SIZE, 2), 8)
    with pytest.raises(CheckpointError, match="was trained on other MNIST training images than these"):
        load_state(state, recipe_of(_first(train, 500), 2, BATCH_SIZE, 1), 8)
    saved = load_state(state, recipe_of(train, 2, BATCH_SIZE, 1), 8)
    resumed = train_classifier(train, test, epochs=2, seed=1, state_path=state, resume_from=saved)
    assert (resumed.test_accuracy, resumed.step) == (never_stopped.test_accuracy, 8)
    weights, again = never_stopped.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(weights[name], again[name]) for name in weights)


def test_a_stop_at_the_last_step_with_no_state_to_keep_finishes_the_run(
    small: tuple[MnistTensors, MnistTensors], never_stopped: ClassifierResult
) -> None:
    """Nothing could resume it: stopping there would only throw the trained classifier away."""
    result = train_classifier(*small, epochs=2, seed=1, should_stop=_stopping_after(8))
    assert (result.test_accuracy, result.step) == (never_stopped.test_accuracy, 8)


def test_a_run_keeps_its_state_after_each_epoch_the_last_too(
    small: tuple[MnistTensors, MnistTensors], tmp_path: Path
) -> None:
    """What a run killed outright (no signal it can catch) leaves to resume from; after the last epoch too, so that
    a stop during the test or the export after it loses no training (it had lost the last epoch)."""
    state, saved = tmp_path / "classifier_resume.pt", []
    result = train_classifier(
        *small, epochs=3, state_path=state, progress=lambda step, total: saved.append(state.is_file())
    )
    assert result.step == 12 and saved == [False] * 4 + [True] * 8  # written after step 4; the caller removes it
    last = load_state(state, recipe_of(small[0], 3, BATCH_SIZE, 0), 12)
    assert last["step"] == 12
    resumed = train_classifier(*small, epochs=3, state_path=state, resume_from=last)  # nothing left but the test
    assert (resumed.step, resumed.test_accuracy) == (12, result.test_accuracy)
    weights, again = result.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(weights[name], again[name]) for name in weights)


@pytest.fixture
def stopped_at_step_2(small: tuple[MnistTensors, MnistTensors], tmp_path: Path) -> Path:
    """The state a run of 2 epochs (8 steps), seed 1, keeps when stopped after its second step."""
    state = tmp_path / "classifier_resume.pt"
    train_classifier(*small, epochs=2, seed=1, state_path=state, should_stop=_stopping_after(2))
    return state


def test_a_state_that_is_not_this_runs_or_is_damaged_is_refused_in_words(
    small: tuple[MnistTensors, MnistTensors], stopped_at_step_2: Path
) -> None:
    train, test = small
    state = stopped_at_step_2
    recipe, saved = recipe_of(train, 2, BATCH_SIZE, 1), torch.load(state, weights_only=True)
    for change, words in [
        ({"kind": "reference classifier"}, f"{state}: not the training state of train-classifier"),
        (
            {"format_version": 2},
            f"{state}: training state format 2, this version reads 1; start over with --overwrite in",
        ),
        ({"step": 9}, f"{state}: a damaged training state (step 9 of 8)"),
        ({"order": None}, f"{state}: a damaged training state (step 2 of 8)"),
        ({"recipe": {**recipe, "epochs": 3}}, f"{state} is a run of --epochs 3, not 2: resume it with the options"),
    ]:
        torch.save({**saved, **change}, state)
        with pytest.raises(CheckpointError) as refused:
            load_state(state, recipe, 8)
        assert str(refused.value).startswith(words)
    torch.save({**saved, "optimizer": {"state": {}}}, state)
    with pytest.raises(CheckpointError, match=rf"^{state}: a damaged training state \("):
        train_classifier(train, test, epochs=2, seed=1, state_path=state, resume_from=load_state(state, recipe, 8))
    with pytest.raises(TrainingError, match="a resumed training writes its state at state_path; none was given"):
        train_classifier(train, test, epochs=2, seed=1, resume_from=saved)


def test_finding_is_why_a_state_cannot_be_continued_without_train_classifier_s_advice(tmp_path: Path) -> None:
    """What `evaluate --cas` notes: the finding alone, as a damaged state's whole message."""
    state = tmp_path / "classifier_resume.pt"
    torch.save({"kind": "reference classifier training state", "format_version": 2, "recipe": {}}, state)
    with pytest.raises(UnusableStateError) as refused:
        load_state(state, {"epochs": 1, "batch_size": BATCH_SIZE, "seed": 0, "data": "digest"}, 8)
    words = f"{state}: training state format 2, this version reads 1"
    assert (refused.value.finding, str(refused.value)) == (words, f"{words}; {START_OVER_INSTEAD}")
    assert finding(refused.value) == words
    assert finding(CheckpointError(f"{state}: not the training state of train-classifier")) == (
        f"{state}: not the training state of train-classifier"
    )


def _wrong_moment(payload: dict) -> None:
    payload["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)


def _order_out_of_range(payload: dict) -> None:
    payload["order"][0] = 10**9


def _schedule_at(payload: dict, step: int) -> None:
    payload["schedule"]["last_epoch"] = step


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda p: p.update({"model": {}}), "Missing key(s) in state_dict: "),
        (lambda p: p.pop("model"), "'model'"),
        (lambda p: p.update({"optimizer": "x"}), "the classifier optimizer's state does not load ("),
        (_wrong_moment, "the classifier optimizer's exp_avg is (3,) for a parameter of "),
        (lambda p: p["optimizer"]["state"][0].update({"exp_avg": torch.tensor(1.0)}), "the classifier optimizer's exp"),
        (lambda p: p.update({"schedule": {**p["schedule"], "total_steps": "8"}}), "the schedule's state is not that "),
        (lambda p: _schedule_at(p, 5), "the schedule stands at step 5, the state at 2"),
        (lambda p: p.update({"order": p["order"].float()}), "its epoch's order is not one of the 512 images each"),
        (_order_out_of_range, "its epoch's order is not one of the 512 images each"),
        (lambda p: p.update({"order": p["order"][:-1]}), "its epoch's order is not one of the 512 images each"),
        (lambda p: p.update({"torch_rng": torch.zeros(3, dtype=torch.uint8)}), "Expected a CPUGeneratorImplState"),
    ],
    ids=[
        "model-empty",
        "model-missing",
        "optimizer-text",
        "moment-shape",
        "moment-0-dim",
        "schedule-kind",
        "schedule-step",
        "order-float",
        "order-range",
        "order-short",
        "torch-rng",
    ],
)
def test_a_damaged_state_is_refused_before_any_step_with_the_first_line_of_why(
    small: tuple[MnistTensors, MnistTensors], stopped_at_step_2: Path, edit: Callable[[dict], object], why: str
) -> None:
    """Not a traceback at its first step (an IndexError, an AttributeError, a RuntimeError in Adam)."""
    train, state = small[0], stopped_at_step_2
    payload = torch.load(state, weights_only=True)
    edit(payload)
    torch.save(payload, state)
    before = torch.get_rng_state()
    with pytest.raises(CheckpointError) as refused:
        load_resumable_state(state, recipe_of(train, 2, BATCH_SIZE, 1), 8, len(train.images))
    assert str(refused.value).startswith(f"{state}: a damaged training state ({why}"), refused.value
    shown_alone = refused.value.__context__ is None or refused.value.__suppress_context__  # no chain of torch's
    assert refused.value.__cause__ is None and shown_alone
    assert torch.equal(torch.get_rng_state(), before)  # the trial restore leaves torch's own generator alone


def test_a_state_that_restores_is_read_and_leaves_torch_s_generator_alone(
    small: tuple[MnistTensors, MnistTensors], stopped_at_step_2: Path
) -> None:
    train, state = small[0], stopped_at_step_2
    before = torch.get_rng_state()
    assert load_resumable_state(state, recipe_of(train, 2, BATCH_SIZE, 1), 8, len(train.images))["step"] == 2
    assert torch.equal(torch.get_rng_state(), before)


def test_the_state_is_kept_beside_the_onnx_file_it_was_to_write(tmp_path: Path) -> None:
    assert state_path_beside(tmp_path / "out" / "classifier.onnx") == tmp_path / "out" / "classifier_resume.pt"
    assert state_path_beside("evaluator.v2.onnx") == Path("evaluator.v2_resume.pt")


def test_check_resume_continues_or_replaces_a_state_and_never_loses_one(tmp_path: Path) -> None:
    state = tmp_path / "classifier_resume.pt"
    check_resume(state, resume=False, overwrite=False)  # nothing there: a new run
    check_resume(state, resume=False, overwrite=True)
    with pytest.raises(CheckpointError) as refused:
        check_resume(state, resume=True, overwrite=False)
    assert (
        str(refused.value) == f"nothing to resume: {state} (what an interrupted run of this command leaves) not found"
    )
    save_state(state, {"epochs": 1}, 1, {})
    written = state.read_bytes()
    check_resume(state, resume=True, overwrite=False)
    check_resume(state, resume=True, overwrite=True)  # a run started with --overwrite goes on to replace its outputs
    check_resume(state, resume=False, overwrite=True)  # started over
    with pytest.raises(CheckpointError) as refused:
        check_resume(state, resume=False, overwrite=False)
    assert str(refused.value) == (
        f"{state} holds an interrupted run of this command: continue it with --resume, or start over with --overwrite"
    )
    assert state.read_bytes() == written
    other_kinds = tmp_path / "other.pt", tmp_path / "list.pt"
    torch.save({"kind": "generator checkpoint"}, other_kinds[0])
    torch.save([1, 2], other_kinds[1])
    for foreign in (b"notes of mine", *(path.read_bytes() for path in other_kinds)):
        state.write_bytes(foreign)  # a file no run of train-classifier wrote, never taken for its state
        for resume, overwrite in itertools.product((True, False), repeat=2):
            with pytest.raises(CheckpointError) as refused:
                check_resume(state, resume=resume, overwrite=overwrite)
            assert str(refused.value) == (
                f"{state} is not a training state of train-classifier, so no run of this command left it there; "
                "move it, or give --out another name"
            )
        assert state.read_bytes() == foreign
    state.write_bytes(written[: len(written) // 2])  # a state cut short is this command's, damaged: replaced
    check_resume(state, resume=False, overwrite=True)
    state.unlink()
    state.mkdir()
    for resume in (True, False):
        with pytest.raises(OutputError, match="is a folder, not a file"):
            check_resume(state, resume=resume, overwrite=True)


def test_a_state_that_is_not_there_is_nothing_to_resume(tmp_path: Path) -> None:
    state = tmp_path / "classifier_resume.pt"
    with pytest.raises(CheckpointError) as refused:
        load_state(state, {"epochs": 1, "batch_size": BATCH_SIZE, "seed": 0, "data": "digest"}, 8)
    assert str(refused.value) == f"nothing to resume: {state}"


def test_load_state_takes_a_step_within_the_run_only(tmp_path: Path) -> None:
    """What a state must hold besides its recipe: an int step from 1 to the total (a stop at the last step leaves
    the accuracy to the resumed run), and an order."""
    state, recipe = tmp_path / "classifier_resume.pt", {"epochs": 2, "batch_size": BATCH_SIZE, "seed": 1, "data": "d"}
    kept = {"kind": "reference classifier training state", "format_version": 1, "recipe": recipe}
    for step in (1, 7, 8):
        torch.save({**kept, "step": step, "order": torch.arange(4)}, state)
        assert load_state(state, recipe, 8)["step"] == step
    for step in (0, 9, -1, 2.0, True, "2", None):
        torch.save({**kept, "step": step, "order": torch.arange(4)}, state)
        with pytest.raises(CheckpointError) as refused:
            load_state(state, recipe, 8)
        assert str(refused.value) == f"{state}: a damaged training state (step {step!r} of 8)"
    for payload, words in [
        (["reference classifier training state"], ": not the training state of train-classifier"),
        ({**kept, "recipe": [recipe]}, f": training state format 1, this version reads 1; {START_OVER_INSTEAD}"),
        (
            {**kept, "recipe": {**recipe, "batch_size": 64}},
            f" is a run of batch size 64, not {BATCH_SIZE}: resume it with the options it was started with, or "
            + START_OVER_INSTEAD,
        ),
        (
            {**kept, "recipe": {**recipe, "data": "other"}},
            " was trained on other MNIST training images than these: resume it on its own data (--data-dir), or "
            + START_OVER_INSTEAD,
        ),
        # tensors where numbers belong: compared item by item, they had ended in a RuntimeError's traceback
        (
            {**kept, "format_version": torch.zeros(3)},
            f": training state format a Tensor, this version reads 1; {START_OVER_INSTEAD}",
        ),
        (
            {**kept, "recipe": {**recipe, "epochs": torch.ones(2)}},
            " is a run of --epochs a Tensor, not 2: resume it with the options it was started with, or "
            + START_OVER_INSTEAD,
        ),
        (
            {**kept, "recipe": {**recipe, "data": torch.ones(2)}},
            " was trained on other MNIST training images than these: resume it on its own data (--data-dir), or "
            + START_OVER_INSTEAD,
        ),
    ]:
        torch.save({"step": 1, "order": torch.arange(4), **payload} if isinstance(payload, dict) else payload, state)
        with pytest.raises(CheckpointError) as refused:
            load_state(state, recipe, 8)
        assert str(refused.value) == f"{state}{words}"
