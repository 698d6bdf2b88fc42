"""Classification accuracy score (Ravuri & Vinyals 2019): train a classifier on generated digits,
test it on real ones, beside the same recipe trained on real digits."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import weakref
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import numpy as np
import torch

from digitgen.runtime.errors import OutputError
from digitgen.runtime.evaluate import Cas
from digitgen.runtime.files import atomic_file, locking_available, open_locked, try_flock
from digitgen.runtime.generator import DigitGenerator
from digitgen.runtime.text import read_json
from digitgen.training.classifier import (
    BATCH_SIZE,
    check_classifier_data,
    load_resumable_state,
    train_classifier,
    training_steps,
)
from digitgen.training.classifier_resume import finding, recipe_of
from digitgen.training.data import MnistTensors
from digitgen.training.errors import CheckpointError

PER_CLASS = 6_000  # 60,000 generated digits, as many as MNIST's training set
EPOCHS = 4  # the reference classifier's recipe (`train-classifier --epochs 4`)
CLASSIFIER_SEED = 0

Split = tuple[np.ndarray, np.ndarray]


def default_state_dir() -> Path:
    """Where ``evaluate --cas`` keeps its training state while it runs: ``$XDG_CACHE_HOME/digitgen`` (by default,
    and where that is not an absolute path, which the XDG spec says to ignore, ``~/.cache/digitgen``), made if
    missing; :class:`OutputError` if it cannot be."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", ""))
    try:
        folder = (cache if cache.is_absolute() else Path.home() / ".cache") / "digitgen"
    except RuntimeError:  # no HOME, and a user the system has no entry for (a container run as another user id)
        raise OutputError(
            "no home folder to keep evaluate --cas's state in (HOME is not set): set XDG_CACHE_HOME to a folder it "
            "can write"
        ) from None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot make {folder}, where evaluate --cas keeps its state ({exc.strerror}): set XDG_CACHE_HOME to a "
            "folder it can write"
        ) from None
    return folder


def cas_work(num_real: int, per_class: int = PER_CLASS, epochs: int = EPOCHS) -> int:
    """Optimizer steps of a :class:`CasRun` (its ``progress`` total)."""
    return training_steps(10 * per_class, epochs) + training_steps(num_real, epochs)


def _tensors(split: Split) -> MnistTensors:
    return MnistTensors(torch.tensor(split[0]), torch.tensor(split[1], dtype=torch.int64))


def accuracy_when_trained_on(
    train: Split, test: Split, *, epochs: int = EPOCHS, progress: Callable[[], None] = lambda: None
) -> float:
    """MNIST ``test`` accuracy of the reference architecture trained on ``train`` (CAS's recipe and seed)."""
    result = train_classifier(
        _tensors(train), _tensors(test), epochs=epochs, seed=CLASSIFIER_SEED, progress=lambda done, total: progress()
    )
    return result.test_accuracy


class CasRun:
    """Test accuracy of the reference architecture trained on ``10 * per_class`` generated digits (noise ``seed``,
    digits 0-9 in turn) and, with the same recipe and seed, on the real ``train``.

    It can be stopped and continued: with ``state_dir``,
    each classifier's training state is kept there while it trains (and the first one's accuracy once known),
    under names of this request (model, seed, truncation, recipe and data), and a later run of the same request
    continues from them to the same scores. They are removed at the end. The request's state is one run's at a
    time: from the run's making until :meth:`run` returns (or the run is dropped) it holds a lock file beside the
    state, and a run of the same request made meanwhile keeps no state, says so in :attr:`notes`, and starts over
    if stopped."""

    def __init__(
        self,
        generator: DigitGenerator,
        train: Split,
        test: Split,
        *,
        seed: int = 0,
        truncation: float | None = None,
        per_class: int | None = None,
        epochs: int | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.generator, self.train, self.test = generator, _tensors(train), _tensors(test)
        check_classifier_data(self.train, self.test)  # before any work, not when the second classifier starts
        self.seed, self.truncation = seed, truncation
        self.per_class = PER_CLASS if per_class is None else per_class  # read here, so that a test can make them small
        self.epochs = EPOCHS if epochs is None else epochs
        self.notes: list[str] = []  # state files found but not continued, in words
        self.paths: dict[str, Path] = {}
        self.resumed: dict[str, dict | None] = {"generated": None, "real": None}
        self.generated_accuracy: float | None = None
        self._let_go: Callable[[], object] = lambda: None  # of the request's lock, once this run holds it
        if state_dir is not None:
            self._find_state(state_dir)

    @property
    def keeps_state(self) -> bool:
        """Whether a stopped run leaves its state for the same request to continue."""
        return bool(self.paths)

    @property
    def total(self) -> int:
        """Optimizer steps of the whole request (its ``progress`` total)."""
        return cas_work(len(self.train.images), self.per_class, self.epochs)

    @property
    def done(self) -> int:
        """Steps an earlier run of this request did, which this one continues from."""
        first = training_steps(10 * self.per_class, self.epochs)
        steps = {name: payload["step"] if payload else 0 for name, payload in self.resumed.items()}
        return (first if self.generated_accuracy is not None else steps["generated"]) + steps["real"]

    def _find_state(self, state_dir: Path) -> None:
        key = hashlib.sha256(
            json.dumps(
                [self.generator.sha256, self.seed, self.truncation, self.per_class, self.epochs, CLASSIFIER_SEED]
                + [split.sha256() for split in (self.train, self.test)]
            ).encode()
        ).hexdigest()[:32]
        lock = _claim(state_dir / f"cas-{key}.lock")
        if lock is None:
            self.notes.append(
                f"another evaluate --cas of this request is running and keeps its state in {state_dir}; this one "
                "keeps none (stopped, it starts over)"
            )
            return
        self._let_go = weakref.finalize(self, _let_go_of, *lock)  # at the latest when this run is dropped
        self.paths = {name: state_dir / f"cas-{key}-{name}.pt" for name in self.resumed}
        self.paths["accuracy"] = state_dir / f"cas-{key}-generated-accuracy.json"
        try:
            self.generated_accuracy = _read_accuracy(self.paths["accuracy"])
        except CheckpointError as damaged:
            self.notes.append(f"{damaged}; trained again")
        for name, images in (("generated", 10 * self.per_class), ("real", len(self.train.images))):
            if not self.paths[name].exists() or (name == "generated" and self.generated_accuracy is not None):
                continue
            total = training_steps(images, self.epochs)
            try:
                recipe = recipe_of(self._split(name), self.epochs, BATCH_SIZE, CLASSIFIER_SEED)
                self.resumed[name] = load_resumable_state(self.paths[name], recipe, total, images)
            except CheckpointError as damaged:
                self.notes.append(f"{finding(damaged)}; trained again")

    def _split(self, name: str) -> MnistTensors:
        return self.train if name == "real" else self._generated

    @functools.cached_property
    def _generated(self) -> MnistTensors:
        fake = self.generator.generate(10 * self.per_class, seed=self.seed, truncation=self.truncation)
        return _tensors((fake.images, fake.labels))

    def run(
        self, progress: Callable[[], None] = lambda: None, should_stop: Callable[[], bool] = lambda: False
    ) -> Cas | None:
        """The scores, or ``None`` if ``should_stop`` (asked after each step) stopped it, its state kept."""
        try:
            return self._run(progress, should_stop)
        finally:
            self._let_go()

    def _run(self, progress: Callable[[], None], should_stop: Callable[[], bool]) -> Cas | None:
        if self.generated_accuracy is None:
            self.generated_accuracy = self._train("generated", progress, should_stop)
            if self.generated_accuracy is None:
                return None
            if self.paths:
                _write_accuracy(self.paths["accuracy"], self.generated_accuracy)
                self.paths["generated"].unlink(missing_ok=True)
        on_real = self._train("real", progress, should_stop)
        if on_real is None:
            return None
        for path in self.paths.values():
            path.unlink(missing_ok=True)
        return Cas(
            generated=self.generated_accuracy,
            real=on_real,
            num_generated=10 * self.per_class,
            num_real=len(self.train.images),
            epochs=self.epochs,
        )

    def _train(self, name: str, progress: Callable[[], None], should_stop: Callable[[], bool]) -> float | None:
        result = train_classifier(
            self._split(name),
            self.test,
            epochs=self.epochs,
            seed=CLASSIFIER_SEED,
            progress=lambda done, total: progress(),
            state_path=self.paths.get(name),
            resume_from=self.resumed[name],
            should_stop=should_stop,
        )
        return result.test_accuracy


def _claim(path: Path) -> tuple[int, Path] | None:
    """``path`` opened (made if need be) and locked by this process, or ``None`` while another holds it."""
    fd = open_locked(
        path,
        try_flock,
        lambda exc: OutputError(f"cannot make {path}, where evaluate --cas locks its state: {exc.strerror}"),
        mode=0o600,
    )
    return None if fd is None else (fd, path)


def _let_go_of(fd: int, path: Path) -> None:
    """Remove the lock file, then let go of its lock, so that no run locks a file no longer named (where there are
    no locks, Windows, closed first: it removes no open file). A lock file that stays costs nothing, and never the
    run its scores."""
    locked = locking_available()
    if not locked:
        os.close(fd)
    with suppress(OSError):
        path.unlink(missing_ok=True)
    if locked:
        os.close(fd)


def _read_accuracy(path: Path) -> float | None:
    """The accuracy :func:`_write_accuracy` kept in ``path``, ``None`` if there is none; :class:`CheckpointError`
    if it does not read as one."""
    if not path.exists():
        return None
    try:
        accuracy = read_json(path.read_bytes())["accuracy"]  # type: ignore[index]
    except (OSError, ValueError, TypeError, KeyError):
        accuracy = None
    if type(accuracy) is not float or not 0 <= accuracy <= 1:
        raise CheckpointError(f"{path}: not an accuracy kept by evaluate --cas (damaged?)")
    return accuracy


def _write_accuracy(path: Path, accuracy: float) -> None:
    with atomic_file(path) as f:
        f.write(json.dumps({"accuracy": accuracy}).encode())
