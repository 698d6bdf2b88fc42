"""Training learns: a short CPU run on real MNIST makes label-correct digits by the shipped classifier,
where the same generator before training scores at chance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from digitgen.export.onnx_export import export_generator
from digitgen.runtime import DigitGenerator
from digitgen.runtime.evaluate import ReferenceClassifier
from digitgen.training.checkpoint import save_checkpoint
from digitgen.training.config import GANConfig, TrainConfig
from digitgen.training.data import load_mnist
from digitgen.training.loop import train
from digitgen.training.state import new_state, state_to_checkpoint
from tests.conftest import SHARED_MNIST

SHORT_RUN = TrainConfig(total_steps=600, batch_size=64, seed=0, checkpoint_every=600)  # on all 60,000 images

pytestmark = pytest.mark.skipif(
    not (SHARED_MNIST / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file(),
    reason="needs the real MNIST in ../shared/datasets",
)


def class_accuracy(checkpoint: Path, tmp_path: Path, num_samples: int = 2000) -> float:
    model = tmp_path / f"{checkpoint.parent.name}.onnx"
    export_generator(checkpoint, model)
    digits = DigitGenerator.from_path(model, "cpu").generate(num_samples, seed=0)
    _, predicted = ReferenceClassifier().embed(digits.images)
    return float((predicted == digits.labels).mean())


def test_short_cpu_run_learns_label_correct_digits(tmp_path: Path) -> None:
    state = new_state(GANConfig(), SHORT_RUN, torch.device("cpu"))
    untrained = tmp_path / "untrained" / "checkpoint.pt"
    untrained.parent.mkdir()
    save_checkpoint(state_to_checkpoint(state), untrained)

    trained = train(state, load_mnist(SHARED_MNIST, download=False), tmp_path / "trained").checkpoint

    assert class_accuracy(untrained, tmp_path) < 0.25
    assert class_accuracy(trained, tmp_path) >= 0.5
