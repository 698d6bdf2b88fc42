"""Export the EMA generator to the ONNX model contract, then verify before publishing the file."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from digitgen.export.errors import ExportError
from digitgen.export.fast_layers import with_fast_layers
from digitgen.export.precision import HalfPrecision, quantize_int8
from digitgen.export.quality import check_scored_model, quality_metadata
from digitgen.export.tolerances import DEFAULT_OPSET, PRECISIONS, TOLERANCES
from digitgen.export.verify import ContractGenerator, ParityReport, verify_parity
from digitgen.runtime.contract import CONTRACT_VERSION
from digitgen.runtime.errors import InvalidModelError
from digitgen.runtime.files import folder_problem, publish_all, refuse_existing, refuse_one_file_twice
from digitgen.runtime.signals import interrupts_held
from digitgen.training.checkpoint import release_weights, write_payload
from digitgen.training.state import load_generator


def contract_metadata(payload: Mapping[str, object]) -> dict[str, str]:
    """ONNX ``metadata_props`` for a checkpoint: the contract figures and the training summary."""
    config, train = payload["config"], payload["train"]
    subset, images = train.get("subset"), train.get("train_images")
    dataset = f" (first {subset} images)" if subset else f" ({images} images)" if images else ""
    return {
        "latent_dim": str(config["latent_dim"]),
        "num_classes": str(config["num_classes"]),
        "image_size": str(config["image_size"]),
        "contract_version": CONTRACT_VERSION,
        "producer": "digitgen",
        "train_dataset": "MNIST train" + dataset,  # from a run before its size was recorded: no count
        "train_steps": str(payload["step"]),
        "train_batch_size": str(train["batch_size"]),
        "train_seed": str(train["seed"]),
        "train_lr_decay_steps": str(train.get("lr_decay_steps", 0)),
        "train_lr": str(train["lr"]),
        "train_lr_d": str(train.get("lr_d") or train["lr"]),
        "train_conditional_norm": str(config.get("conditional_norm", False)).lower(),
        "train_adc_weight": str(train.get("adc_weight", 0.0)),
        "train_label_weight": str(train.get("label_weight", 0.0)),
        "train_label_weight_falls": str(train.get("label_weight_falls", False)).lower(),
        "weights": "generator EMA",
        # only when given, so that files trained without a floor or per-digit weights keep their metadata
        **({"train_label_weight_floor": str(train["label_weight_floor"])} if train.get("label_weight_floor") else {}),
        **({"train_label_digit_weights": train["label_digit_weights"]} if train.get("label_digit_weights") else {}),
    }


# The exporter records each node's Python stack: the source paths of the machine that exported it, which
# would make a rebuild elsewhere differ from the shipped file (the other records name modules, not files).
STACK_TRACE = "pkg.torch.onnx.stack_trace"


def to_onnx(
    model: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    opset: int = DEFAULT_OPSET,
) -> None:
    """Export ``model`` with PyTorch's torch.export-based ONNX exporter, without its per-node stack traces; axis 0
    of every input is ``batch``.

    The first input names the axis; the others follow it (torch.export unifies them), and the
    outputs inherit it. Ctrl-C, SIGTERM and SIGHUP wait for the export (seconds), then stop the caller: raised
    while torch's C++ dispatcher calls into Python to trace, a KeyboardInterrupt cannot pass back through it and
    the process aborts (SIGABRT, a C++ trace, the temporary file left behind).
    """
    dynamic_shapes = ({0: "batch"}, *({0: torch.export.Dim.DYNAMIC} for _ in example[1:]))
    with interrupts_held():
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    exported = onnx.load(str(path))
    written = {entry.domain: entry.version for entry in exported.opset_import}.get("", opset)
    if written != opset:  # the exporter falls back to the opset it can write, with a warning only
        raise ExportError(f"the exporter wrote opset {written}, not the {opset} asked for; choose an opset it supports")
    for node in exported.graph.node:
        kept = [prop for prop in node.metadata_props if prop.key != STACK_TRACE]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(exported, str(path))


def write_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """Replace the model's ``metadata_props`` and run the full ONNX checker."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


@contextmanager
def publish_with_weights(
    out: Path, weights_out: str | Path | None, replaceable: tuple[Path, ...]
) -> Iterator[tuple[Path, Path | None]]:
    """Temporary names for an ONNX file and, if ``weights_out`` is given, the weights it is exported from; both
    appear together when the block succeeds, and neither on an error or interrupt (nor over a file that was not
    there, ``replaceable``, when the export began)."""
    with publish_all([out] if weights_out is None else [out, weights_out], replaceable) as temps:
        yield temps[0], (temps[1] if weights_out is not None else None)


def check_output_files(out: str | Path, others: Iterable[str | Path | None], example: str) -> Path:
    """``out`` as a path; :class:`ExportError` unless it names a file (``example`` shows one) and it and the
    ``others`` given lie in existing folders."""
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"output {out} is a directory; give a file name such as {example}")
    for folder in dict.fromkeys([out.parent, *(Path(other).parent for other in others if other is not None)]):
        problem = folder_problem(folder) or (None if folder.is_dir() else "does not exist")
        if problem is not None:
            raise ExportError(f"output directory {folder} {problem}")
    return out


def export_generator(
    checkpoint: str | Path,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    precision: str = "fp32",
    atol: float | None = None,
    evaluation: Mapping[str, Mapping[str, object]] | None = None,
    evaluation_file: str | Path | None = None,
    weights_out: str | Path | None = None,
    overwrite: bool = False,
) -> ParityReport:
    """Export the checkpoint's EMA generator to ``out`` and verify it against the fp32 PyTorch model.

    ``precision`` is ``fp32``, ``fp16`` or ``int8`` (see :mod:`digitgen.export.precision`); each has its own
    tolerance, and ``atol`` overrides its per-pixel maximum. ``evaluation`` (of ``digitgen evaluate --json``)
    adds its headline figures to the metadata, if it scored the model this export writes; ``evaluation_file``, the
    file it was read from, is never written over. The file appears at
    ``out`` only after verification passes; on any failure or interrupt nothing is left behind. ``weights_out`` also
    writes the EMA generator weights a release ships beside its ONNX file (see
    :func:`digitgen.training.checkpoint.release_weights`). Existing files are replaced only with
    ``overwrite``.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not DEFAULT_OPSET <= opset <= newest:
        raise ExportError(f"opset {opset!r} is not one this exporter writes: choose {DEFAULT_OPSET} to {newest}")
    out = check_output_files(out, [weights_out], "generator.onnx")
    refuse_one_file_twice(
        {"--checkpoint": checkpoint, "--quality": evaluation_file, "--out": out, "--weights-out": weights_out}
    )
    replaceable = refuse_existing([out, weights_out], overwrite)
    generator, config, payload = load_generator(str(checkpoint))
    model = ContractGenerator(generator).eval()  # the reference the file is verified against
    fast = ContractGenerator(with_fast_layers(generator)).eval()  # the same function, as written to the file
    quality = quality_metadata(evaluation) if evaluation is not None else {}
    metadata = {**contract_metadata(payload), "precision": precision, **quality}
    example = (torch.randn(2, config.latent_dim), torch.zeros(2, dtype=torch.long))
    with publish_with_weights(out, weights_out, replaceable) as (tmp, weights_tmp):
        if precision == "int8":
            try:
                with tempfile.TemporaryDirectory() as scratch:
                    fp32 = Path(scratch) / "fp32.onnx"
                    to_onnx(fast, example, fp32, ["z", "digit"], ["image"], opset)
                    quantize_int8(fp32, tmp, config.latent_dim, config.num_classes)
            except OSError as exc:  # which of the two folders failed, neither torch nor the quantizer says
                raise ExportError(
                    f"cannot write {out}: {exc.strerror or exc} (an int8 export also writes the fp32 model and the "
                    f"quantizer's files in the temporary folder{_temporary_folder()}: it needs room too; TMPDIR "
                    "chooses it)"
                ) from exc
        else:
            exported = HalfPrecision(fast).eval() if precision == "fp16" else fast
            to_onnx(exported, example, tmp, ["z", "digit"], ["image"], opset)
        write_metadata(tmp, metadata)
        if evaluation is not None:
            check_scored_model(evaluation, tmp, out)
        try:
            report = verify_parity(tmp, model, TOLERANCES[precision], atol)
        except InvalidModelError as exc:  # named as the file it would have been, not its hidden temporary name
            newer = f"; onnxruntime {ort.__version__} may not run opset {opset}: try a lower --opset"
            raise ExportError(str(exc).replace(str(tmp), str(out)) + (newer if opset > DEFAULT_OPSET else "")) from exc
        if weights_tmp is not None:
            write_payload(release_weights(payload), weights_tmp, weights_out)
    return report


def _temporary_folder() -> str:
    """`` PATH`` of the temporary folder, or nothing where there is none to name."""
    try:
        return f" {tempfile.gettempdir()}"
    except OSError:  # no usable one
        return ""


def verify_file(model_path: str | Path, checkpoint: str | Path, atol: float | None = None) -> ParityReport:
    """Verify an existing ONNX file (any precision) against the checkpoint it was exported from."""
    generator, config, payload = load_generator(str(checkpoint))
    trained = {key: value for key, value in contract_metadata(payload).items() if key.startswith("train_")}
    return verify_parity(model_path, ContractGenerator(generator), atol=atol, config=config, trained=trained)
