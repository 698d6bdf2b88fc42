"""Every way a model can break the contract is named, on hand-built models (one violation each)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from digitgen.cli import main
from digitgen.runtime import DigitGenerator, ModelContractError, ModelRunError
from tests.helpers import shape_hidden_from_inference

LATENT = 8
METADATA = {"latent_dim": "8", "num_classes": "10", "image_size": "28", "contract_version": "1"}


def contract_model(
    path: Path,
    *,
    z=("z", TensorProto.FLOAT, ["batch", LATENT]),
    digit=("digit", TensorProto.INT64, ["batch"]),
    image=("image", TensorProto.FLOAT, ["batch", 1, 28, 28]),
    metadata: dict[str, str | None] | None = None,
) -> Path:
    """image = reshape(z @ W), W all zeros: a valid graph whatever names, types and shapes the case declares, whose
    pixels are black (0), inside the contract's 0 to 1."""
    z_name, z_type, z_shape = z
    image_name, image_type, image_shape = image
    pixels = int(np.prod(image_shape[1:]))
    weight = np.zeros((z_shape[-1], pixels), dtype=helper.tensor_dtype_to_np_dtype(z_type))
    nodes = [
        helper.make_node("MatMul", [z_name, "w"], ["flat"]),
        helper.make_node("Reshape", ["flat", "shape"], ["pixels"]),
        helper.make_node("Cast", ["pixels"], [image_name], to=image_type),
    ]
    initializers = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.array([-1, *image_shape[1:]]), "shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "contract-case",
        [helper.make_tensor_value_info(*z), helper.make_tensor_value_info(*digit)],
        [helper.make_tensor_value_info(*image)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    merged = {**METADATA, **(metadata or {})}
    helper.set_model_props(model, {k: v for k, v in merged.items() if v is not None})
    onnx.save(model, str(path))
    return path


CASES = {
    "z-name": ({"z": ("noise", TensorProto.FLOAT, ["batch", LATENT])}, "inputs must be 'z' and 'digit'"),
    "digit-name": ({"digit": ("label", TensorProto.INT64, ["batch"])}, "inputs must be 'z' and 'digit'"),
    "image-name": ({"image": ("pixels_out", TensorProto.FLOAT, ["batch", 1, 28, 28])}, "output must be 'image'"),
    "z-dtype": ({"z": ("z", TensorProto.DOUBLE, ["batch", LATENT])}, "'z' must be float32"),
    "digit-dtype": ({"digit": ("digit", TensorProto.INT32, ["batch"])}, "'digit' must be int64"),
    "image-dtype": ({"image": ("image", TensorProto.DOUBLE, ["batch", 1, 28, 28])}, "'image' must be float32"),
    "z-rank": ({"z": ("z", TensorProto.FLOAT, ["batch", 2, LATENT])}, "'z' must be float32 \\[batch, latent_dim\\]"),
    "digit-rank": ({"digit": ("digit", TensorProto.INT64, ["batch", 1])}, "'digit' must be int64 \\[batch\\]"),
    "image-rank": ({"image": ("image", TensorProto.FLOAT, ["batch", 28, 28])}, "'image' must be float32"),
    "image-shape": ({"image": ("image", TensorProto.FLOAT, ["batch", 1, 14, 14])}, "must be \\[batch, 1, 28, 28\\]"),
    **{
        f"{name}-fixed-batch": (
            {name: (name, kind, [1, *shape])},
            f"'{name}' must take any batch size, found a fixed batch of 1",
        )
        for name, kind, shape in [
            ("z", TensorProto.FLOAT, [LATENT]),
            ("digit", TensorProto.INT64, []),
            ("image", TensorProto.FLOAT, [1, 28, 28]),
        ]
    },
    "latent-mismatch": ({"metadata": {"latent_dim": "16"}}, "'z' has 8 features but metadata latent_dim is 16"),
    **{
        f"missing-{key}": ({"metadata": {key: None}}, f"'{key}' is missing")
        for key in ("latent_dim", "num_classes", "image_size", "contract_version")
    },
    "latent-not-int": ({"metadata": {"latent_dim": "eight"}}, "'latent_dim' is missing or not an integer"),
    # int() reads these as 8, the page's module refuses them: both refuse them
    **{
        f"latent-{name}": ({"metadata": {"latent_dim": text}}, "'latent_dim' is missing or not an integer$")
        for name, text in (("underscore", "0_8"), ("arabic-indic", "\u0668"))
    },
    # an unreadable latent_dim is named alone, not also compared with z's width
    "latent-missing-alone": ({"metadata": {"latent_dim": None}}, "'latent_dim' is missing or not an integer$"),
    "classes-zero": ({"metadata": {"num_classes": "0"}}, "'num_classes' must be positive"),
    "classes-huge": ({"metadata": {"num_classes": "100000"}}, "'num_classes' must be at most 256, found 100000$"),
    "latent-huge": (
        {"metadata": {"latent_dim": "4097"}},
        "'latent_dim' must be at most 4096, found 4097; 'z' has 8 features but metadata latent_dim is 4097",
    ),
    "image-size": ({"metadata": {"image_size": "32"}}, "'image_size' must be 28"),
    # int() refuses 4,301 digits and takes long to read fewer: a contract problem, in a bounded line
    **{
        f"{key}-{len(text)}-digits": (
            {"metadata": {key: text}},
            rf"'{key}' is out of range \({text.strip()[:20]}\.\.\. \({len(text.strip()):,} characters\)\)$",
        )
        for key in ("latent_dim", "image_size")
        for text in (" 1" + "0" * 40, "9" * 5000)
    },
    "contract-version": ({"metadata": {"contract_version": "2"}}, "contract_version '2' is not '1'"),
}


def test_the_bounds_themselves_are_within_the_contract(tmp_path: Path) -> None:
    path = contract_model(
        tmp_path / "widest.onnx",
        z=("z", TensorProto.FLOAT, ["batch", 4096]),
        metadata={"latent_dim": "4096", "num_classes": "256"},
    )
    gen = DigitGenerator.from_path(path, "cpu")
    assert (gen.latent_dim, gen.num_classes, gen.generate(2, digits=[255]).labels.tolist()) == (4096, 256, [255, 255])


def test_the_hand_built_model_itself_follows_the_contract(tmp_path: Path) -> None:
    gen = DigitGenerator.from_path(contract_model(tmp_path / "ok.onnx"), "cpu")
    assert gen.latent_dim == LATENT and gen.generate(3).images.shape == (3, 28, 28)


@pytest.mark.parametrize(("change", "message"), CASES.values(), ids=CASES.keys())
def test_each_violation_is_named(tmp_path: Path, change: dict, message: str) -> None:
    path = contract_model(tmp_path / "case.onnx", **change)
    with pytest.raises(ModelContractError, match=message):
        DigitGenerator.from_path(path, "cpu")


def five_digit_model(folder: Path) -> Path:
    """A model whose declared shapes follow the contract, but whose graph scales each image by a table of 5
    digits, not 10: it runs for digits 0-4 and fails for 5-9."""
    model = onnx.load(str(contract_model(folder / "ok.onnx")))
    model.graph.initializer.append(numpy_helper.from_array(np.ones((5, 1), np.float32), "table"))
    reshape = next(node for node in model.graph.node if node.op_type == "Reshape")
    reshape.input[0] = "scaled"
    model.graph.node.insert(1, helper.make_node("Gather", ["table", "digit"], ["scale"]))
    model.graph.node.insert(2, helper.make_node("Mul", ["flat", "scale"], ["scaled"]))
    path = folder / "five-digits.onnx"
    onnx.save(model, str(path))
    return path


def test_a_model_that_fails_to_run_is_a_one_line_error(tmp_path: Path) -> None:
    path = five_digit_model(tmp_path)
    gen = DigitGenerator.from_path(path, "cpu")
    assert gen.generate(3, digits=[4]).images.shape == (3, 28, 28)
    with pytest.raises(ModelRunError, match=f"^{re.escape(str(path))}: the model failed to run: ") as caught:
        gen.generate(3, digits=[7])
    assert "\n" not in str(caught.value) and "ONNXRuntimeError" not in str(caught.value)
    out = tmp_path / "out"
    args = ["generate", "--generator", str(path), "-n", "3", "--digit", "7", "--format", "npz", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1].startswith(f"Error: {path}: the model failed to run: ")
    assert not out.exists()  # nor the folder it made for them


def test_a_model_whose_output_breaks_the_contract_at_run_time_writes_nothing(tmp_path: Path) -> None:
    """The output's dimensions are declared symbolic, which the contract allows; what the model returns
    for them (14x14 images, four per digit) is checked before any of it is written."""
    model = onnx.load(str(contract_model(tmp_path / "ok.onnx")))
    hidden, constants = shape_hidden_from_inference([-1, 1, 14, 14])
    model.graph.initializer.extend(constants)
    reshape = next(node for node in model.graph.node if node.op_type == "Reshape")
    reshape.input[1] = "target"
    for position, node in enumerate(hidden):
        model.graph.node.insert(position, node)
    declared = model.graph.output[0].type.tensor_type.shape.dim
    for dim, name in zip(declared, ["batch", "c", "h", "w"], strict=True):
        dim.dim_param = name
    path = tmp_path / "small-images.onnx"
    onnx.save(model, str(path))
    gen = DigitGenerator.from_path(path, "cpu")
    expected = "returned 'image' of shape (12, 1, 14, 14) (float32) for 3 digits, not (3, 1, 28, 28)"
    with pytest.raises(ModelContractError, match=re.escape(expected)):
        gen.generate(3)
    for fmt in ("idx", "png", "npz"):
        out = tmp_path / fmt
        args = ["generate", "--generator", str(path), "-n", "3", "--format", fmt, "--out", str(out)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert result.output.strip().splitlines()[-1].startswith(f"Error: {path}: the model returned 'image'")
        assert not out.exists() or list(out.iterdir()) == []


def _with_byte_changed(source: Path, after: bytes, out: Path) -> Path:
    """``source`` with the byte after the first ``after`` set to 0xCC, which no UTF-8 text holds there: lengths
    stay, so the protobuf stays well-formed and only that string is broken."""
    model = bytearray(source.read_bytes())
    model[model.index(after) + len(after)] = 0xCC
    out.write_bytes(bytes(model))
    return out


@pytest.mark.parametrize("command", ["info", "generate"])
def test_metadata_that_is_not_utf8_is_a_one_line_error(tmp_path: Path, tiny_onnx: Path, command: str) -> None:
    broken = _with_byte_changed(tiny_onnx, b"latent", tmp_path / "broken.onnx")
    args = ["--generator", str(broken)] + (["--out", str(tmp_path / "out")] if command == "generate" else [])
    result = CliRunner().invoke(main, [command, *args])
    assert (result.exit_code, result.output) == (
        1,
        f"Error: {broken} does not follow the digitgen model contract: its metadata is not UTF-8 text\n",
    )


def test_a_model_onnxruntime_cannot_decode_prints_nothing_but_the_error(tmp_path: Path, capfd) -> None:
    """onnxruntime's own retry on another provider prints a banner on stdout; the runtime retries itself, quietly."""
    from digitgen.runtime import InvalidModelError, default_model_path

    broken = _with_byte_changed(default_model_path(), b"val_", tmp_path / "broken.onnx")
    with pytest.raises(InvalidModelError, match=f"^{re.escape(str(broken))} is not a valid ONNX model"):
        DigitGenerator.from_path(broken, "cpu")
    assert capfd.readouterr() == ("", "")
