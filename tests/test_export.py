"""Export parity and metadata on a tiny freshly trained model."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from click.testing import CliRunner

import digitgen.export.onnx_export as onnx_export
import digitgen.export.quality as quality
import digitgen.export.verify as verify
from digitgen.cli import main
from digitgen.export.errors import ExportError, ExportVerificationError
from digitgen.export.onnx_export import export_generator, verify_file, write_metadata
from digitgen.export.tolerances import ATOL, PAGE_OPSET, TOLERANCES
from digitgen.export.verify import BATCH_SIZES, FAR_OFF, ParityCase, ParityReport, graph_precision
from digitgen.runtime import DigitGenerator
from digitgen.runtime.contract import CONTRACT_VERSION
from digitgen.runtime.errors import ModelContractError, OutputError
from digitgen.runtime.session import open_session
from digitgen.training.config import GANConfig
from tests.conftest import train_tiny
from tests.helpers import shape_hidden_from_inference


def test_export_passes_parity_on_every_case(tmp_path: Path, tiny_checkpoint: Path) -> None:
    report = export_generator(tiny_checkpoint, tmp_path / "g.onnx")
    assert report.passed and report.tolerance.max_abs == ATOL
    assert {c.batch_size for c in report.cases} == set(BATCH_SIZES) >= {1, 7, 64}
    assert len({c.seed for c in report.cases}) >= 2
    assert all(c.max_abs_diff <= ATOL for c in report.cases)


def test_exported_model_carries_contract_and_metadata(tiny_onnx: Path) -> None:
    model = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["z", "digit"]
    assert [o.name for o in model.graph.output] == ["image"]
    edges = [*model.graph.input, *model.graph.output]
    assert {edge.type.tensor_type.shape.dim[0].dim_param for edge in edges} == {"batch"}  # one dynamic batch axis
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["latent_dim"] == "8" and meta["num_classes"] == "10" and meta["image_size"] == "28"
    assert meta["contract_version"] == "1" and meta["train_steps"] == "4"


def test_metadata_names_the_recipe_that_trained_the_weights() -> None:
    """The file says how it was trained: every entry, from the contract to the classifier weights."""
    config = {"latent_dim": 64, "num_classes": 10, "image_size": 28, "conditional_norm": True}
    train = {"batch_size": 128, "seed": 1, "lr": 2e-4, "lr_d": 4e-4, "lr_decay_steps": 3744, "train_images": 60000}
    label = {"label_weight": 0.1, "label_weight_falls": True, "label_weight_floor": 0.05}
    label["label_digit_weights"] = "4=2.5,7=2.5"
    payload = {"config": config, "step": 7488, "train": {**train, "adc_weight": 0.5, **label}}
    contract = {"latent_dim": "64", "num_classes": "10", "image_size": "28", "contract_version": CONTRACT_VERSION}
    assert onnx_export.contract_metadata(payload) == {
        **contract,
        "producer": "digitgen",
        "train_dataset": "MNIST train (60000 images)",
        "train_steps": "7488",
        "train_batch_size": "128",
        "train_seed": "1",
        "train_lr_decay_steps": "3744",
        "train_lr": "0.0002",
        "train_lr_d": "0.0004",
        "train_conditional_norm": "true",
        "train_adc_weight": "0.5",
        "train_label_weight": "0.1",
        "train_label_weight_falls": "true",
        "weights": "generator EMA",
        "train_label_weight_floor": "0.05",
        "train_label_digit_weights": "4=2.5,7=2.5",
    }
    # a run on a subset, from before two time-scales, the decay and the classifier terms
    older_train = {"batch_size": 64, "seed": 0, "lr": 2e-4, "lr_d": None, "subset": 512}
    older = {"config": {**config, "conditional_norm": False}, "step": 10, "train": older_train}
    meta = onnx_export.contract_metadata(older)
    assert meta["train_dataset"] == "MNIST train (first 512 images)"
    assert (meta["train_lr_d"], meta["train_conditional_norm"]) == ("0.0002", "false")
    assert (meta["train_lr_decay_steps"], meta["train_adc_weight"], meta["train_label_weight"]) == ("0", "0.0", "0.0")
    assert meta["train_label_weight_falls"] == "false"
    assert "train_label_digit_weights" not in meta and "train_label_weight_floor" not in meta  # only when given
    del older_train["subset"]  # a run on all its data from before the size was recorded: no count, no guess
    assert onnx_export.contract_metadata(older)["train_dataset"] == "MNIST train"
    older_train["train_images"] = 256
    assert onnx_export.contract_metadata(older)["train_dataset"] == "MNIST train (256 images)"
    del older["config"]["conditional_norm"]  # before conditional BN existed
    assert onnx_export.contract_metadata(older)["train_conditional_norm"] == "false"


def test_verify_accepts_matching_checkpoint(tiny_onnx: Path, tiny_checkpoint: Path) -> None:
    assert verify_file(tiny_onnx, tiny_checkpoint).passed


def test_verify_rejects_another_checkpoint(tmp_path: Path, tiny_onnx: Path, tiny_mnist: Path) -> None:
    """By the run its metadata records (another run's int8 export can fall within int8's loose tolerance), and
    without that record, by its values."""
    other = train_tiny(tmp_path, tiny_mnist, steps=4, seed=7)
    with pytest.raises(ExportVerificationError) as refused:
        verify_file(tiny_onnx, other)
    assert str(refused.value) == (
        f"{tiny_onnx} records train_seed 0 where the checkpoint's is 7: it was not exported from this checkpoint"
    )
    unrecorded = tmp_path / "unrecorded.onnx"
    shutil.copy(tiny_onnx, unrecorded)
    metadata = {p.key: p.value for p in onnx.load(str(tiny_onnx)).metadata_props}
    write_metadata(unrecorded, {key: value for key, value in metadata.items() if not key.startswith("train_")})
    with pytest.raises(ExportVerificationError, match="FAIL"):
        verify_file(unrecorded, other)


def test_verify_holds_a_file_to_the_precision_its_graph_is_built_in(
    tmp_path: Path, tiny_onnx: Path, tiny_checkpoint: Path
) -> None:
    """Not to the looser one its metadata may claim: an fp32 file that says int8 would pass far more."""
    claims = tmp_path / "claims-int8.onnx"
    shutil.copy(tiny_onnx, claims)
    metadata = {p.key: p.value for p in onnx.load(str(tiny_onnx)).metadata_props}
    write_metadata(claims, {**metadata, "precision": "int8"})
    assert graph_precision(tiny_onnx) == "fp32"
    with pytest.raises(ExportVerificationError) as refused:
        verify_file(claims, tiny_checkpoint)
    assert str(refused.value) == f"{claims} says its precision is 'int8', but its graph is fp32: it was not exported so"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_named_not_blamed_on_the_export(
    tmp_path: Path, tiny_checkpoint: Path, value: float
) -> None:
    payload = torch.load(tiny_checkpoint, weights_only=True)
    name = next(iter(payload["generator_ema"]))
    payload["generator_ema"][name] = payload["generator_ema"][name] * value
    torch.save(payload, tmp_path / "diverged.pt")
    result = CliRunner().invoke(
        main, ["export", "--checkpoint", str(tmp_path / "diverged.pt"), "--out", str(tmp_path / "g.onnx")]
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path / 'diverged.pt'}: the generator's {name} holds NaN or infinite values (a run that "
        "diverged); use a checkpoint from before"
    ]
    assert not (tmp_path / "g.onnx").exists()


def test_failed_verification_leaves_no_file(tmp_path: Path, tiny_checkpoint: Path, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise ExportVerificationError("forced mismatch")

    monkeypatch.setattr(onnx_export, "verify_parity", fail)
    with pytest.raises(ExportVerificationError):
        export_generator(tiny_checkpoint, tmp_path / "g.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_interrupted_export_leaves_no_file(tmp_path: Path, tiny_checkpoint: Path, monkeypatch, precision) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "write_metadata", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_generator(tiny_checkpoint, tmp_path / "g.onnx", precision=precision)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opset", [onnx_export.DEFAULT_OPSET, onnx_export.DEFAULT_OPSET + 1])
def test_a_file_onnxruntime_cannot_load_is_named_as_the_output(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch, opset: int
) -> None:
    """As onnxruntime refuses an int8 file at an opset newer than its kernels: the exporter writes a file that
    passes ONNX's checker but holds an op onnxruntime has no kernel for, and the error names --out (not the
    hidden temporary file) and, past the default opset, the option that fixes it."""

    def write_unrunnable(model, example, path, inputs, outputs, opset):
        node = onnx.helper.make_node("Unrunnable", inputs, outputs, domain="org.digitgen.test")
        graph = onnx.helper.make_graph(
            [node],
            "g",
            [
                onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["batch", 8]),
                onnx.helper.make_tensor_value_info("digit", onnx.TensorProto.INT64, ["batch"]),
            ],
            [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", 1, 28, 28])],
        )
        imports = [onnx.helper.make_opsetid("", opset), onnx.helper.make_opsetid("org.digitgen.test", 1)]
        onnx.save(onnx.helper.make_model(graph, opset_imports=imports), str(path))

    monkeypatch.setattr(onnx_export, "to_onnx", write_unrunnable)
    out = tmp_path / "g.onnx"
    with pytest.raises(ExportError) as refused:
        export_generator(tiny_checkpoint, out, opset=opset)
    newer = f"; onnxruntime {onnxruntime.__version__} may not run opset {opset}: try a lower --opset"
    reason = "Fatal error: org.digitgen.test:Unrunnable(-1) is not a registered function/op"
    expected = f"{out} is not a valid ONNX model ({reason})"
    assert str(refused.value) == expected + (newer if opset > onnx_export.DEFAULT_OPSET else "")
    assert list(tmp_path.iterdir()) == []


def _export_with_weights(which: str, checkpoint: Path, out: Path, weights: Path) -> None:
    if which == "generator":
        export_generator(checkpoint, out, weights_out=weights, overwrite=True)
    else:
        from digitgen.export.classifier_export import export_classifier
        from digitgen.training.classifier import Classifier

        export_classifier(Classifier(), out, 0.99, weights_out=weights, overwrite=True)


def test_an_int8_export_whose_temporary_folder_is_full_names_it(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only "cannot write OUT" had been said, so that room was made on the wrong disk."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old model")
    real_to_onnx = onnx_export.to_onnx

    def full_scratch(model: object, example: object, path: Path, *args: object) -> None:
        if path.name == "fp32.onnx":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_to_onnx(model, example, path, *args)

    monkeypatch.setattr(onnx_export, "to_onnx", full_scratch)
    with pytest.raises(ExportError) as refused:
        export_generator(tiny_checkpoint, out, precision="int8", overwrite=True)
    assert str(refused.value) == (
        f"cannot write {out}: No space left on device (an int8 export also writes the fp32 model and the quantizer's "
        f"files in the temporary folder {tempfile.gettempdir()}: it needs room too; TMPDIR chooses it)"
    )
    assert [path.name for path in tmp_path.iterdir()] == ["model.onnx"] and out.read_bytes() == b"old model"


@pytest.mark.parametrize("which", ["generator", "classifier"])
def test_a_model_and_its_weights_appear_together_or_not_at_all(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch, which: str
) -> None:
    """The ONNX file is renamed into place first: when that fails, the weights must not be renamed alone (new weights
    beside an old model, or weights without their model)."""
    out, weights = tmp_path / "model.onnx", tmp_path / "weights.pt"
    out.write_bytes(b"old model")
    weights.write_bytes(b"old weights")
    real_replace = os.replace

    def replace_but_not_the_model(src, dst):
        if Path(dst) == out:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_but_not_the_model)
    with pytest.raises(OutputError, match="No space left on device"):
        _export_with_weights(which, tiny_checkpoint, out, weights)
    assert (out.read_bytes(), weights.read_bytes()) == (b"old model", b"old weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "weights.pt"]  # no temporary file left
    monkeypatch.undo()
    _export_with_weights(which, tiny_checkpoint, out, weights)
    assert out.read_bytes().startswith(b"\x08") and weights.read_bytes().startswith(b"PK")  # ONNX protobuf; torch zip


@pytest.mark.parametrize(
    ("precision", "weight_type"), [("fp16", onnx.TensorProto.FLOAT16), ("int8", onnx.TensorProto.INT8)]
)
def test_lighter_precisions_keep_the_contract_and_verify_against_fp32(
    tmp_path: Path, tiny_checkpoint: Path, precision: str, weight_type: int
) -> None:
    out = tmp_path / f"{precision}.onnx"
    report = export_generator(tiny_checkpoint, out, precision=precision)
    assert report.passed and report.tolerance == TOLERANCES[precision]

    model = onnx.load(str(out))
    assert weight_type in {t.data_type for t in model.graph.initializer}
    assert {o.domain: o.version for o in model.opset_import}[""] == onnx_export.DEFAULT_OPSET  # not torch's default
    generator = DigitGenerator.from_path(out, "cpu")
    assert generator.info.metadata["precision"] == precision
    assert generator.generate(3, seed=0).images.shape == (3, 28, 28)
    assert verify_file(out, tiny_checkpoint).tolerance == TOLERANCES[precision]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_conditional_norm_generator_exports_and_verifies(tmp_path: Path, tiny_mnist: Path, precision: str) -> None:
    model = GANConfig(latent_dim=8, g_width=16, d_width=16, conditional_norm=True)
    checkpoint = train_tiny(tmp_path / "run", tiny_mnist, model=model)
    report = export_generator(checkpoint, tmp_path / "g.onnx", precision=precision)
    assert report.passed
    assert DigitGenerator.from_path(tmp_path / "g.onnx", "cpu").generate(10, seed=0).images.shape == (10, 28, 28)


def test_lighter_precision_beyond_its_tolerance_leaves_no_file(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(ExportVerificationError, match="FAIL"):
        export_generator(tiny_checkpoint, tmp_path / "g.onnx", precision="int8", atol=1e-6)
    assert list(tmp_path.iterdir()) == []


def test_export_to_missing_directory_is_a_clear_error(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        export_generator(tiny_checkpoint, tmp_path / "nope" / "g.onnx")


def test_export_names_a_bad_precision_or_a_directory_for_output(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(ExportError, match=r"^unknown precision 'fp8'; choose one of fp32, fp16, int8$"):
        export_generator(tiny_checkpoint, tmp_path / "g.onnx", precision="fp8")
    with pytest.raises(ExportError, match=rf"^output {re.escape(str(tmp_path))} is a directory; give a file name"):
        export_generator(tiny_checkpoint, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_export_keeps_torch_exporter_progress_off_the_console(tmp_path: Path, tiny_checkpoint: Path, capfd) -> None:
    """`digitgen export` prints its own report; the exporter's step-by-step log would bury it."""
    export_generator(tiny_checkpoint, tmp_path / "g.onnx")
    captured = capfd.readouterr()
    assert "[torch.onnx]" not in captured.out + captured.err


def test_export_replaces_an_existing_file_only_with_overwrite(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from digitgen.runtime.errors import OutputError

    out = tmp_path / "g.onnx"
    out.write_bytes(b"mine")
    with pytest.raises(OutputError, match="already exists"):
        export_generator(tiny_checkpoint, out)
    assert out.read_bytes() == b"mine"
    assert export_generator(tiny_checkpoint, out, overwrite=True).passed
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["z", "digit"]


EVALUATION = {
    "generated": {
        "num_samples": 100,
        "class_accuracy": 0.987654,
        "per_digit_accuracy": [0.99, 0.95, 0.971234, 1.0, 0.98, 0.99, 0.99, 0.99, 0.99, 0.99],
        "fid": 12.345678,
        "precision": 0.81234,
        "recall": 0.71234,
    },
    "real": {"fid": 1.234567, "precision": 0.91234, "recall": 0.61234},
}


def test_quality_metadata_holds_the_headline_figures_to_four_decimals() -> None:
    assert quality.quality_metadata(EVALUATION) == {
        "quality_num_samples": "100",
        "quality_class_accuracy": "0.9877",
        "quality_min_digit_accuracy": "0.9500",
        "quality_fid": "12.3457",
        "quality_precision": "0.8123",
        "quality_recall": "0.7123",
        "quality_real_fid": "1.2346",
        "quality_real_precision": "0.9123",
        "quality_real_recall": "0.6123",
    }


def _changed(part: str, key: str, value: object) -> dict:
    return {**EVALUATION, part: {**EVALUATION[part], key: value}}


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ({"real": EVALUATION["real"]}, "missing or bad 'generated'"),
        ({"generated": EVALUATION["generated"]}, "missing or bad 'real'"),
        (_changed("generated", "fid", "n/a"), "generated.fid is 'n/a', not a number 0 or more"),
        (_changed("generated", "fid", float("nan")), "generated.fid is nan, not a number 0 or more"),
        (_changed("generated", "fid", -1.0), "generated.fid is -1.0, not a number 0 or more"),
        (_changed("generated", "fid", float("inf")), "generated.fid is inf, not a number 0 or more"),
        pytest.param(  # JSON's ints have no bound, and no float holds this one
            _changed("generated", "fid", 10**400), f"generated.fid is {10**400}, not a number 0 or more", id="fid-huge"
        ),
        pytest.param(
            _changed("real", "recall", -(10**400)), f"real.recall is {-(10**400)}, not a number from 0 to 1", id="neg"
        ),
        (_changed("generated", "class_accuracy", "NaN"), "generated.class_accuracy is 'NaN', not a number from 0 to 1"),
        (_changed("generated", "class_accuracy", 5.0), "generated.class_accuracy is 5.0, not a number from 0 to 1"),
        (_changed("generated", "precision", True), "generated.precision is True, not a number from 0 to 1"),
        (_changed("generated", "recall", float("inf")), "generated.recall is inf, not a number from 0 to 1"),
        (_changed("generated", "per_digit_accuracy", None), "generated.per_digit_accuracy is None, not a list"),
        (_changed("generated", "per_digit_accuracy", []), "generated.per_digit_accuracy is \\[\\], not a list"),
        (
            _changed("generated", "per_digit_accuracy", [1.0, 1.5]),
            "generated.per_digit_accuracy is 1.5, not a number from 0 to 1",
        ),
        (_changed("generated", "num_samples", 0), "generated.num_samples is 0, not a count of digits"),
        (_changed("generated", "num_samples", 10.5), "generated.num_samples is 10.5, not a count of digits"),
        (
            _changed("generated", "num_samples", 2**63 + 1),
            f"generated.num_samples is {2**63 + 1}, not a count of digits",
        ),
        (_changed("real", "recall", None), "real.recall is None, not a number from 0 to 1"),
        (_changed("real", "precision", "high"), "real.precision is 'high', not a number from 0 to 1"),
        (_changed("real", "fid", float("-inf")), "real.fid is -inf, not a number 0 or more"),
        ([1, 2], "a JSON list"),
    ],
)
def test_quality_metadata_refuses_what_evaluate_does_not_write(broken: object, reason: str) -> None:
    with pytest.raises(ExportError, match=f"^not an evaluation from `digitgen evaluate --json`: {reason}$"):
        quality.quality_metadata(broken)


def test_quality_metadata_takes_each_figure_at_the_edges_of_its_range() -> None:
    edges = {"num_samples": 1, "class_accuracy": 0, "per_digit_accuracy": [0, 1], "fid": 0, "precision": 1}
    figures = quality.quality_metadata({**EVALUATION, "generated": {**EVALUATION["generated"], **edges}})
    assert figures["quality_num_samples"] == "1" and figures["quality_class_accuracy"] == "0.0000"
    assert figures["quality_min_digit_accuracy"] == "0.0000" and figures["quality_fid"] == "0.0000"
    assert figures["quality_precision"] == "1.0000"
    negative_zero = {"fid": -0.0, "recall": -0.0, "num_samples": 2**63}  # JSON holds -0.0; it is stored as 0
    figures = quality.quality_metadata({**EVALUATION, "generated": {**EVALUATION["generated"], **negative_zero}})
    assert (figures["quality_fid"], figures["quality_recall"]) == ("0.0000", "0.0000")
    assert figures["quality_num_samples"] == str(2**63)


def test_quality_metadata_refuses_an_evaluation_of_truncated_digits() -> None:
    with pytest.raises(ExportError) as refused:
        quality.quality_metadata({**EVALUATION, "truncation": 0.5})
    assert str(refused.value) == (
        "the evaluation scored digits drawn with truncation 0.5, not the model's own distribution; "
        "evaluate without --truncation"
    )


def test_an_export_takes_the_figures_of_its_own_model_only(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """An evaluation names the model it scored by its hash without metadata; the export compares it with the
    file it writes, whose metadata (the figures among them) differs from the scored file's."""
    scored = tmp_path / "scored.onnx"
    export_generator(tiny_checkpoint, scored)
    evaluation = {
        **EVALUATION,
        "model_sha256_without_metadata": DigitGenerator.from_path(scored).sha256_without_metadata,
    }
    out = tmp_path / "with_quality.onnx"
    assert export_generator(tiny_checkpoint, out, evaluation=evaluation).passed
    metadata = DigitGenerator.from_path(out).info.metadata
    assert metadata["quality_fid"] == "12.3457" and "quality_fid" not in DigitGenerator.from_path(scored).info.metadata
    quality.check_scored_model(evaluation, out, out)

    other = {**evaluation, "model_sha256_without_metadata": "0123456789abcdef" * 4}
    with pytest.raises(ExportError) as refused:
        export_generator(tiny_checkpoint, tmp_path / "again.onnx", evaluation=other)
    assert str(refused.value) == (
        f"the evaluation scored another model than {tmp_path / 'again.onnx'} (sha256 without metadata "
        f"0123456789ab..., this export {evaluation['model_sha256_without_metadata'][:12]}...): evaluate what "
        "`digitgen export` writes from this checkpoint with the same options and no --quality, then pass that "
        "evaluation"
    )
    missing = (
        r"^the evaluation does not say which model it scored \(no model_sha256_without_metadata\): run `digitgen "
        r"evaluate --json` on the model again$"
    )
    with pytest.raises(ExportError, match=missing):
        export_generator(tiny_checkpoint, tmp_path / "again.onnx", evaluation=EVALUATION)
    assert not (tmp_path / "again.onnx").exists()


def test_classifier_export_matches_pytorch_and_replaces_a_file_only_when_asked(tmp_path: Path) -> None:
    from digitgen.export.classifier_export import export_classifier
    from digitgen.runtime.errors import OutputError
    from digitgen.runtime.session import open_session
    from digitgen.training.classifier import Classifier

    torch.manual_seed(0)
    model, out = Classifier(), tmp_path / "classifier.onnx"
    diff = export_classifier(model, out, test_accuracy=0.99456)
    assert 0 <= diff <= 10 * ATOL
    saved = onnx.load(str(out))
    assert {p.key: p.value for p in saved.metadata_props} == {
        "producer": "digitgen",
        "kind": "reference classifier",
        "mnist_test_accuracy": "0.9946",
    }
    session = open_session(out, "cpu").session
    assert [i.name for i in session.get_inputs()] == ["image"]
    images = np.random.default_rng(1).random((5, 1, 28, 28), dtype=np.float32)  # another batch size than the check's
    logits, features = session.run(["logits", "features"], {"image": images})
    with torch.no_grad():
        expected_logits, expected_features = model.eval()(torch.from_numpy(images))
    np.testing.assert_allclose(logits, expected_logits.numpy(), atol=10 * ATOL, rtol=0)
    np.testing.assert_allclose(features, expected_features.numpy(), atol=10 * ATOL, rtol=0)

    with pytest.raises(OutputError, match="already exists"):
        export_classifier(model, out, test_accuracy=0.5)
    export_classifier(model, out, test_accuracy=0.5, overwrite=True)
    assert {p.key: p.value for p in onnx.load(str(out)).metadata_props}["mnist_test_accuracy"] == "0.5000"


def test_classifier_parity_check_refuses_another_model(tmp_path: Path, monkeypatch) -> None:
    import digitgen.export.classifier_export as classifier_export
    from digitgen.training.classifier import Classifier

    torch.manual_seed(0)
    exported, other = Classifier(), Classifier()
    checked = classifier_export._check_parity
    monkeypatch.setattr(classifier_export, "_check_parity", lambda path, model: checked(path, other))
    with pytest.raises(ExportVerificationError, match="classifier ONNX differs from PyTorch by"):
        classifier_export.export_classifier(exported, tmp_path / "c.onnx", test_accuracy=0.5)
    assert list(tmp_path.iterdir()) == []


class _Zeros(torch.nn.Module):
    """A stand-in classifier: zero logits and features."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(len(images), 10), torch.zeros(len(images), 4)


def test_classifier_parity_allows_ten_times_atol_on_the_cpu_with_fixed_inputs(monkeypatch) -> None:
    """The check runs onnxruntime on the CPU, on the same images every time, and a difference of exactly
    10x ATOL passes while 10.5x fails."""
    import digitgen.export.classifier_export as classifier_export

    seen = []

    class Session:
        def __init__(self, offset: float) -> None:
            self.offset = offset

        def run(self, names, feeds, options=None):
            seen.append(feeds["image"])
            return np.full((len(feeds["image"]), 10), self.offset), np.zeros((len(feeds["image"]), 4))

    def check(offset: float) -> float:
        def open_on_cpu(path: Path, provider: str) -> SimpleNamespace:
            assert provider == "cpu"
            return SimpleNamespace(session=Session(offset))

        monkeypatch.setattr(classifier_export, "open_session", open_on_cpu)
        return classifier_export._check_parity(Path("c.onnx"), _Zeros())

    assert check(10 * ATOL) == 10 * ATOL
    with pytest.raises(ExportVerificationError, match=r"differs from PyTorch by 1\.05e-03"):
        check(10.5 * ATOL)
    assert np.array_equal(seen[0], seen[1])


def test_classifier_export_writes_the_weights_it_rebuilds_from(tmp_path: Path) -> None:
    from digitgen.export.classifier_export import export_classifier
    from digitgen.training.classifier import Classifier, load_classifier_weights

    torch.manual_seed(0)
    model, weights = Classifier(), tmp_path / "weights.pt"
    export_classifier(model, tmp_path / "c.onnx", test_accuracy=0.9931, weights_out=weights)
    loaded, accuracy = load_classifier_weights(weights)
    assert accuracy == 0.9931
    saved, kept = loaded.state_dict(), model.state_dict()
    assert saved.keys() == kept.keys() and all(torch.equal(saved[name], kept[name]) for name in kept)
    refusals = {
        tmp_path: f"output {tmp_path} is a directory; give a file name such as classifier.onnx",
        tmp_path / "nope" / "c.onnx": f"output directory {tmp_path / 'nope'} does not exist",
        tmp_path / "c2.onnx": f"output directory {weights} is a file, not a directory",
    }
    for bad, refusal in refusals.items():
        with pytest.raises(ExportError) as refused:
            export_classifier(model, bad, test_accuracy=0.9931, weights_out=weights / "w.pt")
        assert str(refused.value) == refusal


def test_a_refusal_asks_after_another_model_only_when_every_case_is_far_off() -> None:
    """Far off on every case: likelier another model than an export's rounding; on some: a flaw of the export."""
    far, near = ParityCase(1, 0, 1.0, 2 * FAR_OFF), ParityCase(7, 0, 1.0, FAR_OFF / 2)
    question = "far past any export's rounding: was g.onnx exported from this checkpoint?"
    assert ParityReport((far, far), TOLERANCES["fp32"]).refusal("g.onnx").endswith(question)
    assert question not in ParityReport((far, near), TOLERANCES["fp32"]).refusal("g.onnx")


def test_report_names_every_case_with_its_figures_and_verdict(tiny_onnx: Path, tiny_checkpoint: Path) -> None:
    report = verify_file(tiny_onnx, tiny_checkpoint)
    assert len(report.lines()) == len(report.cases) == len(BATCH_SIZES) * 2
    for line, c in zip(report.lines(), report.cases, strict=True):
        assert line == (
            f"batch {c.batch_size:>3}  seed {c.seed}  max|torch-ort| {c.max_abs_diff:.2e}  mean {c.mean_abs_diff:.2e}  "
            "ok (atol 1e-04, mean 1e-05)"
        )
    assert verify_file(tiny_onnx, tiny_checkpoint).cases == report.cases  # the same inputs every time
    with pytest.raises(ExportVerificationError) as failed:
        verify_file(tiny_onnx, tiny_checkpoint, atol=1e-12)  # the per-pixel maximum overridden
    strict = ParityReport(report.cases, replace(TOLERANCES["fp32"], max_abs=1e-12))
    assert str(failed.value) == "ONNX output differs from PyTorch: " + "; ".join(strict.lines())
    assert str(failed.value).count("FAIL (atol 1e-12, mean 1e-05)") == len(report.cases)


def _with_metadata(source: Path, out: Path, **changes: str | None) -> Path:
    """A copy of ``source`` with metadata entries changed (``None``: removed)."""
    model = onnx.load(source)
    kept = {p.key: p.value for p in model.metadata_props}
    kept.update(changes)
    del model.metadata_props[:]
    for key, value in kept.items():
        if value is not None:
            model.metadata_props.add(key=key, value=value)
    onnx.save(model, out)
    return out


def test_verify_refuses_a_file_off_the_contract_naming_it_and_the_problem(
    tmp_path: Path, tiny_onnx: Path, tiny_checkpoint: Path
) -> None:
    path = _with_metadata(tiny_onnx, tmp_path / "off-contract.onnx", contract_version=None)
    with pytest.raises(ModelContractError) as refused:  # the loader's own error, as for any model
        verify_file(path, tiny_checkpoint)
    assert str(refused.value) == (
        f"{path} does not follow the digitgen model contract: metadata 'contract_version' is missing"
    )


@pytest.mark.parametrize("precision", ["bf16", None])
def test_a_file_of_unknown_or_no_precision_is_held_to_the_fp32_tolerance(
    tmp_path: Path, tiny_onnx: Path, tiny_checkpoint: Path, precision: str | None
) -> None:
    path = _with_metadata(tiny_onnx, tmp_path / "g.onnx", precision=precision)
    assert verify_file(path, tiny_checkpoint).tolerance == TOLERANCES["fp32"]


def test_verification_runs_on_the_cpu_whatever_the_machine(
    tiny_onnx: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    providers = []

    def recording(path, provider="auto", threads=None):
        providers.append(provider)
        return open_session(path, provider, threads)

    monkeypatch.setattr(verify, "open_session", recording)
    verify_file(tiny_onnx, tiny_checkpoint)
    assert providers == ["cpu"]  # the same numbers on a machine with a GPU


def test_an_output_of_another_shape_than_pytorchs_is_refused(tmp_path: Path, tiny_checkpoint: Path) -> None:
    # within the contract (the image's dimensions may be dynamic) but 2x4 pixels at run time
    from onnx import TensorProto, helper

    hidden, constants = shape_hidden_from_inference([-1, 1, 2, 4])
    graph = helper.make_graph(
        [*hidden, helper.make_node("Reshape", ["z", "target"], ["image"])],
        "wrong-shape",
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("digit", TensorProto.INT64, ["batch"]),
        ],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, "height", "width"])],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    metadata = {"latent_dim": "8", "num_classes": "10", "image_size": "28", "contract_version": CONTRACT_VERSION}
    helper.set_model_props(model, metadata)
    path = tmp_path / "wrong-shape.onnx"
    onnx.save(model, path)
    with pytest.raises(
        ExportVerificationError, match=r"output shape \(1, 1, 2, 4\) differs from PyTorch's \(1, 1, 28, 28\)"
    ):
        verify_file(path, tiny_checkpoint)


def test_a_model_that_fails_to_run_is_refused_in_one_line(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Within the contract, but its graph takes one digit at a time: onnxruntime fails on a batch of two."""
    from onnx import TensorProto, helper, numpy_helper

    hidden, constants = shape_hidden_from_inference([1, 8])  # seen, shape inference would find a fixed batch
    graph = helper.make_graph(
        [
            *hidden,
            helper.make_node("Reshape", ["z", "target"], ["row"]),
            helper.make_node("MatMul", ["row", "w"], ["flat"]),
            helper.make_node("Reshape", ["flat", "images"], ["image"]),
        ],
        "one-at-a-time",
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("digit", TensorProto.INT64, ["batch"]),
        ],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [
            *constants,
            numpy_helper.from_array(np.zeros((8, 784), np.float32), "w"),
            numpy_helper.from_array(np.array([-1, 1, 28, 28]), "images"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    metadata = {"latent_dim": "8", "num_classes": "10", "image_size": "28", "contract_version": CONTRACT_VERSION}
    helper.set_model_props(model, metadata)
    path = tmp_path / "one-at-a-time.onnx"
    onnx.save(model, path)
    result = CliRunner().invoke(main, ["verify", str(path), "--checkpoint", str(tiny_checkpoint)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.startswith(f"Error: {path} failed to run on a batch of "), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("opset", [17, 99, 2**40])
def test_an_opset_onnx_does_not_define_is_refused_before_any_work(
    tmp_path: Path, tiny_checkpoint: Path, opset: int
) -> None:
    """A huge one reached the exporter and ended in its traceback."""
    newest = onnx.defs.onnx_opset_version()
    refusal = f"^opset {opset} is not one this exporter writes: choose 18 to {newest}$"
    with pytest.raises(ExportError, match=refusal):
        export_generator(tiny_checkpoint, tmp_path / "g.onnx", opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_an_export_past_the_pages_opset_says_the_page_refuses_it(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Written and run by onnxruntime here, refused by the page's onnxruntime-web: said at export, not found later."""
    note = "note: the web page's onnxruntime-web runs opsets up to 26, so it refuses this file; for the page, export "
    for opset, noted in ((PAGE_OPSET, False), (PAGE_OPSET + 1, True)):
        out = tmp_path / f"g{opset}.onnx"
        args = ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--opset", str(opset)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and out.is_file(), result.output
        assert (note in result.stderr) is noted, result.stderr


def test_an_opset_the_exporter_cannot_write_is_refused_not_ignored(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past what it writes, the exporter falls back to another opset with a warning only."""
    monkeypatch.setattr(onnx.defs, "onnx_opset_version", lambda: 99)
    with pytest.raises(
        ExportError, match=r"^the exporter wrote opset 18, not the 99 asked for; choose an opset it supports$"
    ):
        export_generator(tiny_checkpoint, tmp_path / "g.onnx", opset=99)
    assert list(tmp_path.iterdir()) == []


def test_int8_export_leaves_out_the_quantizers_advice_and_only_it(
    tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """onnxruntime's quantizer logs advice to pre-process on the root logger, which users saw as a stray line."""
    with caplog.at_level(logging.INFO):
        export_generator(tiny_checkpoint, tmp_path / "g.onnx", precision="int8")
        assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
        logging.warning("Please consider pre-processing before quantization, said after the export")
    assert caplog.records[-1].getMessage().endswith("said after the export")
