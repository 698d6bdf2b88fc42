"""The shipped release rebuilds from the repository, through the supported (torch.export) exporter."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from digitgen.cli import main
from digitgen.export.onnx_export import STACK_TRACE, export_generator, verify_file
from digitgen.runtime import DigitGenerator, default_model_path
from digitgen.runtime.noise import standard_normal
from digitgen.training.checkpoint import load_checkpoint
from digitgen.training.errors import CheckpointError
from digitgen.training.state import load_generator
from tests.conftest import REPO
from tests.helpers import assert_int8_qdq

SHIPPED_WEIGHTS = REPO / "artifacts" / "generator_weights.pt"


def _images(model: Path, count: int = 64) -> np.ndarray:
    gen = DigitGenerator.from_path(model, "cpu")
    return gen.run(standard_normal(3, 0, count, gen.latent_dim), np.arange(count) % gen.num_classes)


def test_export_raises_no_deprecation_warning_from_torch_onnx(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_generator(tiny_checkpoint, tmp_path / "g.onnx")
    deprecated = [
        w
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning)) and "torch/onnx" in Path(w.filename).as_posix()
    ]
    assert not deprecated, [str(w.message) for w in deprecated]


def test_shipped_weights_rebuild_the_shipped_model_byte_for_byte(tmp_path: Path) -> None:
    """The README's rebuild command, from wherever the checkout lies (with the pinned torch and the exporter
    versions CI installs): no path of the machine that exported it is in the file."""
    rebuilt = tmp_path / "generator.onnx"
    evaluation = json.loads((REPO / "artifacts" / "evaluation.json").read_text())
    report = export_generator(SHIPPED_WEIGHTS, rebuilt, evaluation=evaluation)
    assert report.passed
    assert rebuilt.read_bytes() == default_model_path().read_bytes()
    assert verify_file(default_model_path(), SHIPPED_WEIGHTS).passed


def test_exports_carry_no_stack_traces(tiny_onnx: Path) -> None:
    """The exporter's per-node Python stacks name the source files of the machine that ran it."""
    for model in (tiny_onnx, default_model_path(), REPO / "artifacts" / "classifier.onnx"):
        nodes = onnx.load(str(model)).graph.node
        assert nodes and not [p for node in nodes for p in node.metadata_props if p.key == STACK_TRACE]
        assert b'File "' not in model.read_bytes()


@pytest.mark.filterwarnings("ignore::UserWarning")  # onnxruntime's quantizer suggests pre-processing
def test_shipped_weights_export_to_int8_within_its_tolerance(tmp_path: Path) -> None:
    """On CPUs without VNNI (AVX2 only), 8-bit weights saturate onnxruntime's u8s8 kernels: 0.45 off."""
    out = tmp_path / "generator-int8.onnx"
    report = export_generator(SHIPPED_WEIGHTS, out, precision="int8")
    assert report.passed and report.tolerance.max_abs == 0.3  # export_generator raises, leaving no file, when it fails
    assert_int8_qdq(out)  # at full size too: the exporter folds a small model's weight slices, not these


def test_release_weights_export_but_do_not_resume(tmp_path: Path, tiny_checkpoint: Path) -> None:
    weights = tmp_path / "weights.pt"
    export_generator(tiny_checkpoint, tmp_path / "g.onnx", weights_out=weights)
    _, config, payload = load_generator(str(weights))
    assert set(payload) == {"format_version", "config", "train", "step", "generator_ema"}
    assert config.latent_dim == 8 and payload["step"] == 4
    with pytest.raises(CheckpointError, match="not resumed"):
        load_checkpoint(weights)
    assert np.array_equal(_images(tmp_path / "g.onnx"), _images(_reexport(weights, tmp_path / "again.onnx")))


def _reexport(weights: Path, out: Path) -> Path:
    export_generator(weights, out)
    return out


def test_resume_from_release_weights_is_one_clear_line(tmp_path: Path, tiny_mnist: Path) -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(
        main, ["train", "--data-dir", str(tiny_mnist), "--out", str(tmp_path / "run"), "--resume", str(SHIPPED_WEIGHTS)]
    )
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        f"Error: {SHIPPED_WEIGHTS}: holds generator weights only (no discriminator or optimizer state): "
        "it can be exported and verified, not resumed; start a new run instead"
    ]
