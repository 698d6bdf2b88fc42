"""Small builders and readers shared by the tests: IDX files, a tiny MNIST-like dataset, a run's metrics."""

from __future__ import annotations

import io
import itertools
import json
import shlex
import signal
import socket
import sys
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from digitgen.runtime.idx import MNIST_FILES, idx_header

# how the CLI says to add an extra here: the tests' interpreter, its pip, and the checkout it has as an editable
# install (README command 2, CI)
PIP = f"{shlex.quote(sys.executable)} -m pip install"


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread, for training runs compared to the bit: on more threads MKL and oneDNN do not promise
    the same rounding from run to run (training/README.md, "Interrupt and resume")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_digit_images(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Label-dependent bright bars on black, with noise: enough structure for a GAN to fit."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, (len(labels), 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels, strict=True):
        image[4 + 2 * label : 8 + 2 * label, 6:22] = 255
    return images


def write_tiny_mnist(root: Path, train_count: int = 256, test_count: int = 64) -> Path:
    """A torchvision-layout MNIST root with small synthetic IDX files."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train_count), ("t10k", test_count)):
        labels = np.arange(count) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", tiny_digit_images(labels))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    assert sorted(p.name for p in raw.iterdir()) == sorted(MNIST_FILES)
    return root


def run_metrics(run_dir: Path) -> list[dict]:
    """The records of a training run's ``metrics.jsonl``, in order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def default_sigint() -> None:
    """``preexec_fn`` of a child that a test stops with SIGINT: a shell that runs the tests in the
    background makes them ignore SIGINT, and the child would inherit that and never stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def shape_hidden_from_inference(shape: Sequence[int], name: str = "target") -> tuple[list, list]:
    """ONNX nodes and initializers that compute the int64 tensor ``shape`` as ``shape + 0 * min(digit)``:
    shape inference cannot see through it, so a Reshape to ``name`` leaves the graph's declared dims standing."""
    from onnx import helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMin", ["digit"], [f"{name}_least"], keepdims=0),
        helper.make_node("Mul", [f"{name}_least", f"{name}_zero"], [f"{name}_nothing"]),
        helper.make_node("Add", [f"{name}_value", f"{name}_nothing"], [name]),
    ]
    initializers = [
        numpy_helper.from_array(np.array(shape, dtype=np.int64), f"{name}_value"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), f"{name}_zero"),
    ]
    return nodes, initializers


def assert_int8_qdq(model: Path) -> None:
    """Every convolution and matrix product of an int8 export reads a uint8 activation and int8 weights
    with one scale per output channel, both through ``DequantizeLinear`` (no weight left in fp32)."""
    graph = onnx.load(str(model)).graph
    made_by = {name: node for node in graph.node for name in node.output}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    weighted = [node for node in graph.node if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    assert {node.op_type for node in weighted} == {"Conv", "Gemm"}  # transposed convolutions export as convolutions
    for node in weighted:
        activation, weight = (made_by[name] for name in node.input[:2])
        assert activation.op_type == weight.op_type == "DequantizeLinear", node.name
        assert initializers[activation.input[2]].data_type == onnx.TensorProto.UINT8, node.name
        weights, scale = initializers[weight.input[0]], initializers[weight.input[1]]
        axis = next((a.i for a in weight.attribute if a.name == "axis"), 1)
        assert weights.data_type == onnx.TensorProto.INT8, node.name
        assert list(scale.dims) == [weights.dims[axis]], f"{node.name}: not one scale per output channel"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_idx(path: str | Path, items: np.ndarray) -> None:
    """Write uint8 images (N, 28, 28) or labels (N,) as one IDX file."""
    Path(path).write_bytes(idx_header(len(items), items.ndim == 3) + items.astype(np.uint8).tobytes())


def write_npz_declaring(path: Path, shape: tuple[int, ...]) -> None:
    """An NPZ of digits whose images header declares ``shape`` over a kilobyte of data: what ``np.load`` would
    allocate in full before finding the data short."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    labels = io.BytesIO()
    np.lib.format.write_array(labels, np.zeros(3, np.int64))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("images.npy", header.getvalue() + bytes(1024))
        archive.writestr("labels.npy", labels.getvalue())


def scaled_pixels(model: onnx.ModelProto, factor: float) -> None:
    """The output times ``factor``: a model that keeps the contract's shapes and runs, but whose pixels are not
    0 to 1 (255: a byte's scale) or not numbers (NaN)."""
    from onnx import helper, numpy_helper

    for node in model.graph.node:
        node.output[:] = ["unscaled" if name == "image" else name for name in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), "factor"))
    model.graph.node.append(helper.make_node("Mul", ["unscaled", "factor"], ["image"]))


def nan_pixels(model: onnx.ModelProto) -> None:
    """The output times NaN: pixels that are not numbers."""
    scaled_pixels(model, np.nan)


def endless_loop(model: onnx.ModelProto) -> None:
    """The output passed through a loop of 2^62 steps: a model that keeps the contract and never returns."""
    from onnx import TensorProto, helper, numpy_helper

    for node in model.graph.node:
        node.output[:] = ["before_loop" if name == "image" else name for name in node.output]
    body = helper.make_graph(
        [helper.make_node("Identity", ["go"], ["go_on"]), helper.make_node("Identity", ["x"], ["x_on"])],
        "step",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("go", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("go_on", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_on", TensorProto.FLOAT, None),
        ],
    )
    model.graph.initializer.extend(
        [numpy_helper.from_array(np.array(2**62), "steps"), numpy_helper.from_array(np.array(True), "always")]
    )
    model.graph.node.append(helper.make_node("Loop", ["steps", "always", "before_loop"], ["image"], body=body))


@contextmanager
def sigterm_in_training_step(monkeypatch: pytest.MonkeyPatch, step: int) -> Iterator[None]:
    """Within the block, a SIGTERM to this process during the ``step``-th step (from 1) of classifier training."""
    from digitgen.training import classifier as classifier_module

    steps, shift = itertools.count(1), classifier_module.random_shift

    def shift_then_stop(images: torch.Tensor, max_shift: int, rng: torch.Generator) -> torch.Tensor:
        if next(steps) == step:
            signal.raise_signal(signal.SIGTERM)
        return shift(images, max_shift, rng)

    with monkeypatch.context() as patched:
        patched.setattr(classifier_module, "random_shift", shift_then_stop)
        yield
