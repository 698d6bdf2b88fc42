from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from digitgen.training.config import GANConfig, TrainConfig
from digitgen.training.data import load_mnist
from digitgen.training.loop import train
from digitgen.training.state import new_state
from tests.helpers import one_torch_thread, write_tiny_mnist

# Tests run by a shell in the background ignore SIGINT, under nohup SIGHUP: the commands they start would inherit
# that and, as digitgen keeps an ignored stop signal ignored, never stop on the signals the tests send. Caught by a
# handler that does nothing instead, a signal still passes the tests by, as the shell meant, while the commands they
# start begin with its default action (a handler, unlike an ignored signal, is not passed on to a program started).
for _name in ("SIGINT", "SIGHUP"):
    if hasattr(signal, _name) and signal.getsignal(getattr(signal, _name)) is signal.SIG_IGN:
        signal.signal(getattr(signal, _name), lambda _signum, _frame: None)

TINY_MODEL = GANConfig(latent_dim=8, g_width=16, d_width=16)
REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "datasets"
# Mutation testing runs the runtime tests once per mutant: there the tiny models, which only the
# (unmutated) training and export layers make, are built once and reused from this folder.
PREBUILT = os.environ.get("DIGITGEN_TEST_PREBUILT")


def prebuilt(name: str, build: Callable[[], Path]) -> Path:
    """``build()``, or its copy in ``$DIGITGEN_TEST_PREBUILT`` when that is set."""
    if not PREBUILT:
        return build()
    kept = Path(PREBUILT) / name
    if not kept.exists():
        shutil.copy(build(), kept)
    return kept


def train_tiny(
    run_dir: Path, data_root: Path, steps: int = 4, seed: int = 0, model: GANConfig = TINY_MODEL, **overrides
) -> Path:
    """Train a tiny configuration for a few steps on CPU and return its checkpoint."""
    settings = TrainConfig(total_steps=steps, batch_size=16, seed=seed, **overrides)
    state = new_state(model, settings, torch.device("cpu"))
    return train(state, load_mnist(data_root, download=False), run_dir).checkpoint


@pytest.fixture
def one_thread() -> Iterator[None]:
    """A test on :func:`~tests.helpers.one_torch_thread`."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_mnist: Path) -> Path:
    return train_tiny(tmp_path_factory.mktemp("run"), tiny_mnist)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    from digitgen.export.onnx_export import export_generator

    def build() -> Path:
        path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
        export_generator(request.getfixturevalue("tiny_checkpoint"), path)
        return path

    return prebuilt("tiny.onnx", build)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from digitgen.export.classifier_export import export_classifier
    from digitgen.training.classifier import Classifier

    def build() -> Path:
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp("cls") / "classifier.onnx"
        export_classifier(Classifier(), path, test_accuracy=0.0)
        return path

    return prebuilt("classifier.onnx", build)
