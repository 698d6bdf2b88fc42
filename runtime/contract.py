"""The ONNX model contract (README, "The ONNX model contract") and its check against a loaded session."""

from __future__ import annotations

from dataclasses import dataclass

import onnxruntime as ort

from digitgen.runtime.errors import ModelContractError
from digitgen.runtime.idx import IMAGE_SIDE
from digitgen.runtime.text import INTEGER_TEXT, cut, quoted, read_integer

CONTRACT_VERSION = "1"
# bounds that keep a model's noise small and its labels storable: far past any digit model
MAX_LATENT_DIM = 4096
MAX_CLASSES = 256  # every label fits the one byte an IDX label file gives it


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime knows about a model after checking it against the contract."""

    latent_dim: int
    num_classes: int
    image_size: int
    metadata: dict[str, str]


def _is_dynamic(dim: object) -> bool:
    return not isinstance(dim, int)


def _check_io(session: ort.InferenceSession) -> list[str]:
    problems = []
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if set(inputs) != {"z", "digit"}:
        problems.append(f"inputs must be 'z' and 'digit', found {sorted(inputs)}")
    if set(outputs) != {"image"}:
        problems.append(f"output must be 'image', found {sorted(outputs)}")
    expected = [
        (inputs.get("z"), "tensor(float)", 2, "z", "float32 [batch, latent_dim]"),
        (inputs.get("digit"), "tensor(int64)", 1, "digit", "int64 [batch]"),
        (outputs.get("image"), "tensor(float)", 4, "image", "float32 [batch, 1, 28, 28]"),
    ]
    for arg, dtype, rank, name, wanted in expected:
        if arg is None:
            continue
        if arg.type != dtype or len(arg.shape) != rank:
            problems.append(f"'{name}' must be {wanted}, found {arg.type} {arg.shape}")
        elif not _is_dynamic(arg.shape[0]):
            problems.append(f"'{name}' must take any batch size, found a fixed batch of {arg.shape[0]}")
    image = outputs.get("image")
    if (
        image is not None
        and len(image.shape) == 4
        and not all(
            _is_dynamic(d) or d == want for d, want in zip(image.shape[1:], (1, IMAGE_SIDE, IMAGE_SIDE), strict=True)
        )
    ):
        problems.append(f"'image' must be [batch, 1, 28, 28], found {image.shape}")
    return problems


def _int_metadata(metadata: dict[str, str], key: str, problems: list[str], maximum: int | None = None) -> int:
    """An integer written in ASCII digits, read as the CLI reads one (int() also takes "6_4" and "٦٤"), and as the
    page's module does; 0 for a value not read, which no later check compares."""
    text = metadata.get(key)
    if text is None or not INTEGER_TEXT.fullmatch(text):
        problems.append(f"metadata '{key}' is missing or not an integer")
        return 0
    value = read_integer(text)
    if isinstance(value, str):  # more digits than any valid value has, which int() would take long to read, or refuse
        problems.append(f"metadata '{key}' is out of range ({cut(text.strip(), 20)})")
        return 0
    if value < 1:
        problems.append(f"metadata '{key}' must be positive, found {value}")
    elif maximum is not None and value > maximum:
        problems.append(f"metadata '{key}' must be at most {maximum}, found {value}")
    return value


def check_contract(session: ort.InferenceSession, source: str) -> ModelInfo:
    """Check names, then types and shapes, then metadata; raise one error listing every problem (metadata that is
    not UTF-8 text, which cannot be read at all, alone)."""
    problems = _check_io(session)
    try:
        metadata = dict(session.get_modelmeta().custom_metadata_map)
    except UnicodeDecodeError:
        raise ModelContractError(
            f"{source} does not follow the digitgen model contract: its metadata is not UTF-8 text"
        ) from None
    latent_dim = _int_metadata(metadata, "latent_dim", problems, MAX_LATENT_DIM)
    num_classes = _int_metadata(metadata, "num_classes", problems, MAX_CLASSES)
    image_size = _int_metadata(metadata, "image_size", problems)
    if image_size and image_size != IMAGE_SIDE:
        problems.append(f"metadata 'image_size' must be {IMAGE_SIDE}, found {image_size}")
    if "contract_version" in metadata and metadata["contract_version"] != CONTRACT_VERSION:
        problems.append(f"contract_version {quoted(metadata['contract_version'])} is not {CONTRACT_VERSION!r}")
    elif "contract_version" not in metadata:
        problems.append("metadata 'contract_version' is missing")
    z = next((i for i in session.get_inputs() if i.name == "z"), None)
    fixed_width = z is not None and len(z.shape) == 2 and not _is_dynamic(z.shape[1])
    if fixed_width and latent_dim >= 1 and z.shape[1] != latent_dim:  # a latent_dim that could not be read is named
        problems.append(f"'z' has {z.shape[1]} features but metadata latent_dim is {latent_dim}")
    if problems:
        raise ModelContractError(f"{source} does not follow the digitgen model contract: " + "; ".join(problems))
    return ModelInfo(latent_dim, num_classes, image_size, metadata)
