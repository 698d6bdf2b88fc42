"""Open an ONNX file as an onnxruntime session on the requested execution provider."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from digitgen.runtime.errors import (
    InvalidModelError,
    InvalidRequestError,
    ModelNotFoundError,
    ProviderUnavailableError,
)
from digitgen.runtime.external_data import external_data_files, without_metadata
from digitgen.runtime.text import quoted

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROVIDER_CHOICES = ("auto", *PROVIDERS)
# protobuf's limit on one message, and so on an ONNX file: a larger model keeps its tensors in files beside it
MAX_MODEL_BYTES = 2**31 - 1
MAX_THREADS = 1024  # onnxruntime's intra-op threads; far more than any core count, short of its int32 overflow
# Every exception class onnxruntime's binding defines (Fail, InvalidGraph, EPFail, DeviceReset, ...): none
# derives from a common base, and a new release may add more.
ORT_ERRORS: tuple[type[BaseException], ...] = (
    *(cls for cls in vars(ort_state).values() if isinstance(cls, type) and issubclass(cls, Exception)),
    UnicodeDecodeError,  # onnxruntime decodes strings in corrupt files and can fail doing so
)
# ...and what building a session can raise besides: a C++ exception onnxruntime does not map to its own classes
# (a CUDA provider that cannot start, among them)
SESSION_ERRORS = (*ORT_ERRORS, RuntimeError)


# The options of every model call the project makes: a stop signal sets their terminate flag
# (runtime.signals.model_calls_stop_on_signals), which onnxruntime reads between nodes and in each loop.
RUN_OPTIONS = ort.RunOptions()
RUN_OPTIONS.log_severity_level = 4  # fatal only, as for the session


def run_model(session: ort.InferenceSession, outputs: list[str], feeds: dict[str, Any]) -> list[Any]:
    """``session.run`` with :data:`RUN_OPTIONS`: :class:`KeyboardInterrupt` where a stop signal ended the call,
    onnxruntime's own errors otherwise."""
    try:
        return session.run(outputs, feeds, RUN_OPTIONS)
    except ORT_ERRORS:
        if RUN_OPTIONS.terminate:
            raise KeyboardInterrupt("a stop signal ended the model call") from None
        raise


@dataclass(frozen=True)
class OpenedSession:
    """An onnxruntime session, where it runs, and the hash of the model it was built from."""

    session: ort.InferenceSession
    provider: str  # "cpu" or "cuda": what really runs
    note: str  # non-empty when "auto" found onnxruntime's CUDA provider but it failed to start
    sha256: str  # hex SHA-256 of the model bytes the session was built from (and of its external data files)


def _usable_providers() -> list[str]:
    available = ort.get_available_providers()
    return [name for name, ort_name in PROVIDERS.items() if ort_name in available]


def _resolve(provider: str) -> str:
    if provider not in PROVIDER_CHOICES:
        raise ProviderUnavailableError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}")
    usable = _usable_providers()
    if provider == "auto":
        # Without onnxruntime-gpu nobody expects CUDA, so falling back to the CPU needs no note.
        return "cuda" if "cuda" in usable else "cpu"
    if provider not in usable:
        raise ProviderUnavailableError(
            f"provider {provider!r} cannot run here; available: {', '.join(usable)} "
            "(CUDA needs the onnxruntime-gpu package and an NVIDIA GPU)"
        )
    return provider


# where onnxruntime raised: its source file and line, then the C++ function, pretty (up to two words of return
# type: "virtual OrtValue* ns::f(int) ") or plain ("f "); at a line's start or after a space or a full stop
# ("... failed.env.cc:538 OpenRandomAccessFile Random-access ...")
_SOURCE_LOCATION = re.compile(
    r"(?:^|(?<=[\s.]))(?:/?[\w.-]+/)*[\w-]+\.(?:cc|cpp|h):\d+ (?:(?:[^\s(]+ ){0,2}[^\s(]+\(.*?\)|\S+)(?: |$)"
)


def _without_source(line: str) -> str:
    """``line`` less the source locations in it, a space left where one was glued to the words before it."""
    return _SOURCE_LOCATION.sub(lambda m: " " if m.start() and not line[m.start() - 1].isspace() else "", line).strip()


def ort_reason(exc: BaseException) -> str:
    """onnxruntime's message without its "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model ... failed:" prefix,
    nor the source file and C++ function that raised it ("/onnxruntime_src/.../model.cc:256 onnxruntime::...(...)");
    a node that failed as the model ran is named in a few words ("Expand node 'big': Failed to allocate ...").
    Its lines are joined with "; ": the later ones say what was wrong ("index: 1 Got: 5 Expected: 64")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (Load model from .* failed:)?", "", lines[0]).strip()
    head = re.sub(
        r"^Non-zero status code returned while running (\S+) node\. Name:'(.*?)' Status Message: ",
        r"\1 node '\2': ",
        head,
    )
    return "; ".join(filter(None, map(_without_source, [head, *lines[1:]]))).rstrip(".")


def external_files(model: bytes, path: Path) -> list[Path]:
    """The files beside ``path`` that ``model`` keeps tensors in, checked before anything reads them:
    :class:`InvalidModelError` for a location that is absolute or leaves the model's folder (ONNX's own rule; by a
    symbolic link too), and
    for one that is not a regular file (missing, a folder, or a pipe or a device, which would be read for ever)."""
    try:
        locations = external_data_files(model)
    except ValueError as exc:
        raise InvalidModelError(f"{path} is not a valid ONNX model ({exc})") from exc
    return _checked_locations(locations, path)


def _checked_locations(locations: list[str], path: Path) -> list[Path]:
    files = []
    folder = path.parent.resolve()
    for location in locations:
        file = path.parent / location
        if "\0" in location:  # before any call on it, which would raise ValueError
            raise InvalidModelError(
                f"{path} keeps tensors in {quoted(location)}: a NUL character, which no file name can hold"
            )
        if not location or Path(location).is_absolute() or ".." in Path(location).parts:
            raise InvalidModelError(_outside(path, location))
        try:
            found = file.stat()  # follows links: a loop of them is ELOOP, on every Python
        except FileNotFoundError:
            raise InvalidModelError(f"{path} keeps tensors in {file}, which does not exist") from None
        except OSError as exc:  # a name too long, a loop of links, a folder that cannot be searched
            raise InvalidModelError(
                f"{path} keeps tensors in {quoted(location)}, which cannot be read ({exc.strerror or exc})"
            ) from None
        if not file.resolve().is_relative_to(folder):  # a symbolic link that leads out of the folder, as `..` does
            raise InvalidModelError(_outside(path, location))
        if not stat.S_ISREG(found.st_mode):
            raise InvalidModelError(
                f"{path} keeps tensors in {file}, which is not a regular file (a folder, a pipe or a device)"
            )
        files.append(file)
    return files


def _look_for_external_data_in(options: ort.SessionOptions, path: Path) -> None:
    """Have onnxruntime read the external data files of the model at ``path`` from its folder, whose name it takes
    as UTF-8 text only (a name of other bytes, or one read in another encoding, is refused in words)."""
    folder = str(path.parent)
    try:
        folder.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidModelError(
            f"{path}: onnxruntime cannot read its external data files from a folder whose name is "
            "not UTF-8 text; move the model and its files to another folder"
        ) from None
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)


def _outside(path: Path, location: str) -> str:
    return (
        f"{path} keeps tensors in {quoted(location)}, which is not a path inside its folder; external data lies beside "
        "the model"
    )


def model_sha256(model: bytes, path: Path, *, with_metadata: bool = True) -> str:
    """SHA-256 of ``model``, the bytes read from ``path`` (less its ``metadata_props`` unless ``with_metadata``);
    for a model that keeps tensors in files beside it, extended by each file's name and SHA-256, so that the
    hash changes with any weight."""
    try:
        pieces = [model] if with_metadata else list(without_metadata(model))
    except ValueError as exc:
        raise InvalidModelError(f"{path} is not a valid ONNX model ({exc})") from exc
    return _digest(pieces, external_files(model, path), path)


def _digest(pieces: list[bytes] | list[memoryview], files: list[Path], path: Path) -> str:
    """SHA-256 of a model's ``pieces``, extended by the name and SHA-256 of each of its external data ``files``."""
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    try:
        for file in files:
            with file.open("rb") as data:  # in chunks: external data may be gigabytes
                external = hashlib.file_digest(data, "sha256").digest()
            location = file.relative_to(path.parent).as_posix()
            digest.update(b"\0" + location.encode() + b"\0" + external)
    except OSError as exc:
        raise InvalidModelError(f"cannot read the external data of {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def _create_session(model: bytes, options: ort.SessionOptions, chosen: str) -> ort.InferenceSession:
    """A session on ``chosen`` ("cuda": with the CPU behind it), or on the CPU alone where the CUDA session cannot
    even be created, as onnxruntime's own retry does, but without the banner that retry prints on stdout."""
    providers = [PROVIDERS[chosen]] + ([PROVIDERS["cpu"]] if chosen != "cpu" else [])
    try:
        return ort.InferenceSession(model, sess_options=options, providers=providers, enable_fallback=0)
    except SESSION_ERRORS:
        if chosen == "cpu":
            raise
    return ort.InferenceSession(model, sess_options=options, providers=[PROVIDERS["cpu"]], enable_fallback=0)


def _exists_as_no_file(path: Path) -> bool:
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_model_file(path: Path) -> bytes:
    """The bytes of the model file ``path``: :class:`ModelNotFoundError` if there is none, :class:`InvalidModelError`
    if it is no regular file (a pipe is not waited on), cannot be read, or is larger than an ONNX file can be (refused
    before it is read into memory)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise ModelNotFoundError(f"model not found: {path}") from None
    except OSError as exc:  # a name too long, a loop of links, a folder that cannot be searched; or no file at all
        if _exists_as_no_file(path):  # a socket (ENXIO), a folder on Windows (EACCES): what it is, not errno's words
            raise InvalidModelError(f"model path is not a file: {path}") from None
        raise InvalidModelError(f"cannot read model {path}: {exc.strerror or exc}") from exc
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise InvalidModelError(f"model path is not a file: {path}")
        if found.st_size > MAX_MODEL_BYTES:
            raise InvalidModelError(
                f"{path} is not a valid ONNX model ({found.st_size:,} bytes: an ONNX file holds at most 2 GiB; a "
                "larger model keeps its tensors in external data files)"
            )
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as file:
        try:
            return file.read()
        except OSError as exc:
            raise InvalidModelError(f"cannot read model {path}: {exc.strerror or exc}") from exc


def open_session(path: str | Path, provider: str = "auto", threads: int | None = None) -> OpenedSession:
    """Load ``path`` with onnxruntime; raise typed errors for missing, corrupt or unrunnable models.

    The file is read once: the session and :attr:`OpenedSession.sha256` come from the same bytes, so
    the hash names the model that runs even if the file is replaced meanwhile (external data files, which
    onnxruntime reads itself, are read again for the hash). ``threads`` sets
    onnxruntime's intra-op threads (default: onnxruntime's choice, one per core).
    """
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= MAX_THREADS
    ):
        raise InvalidRequestError(f"threads must be an integer from 1 to {MAX_THREADS}, got {quoted(threads)}")
    path = Path(path)
    model = read_model_file(path)
    chosen = _resolve(provider)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failure reaches the user as a typed error, in its words
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    try:
        locations = external_data_files(model)
    except ValueError:  # not a protobuf: onnxruntime's own words say what is wrong, below
        locations = []
    files = _checked_locations(locations, path)  # before onnxruntime reads them
    if locations:  # external data (tensors in files beside the model) is found next to the file, as by path
        _look_for_external_data_in(options, path)
    try:
        session = _create_session(model, options, chosen)
    except SESSION_ERRORS as exc:
        raise InvalidModelError(f"{path} is not a valid ONNX model ({ort_reason(exc)})") from exc
    sha256 = _digest([model], files, path)  # the files checked above, not parsed and checked again
    running = session.get_providers()[0]
    if running != PROVIDERS[chosen]:
        if provider == "auto":
            return OpenedSession(session, "cpu", "CUDA failed to start in onnxruntime; running on the CPU", sha256)
        raise ProviderUnavailableError(
            f"provider {provider!r} failed to start (onnxruntime fell back to {running}); available: cpu"
        )
    return OpenedSession(session, chosen, "", sha256)
