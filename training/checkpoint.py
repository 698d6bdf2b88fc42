"""Self-describing checkpoints: written atomically, read with ``weights_only=True``."""

from __future__ import annotations

import io
import math
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from digitgen.runtime.errors import OutputError
from digitgen.runtime.files import publish, readable_file
from digitgen.runtime.text import quoted
from digitgen.training.config import MAX_STEPS
from digitgen.training.errors import CheckpointError

FORMAT_VERSION = 1
# A release ships only what export needs: the EMA generator and the settings that describe it.
WEIGHTS_KEYS = ("format_version", "config", "train", "step", "generator_ema")
REQUIRED_KEYS = (*WEIGHTS_KEYS, "generator", "discriminator", "optimizers", "rng")


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write ``payload`` to ``path`` via a temporary file and an atomic rename; :class:`OutputError` if it
    cannot be written."""
    with publish(path) as tmp:
        write_payload(payload, tmp, path)


def write_payload(payload: dict[str, Any], tmp: Path, path: str | Path) -> None:
    """Write ``payload`` to ``tmp``, the temporary name of ``path`` (which an error names). Serialised in memory
    first, then written as any file is, so that a failed write (a full disk) is named by the system's words, not
    by torch's writer ("unexpected pos ...")."""
    serialised = io.BytesIO()
    torch.save(payload, serialised)
    try:
        tmp.write_bytes(serialised.getbuffer())
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint (everything ``--resume`` needs) as data only."""
    payload = load_weights(path)
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing and set(missing) == set(REQUIRED_KEYS) - set(WEIGHTS_KEYS):
        raise CheckpointError(
            f"{path}: holds generator weights only (no discriminator or optimizer state): "
            "it can be exported and verified, not resumed; start a new run instead"
        )
    if missing:
        raise CheckpointError(f"{path}: a checkpoint without {', '.join(missing)} cannot be resumed")
    return payload


def release_weights(payload: dict[str, Any]) -> dict[str, Any]:
    """The part of a checkpoint a release ships: EMA generator, configuration, training summary."""
    return {key: payload[key] for key in WEIGHTS_KEYS}


def read_data_file(path: str | Path, missing: str, unreadable: str) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain data, nothing in the file runs.
    :class:`CheckpointError` "``missing``: PATH" if there is no such file, "PATH: ``unreadable`` (why)" if it
    cannot be read so."""
    path = Path(path)
    try:
        path.stat()
    except FileNotFoundError:  # a dangling link among them
        raise CheckpointError(f"{missing}: {path}") from None
    except OSError as exc:  # a loop of links, a path through a file, a folder it may not enter
        raise CheckpointError(f"{path}: {unreadable} ({exc.strerror or exc})") from None
    if not readable_file(path):
        raise CheckpointError(f"{path}: {unreadable} (not a regular file: a folder, a pipe or a device)")
    damaged = _record_failing_its_crc(path)
    if damaged is not None:
        raise CheckpointError(f"{path}: {unreadable} (corrupt: its record {damaged} fails its CRC-32 check)")
    try:
        with warnings.catch_warnings():  # torch warns of a legacy (non-zip) file before reading it; the error says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: {unreadable} (not a PyTorch file of tensors and plain data; "
            "read with weights_only=True, nothing in it ran)"
        ) from exc
    except (zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError) as exc:  # these say what is wrong
        first_sentence = str(exc).strip().split(". ")[0].splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: {unreadable} (truncated or corrupt: {first_sentence})") from exc
    except Exception as exc:  # stray bytes fail the unpickler in other ways too (KeyError, IndexError, struct.error)
        kind = (
            type(exc).__qualname__
            if type(exc).__module__ == "builtins"
            else f"{type(exc).__module__}.{type(exc).__qualname__}"
        )
        raise CheckpointError(f"{path}: {unreadable} (corrupt: {kind} in its pickled data)") from exc


def _record_failing_its_crc(path: Path) -> str | None:
    """The first record of a PyTorch file (a zip) whose bytes fail the CRC-32 stored for them, which torch.load
    does not check; ``None`` if all pass, if the file stores none, or if it is no zip (torch.load says why)."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(info.CRC for info in archive.infolist()):  # saved without checksums
                return None
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None


def is_exactly(value: object, expected: object) -> bool:
    """Whether ``value``, read from a file, is ``expected``: of its type and equal (a tensor or a list there, which
    ``==`` would compare item by item or refuse to call true or false, is not)."""
    return type(value) is type(expected) and value == expected


def shown(value: object) -> str:
    """A value read from a file as a refusal quotes it: a number or a text by its repr, anything else by its type
    (a tensor's repr runs to many lines)."""
    return quoted(value) if value is None or type(value) in (int, float, str, bool) else f"a {type(value).__name__}"


def load_weights(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint or release weights as data only; :class:`CheckpointError` if not ours."""
    payload = read_data_file(path, "checkpoint not found", "not a readable digitgen checkpoint")
    if not isinstance(payload, dict) or any(key not in payload for key in WEIGHTS_KEYS):
        raise CheckpointError(f"{path}: not a digitgen checkpoint (keys missing)")
    if not is_exactly(payload["format_version"], FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: checkpoint format {shown(payload['format_version'])}, this version reads {FORMAT_VERSION}"
        )
    step = payload["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: not a digitgen checkpoint (its step {shown(step)} is not a count of steps)")
    return payload


def first_problem(exc: BaseException, limit: int = 160) -> str:
    """The first line of what ``exc`` says (after torch's "Error(s) in loading ..." heading, its first finding: a
    missing key, an unexpected one or a size mismatch), cut to ``limit`` characters; its type if it says nothing."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        lines = lines[1:]
    problem = lines[0] if lines else type(exc).__name__
    return problem if len(problem) <= limit else problem[: limit - 3] + "..."


def same_kinds(saved: object, fresh: object) -> bool:
    """Whether ``saved`` holds what ``fresh`` holds: the same keys and lengths, values of the same types, numbers
    finite. A state dict read from a file is data: one of another shape would fail later, deep inside torch."""
    if isinstance(fresh, dict):
        same_keys = isinstance(saved, dict) and saved.keys() == fresh.keys()
        return same_keys and all(same_kinds(saved[key], fresh[key]) for key in fresh)
    if isinstance(fresh, (list, tuple)):
        return type(saved) is type(fresh) and len(saved) == len(fresh) and all(map(same_kinds, saved, fresh))
    if isinstance(fresh, float):
        return type(saved) is float and math.isfinite(saved)
    return type(saved) is type(fresh)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: object, name: str) -> None:
    """Load ``saved`` into ``optimizer``; ``ValueError`` naming the ``name`` optimizer unless its parameter groups
    hold the settings a fresh one holds (:func:`same_kinds`) and each parameter's state holds Adam's moments, of
    its shape, and step (PyTorch checks neither: a wrong one would fail at the first step)."""
    fresh = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)  # type: ignore[arg-type]
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"the {name} optimizer's state does not load ({first_problem(exc)})") from None
    for group, before in zip(optimizer.param_groups, fresh, strict=True):
        for key in sorted(group.keys() - {"params"} | before.keys()):
            if not same_kinds(group.get(key), before.get(key)):
                raise ValueError(f"the {name} optimizer's setting {key} is {group.get(key)!r}, not of its kind")
        if not all(0 <= beta < 1 for beta in group["betas"]):  # else its moments' corrections divide by 0 or flip
            raise ValueError(f"the {name} optimizer's betas are {group['betas']}, not two numbers in [0, 1)")
        moments = {"exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())  # Adam's
        for parameter in group["params"]:
            state = optimizer.state.get(parameter)
            if state is not None:  # none yet for a parameter that has had no gradient
                _check_adam_state(state, moments, parameter.shape, name)


def _check_adam_state(state: dict, moments: set[str], shape: torch.Size, name: str) -> None:
    """``ValueError`` unless ``state`` holds exactly a one-number step and ``moments`` of ``shape``."""
    expected = sorted(moments | {"step"})
    if sorted(state) != expected:
        raise ValueError(f"the {name} optimizer's state of a parameter holds {sorted(state)}, not {expected}")
    step = state["step"]
    single = isinstance(step, torch.Tensor) and step.layout == torch.strided and step.numel() == 1
    held = step.item() if single else step
    if not (single and step.is_floating_point() and 0 <= held <= MAX_STEPS):  # NaN compares false
        raise ValueError(f"the {name} optimizer's step is {shown(held)}, not one count of steps")
    for key in sorted(moments):
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.shape != shape:
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else repr(value)
            raise ValueError(f"the {name} optimizer's {key} is {found} for a parameter of {tuple(shape)}")
