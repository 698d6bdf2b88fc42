"""The embeddable API: load a contract-following ONNX generator and make digits with it."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from digitgen.runtime.contract import ModelInfo, check_contract
from digitgen.runtime.errors import (
    InvalidModelError,
    InvalidRequestError,
    ModelContractError,
    ModelRunError,
    TooManyDigitsError,
)
from digitgen.runtime.idx import IMAGE_SIDE
from digitgen.runtime.noise import MAX_SEED, MIN_TRUNCATION, standard_normal
from digitgen.runtime.session import ORT_ERRORS, model_sha256, open_session, ort_reason, read_model_file, run_model
from digitgen.runtime.text import quoted, read_integer, whole

if TYPE_CHECKING:
    import onnxruntime as ort

DEFAULT_BATCH_SIZE = 256
MAX_BATCH_SIZE = 8192  # digits in one model call; each takes about 0.36 MB while it runs (3 GB at the most)
ARTIFACTS_DIR = Path(__file__).resolve().parent.parent / "artifacts"  # digitgen/artifacts, installed or checked out
# classes a list of digits may hold, repeated in turn: far more than any label distribution needs, and a list
# that can be held (a range of 10**18 would fill memory before it was refused)
MAX_DIGITS_LISTED = 10**8
_NAMED_BAD_DIGITS = 5  # a refusal names the first few bad digits of a list, then counts the rest
# the classes a request asks for, in order: a list or tuple of ints, or a 1-D array of integers
Classes = Sequence[int] | np.ndarray
Whole = int | np.integer  # a count, seed or index: a Python int or a NumPy integer (not a bool)
Real = float | np.floating  # a truncation: a Python float or int, or a NumPy float


def default_model_path(name: str = "generator.onnx") -> Path:
    """A shipped model file (``generator.onnx`` or ``classifier.onnx``) in ``digitgen/artifacts``."""
    return ARTIFACTS_DIR / name


_DIGIT_IN_LIST = re.compile(r"\s*[+-]?[0-9]+\s*")  # signed as --digit reads one: -0 and +7 are classes


def parse_digit_list(text: str) -> list[int | str]:
    """``"0,3,7"`` -> ``[0, 3, 7]`` for the CLI and the server alike; whether each is a class of the model
    is for :meth:`DigitGenerator.check_digits` to say (a number too long to read stays text, which it refuses)."""
    parts = text.split(",")
    if not all(_DIGIT_IN_LIST.fullmatch(part) for part in parts):
        raise InvalidRequestError(f"{quoted(text)} is not a comma-separated list of digits such as 0,3,7")
    return [read_integer(part) for part in parts]


@dataclass(frozen=True, eq=False)
class GeneratedDigits:
    """A batch of digits: uint8 images and their labels, from global index ``start``. Two are equal when they
    hold the same digits from the same index (``==`` compares the arrays; unhashable, as arrays are)."""

    images: np.ndarray  # (N, 28, 28) uint8, 0 = black background
    labels: np.ndarray  # (N,) int64
    start: int = 0  # global index of the first digit

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GeneratedDigits):
            return NotImplemented
        return (
            self.start == other.start
            and np.array_equal(self.labels, other.labels)
            and np.array_equal(self.images, other.images)
        )


@dataclass(frozen=True)
class Request:
    """Checked, normalised arguments of :meth:`DigitGenerator.iter_batches`."""

    num: int
    digits: tuple[int, ...]  # the label cycle
    seed: int
    batch_size: int
    start: int
    truncation: float | None


MAX_INDEX = 2**63 - 1  # the last digit index a request may reach


def labels_for(digits: Sequence[int], start: int, stop: int) -> np.ndarray:
    """Labels of global indices ``[start, stop)``: ``digits`` repeated."""
    cycle = np.asarray(digits, dtype=np.int64)
    return cycle[(np.arange(stop - start) + start % len(cycle)) % len(cycle)]  # no index past int64 is formed


def shown_array(value: object) -> str:
    """What an argument that should be an array is, in a few words: ``float64 (3, 64)``, or its type."""
    return f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__


# how far outside 0 to 1 a pixel may lie: half a grey level, which rounding takes back (float error is 1e-7), not a
# graph that returns tanh's -1 to 1 or 0 to 255, whose digits the clip below would turn to flat squares
PIXEL_SLACK = 0.5 / 255


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, 1, 28, 28) floats in [0, 1] -> (B, 28, 28) uint8."""
    return np.rint(np.clip(images[:, 0], 0.0, 1.0) * 255.0).astype(np.uint8)


def empty_digits(num: int, advice: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Arrays for ``num`` digits and their labels, to be filled; :class:`TooManyDigitsError` (its words, then the
    caller's ``advice``) if they cannot be had (address space is asked for, not memory touched: a count that can
    never be held stops here, at once)."""
    try:
        return np.empty((num, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8), np.empty(num, dtype=np.int64)
    except (ValueError, MemoryError) as exc:  # numpy's ValueError: an array past its address space
        raise TooManyDigitsError(f"{num} digits do not fit in memory at once{advice}") from exc


def fill_digits(
    batches: Iterable[GeneratedDigits],
    images: np.ndarray,
    labels: np.ndarray,
    on_batch: Callable[[int], None] = lambda n: None,
) -> GeneratedDigits:
    """``batches`` copied into ``images`` and ``labels`` (from :func:`empty_digits`), in order, starting where the
    first batch starts; ``on_batch`` after each batch (it may raise to stop)."""
    filled, start = 0, None
    for batch in batches:
        n = len(batch.labels)
        images[filled : filled + n], labels[filled : filled + n] = batch.images, batch.labels
        filled, start = filled + n, batch.start if start is None else start
        on_batch(n)
    return GeneratedDigits(images, labels, start or 0)


def check_int(value: object, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int from ``minimum`` to ``maximum``; :class:`InvalidRequestError` naming ``name`` otherwise
    (a bool is no integer here)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise InvalidRequestError(f"{name} must be an integer {bounds}, got {quoted(value)}")
    return int(value)


def check_count(value: object) -> int:
    """A number of digits: an integer, 1 or more."""
    return check_int(value, "number of digits")


def check_seed(value: object) -> int:
    """A noise seed: an integer from 0 to :data:`MAX_SEED`."""
    return check_int(value, "seed", minimum=0, maximum=MAX_SEED)


def check_path(value: object, name: str) -> Path:
    """``value`` as a :class:`~pathlib.Path` when it names one (a ``str``, a ``Path`` or any ``os.PathLike`` of
    text); :class:`InvalidRequestError` otherwise."""
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if path == "":  # Path("") is the current folder, which no one meant without saying so
            raise InvalidRequestError(f"{name} is an empty path; name a file or folder ('.' for the current folder)")
        if isinstance(path, str):
            if "\0" in path:  # no file name holds one: os.stat() raises ValueError
                raise InvalidRequestError(f"{name} {quoted(path)} holds a NUL character, which no file name can")
            return Path(path)
    raise InvalidRequestError(f"{name} must be a path (a str or a pathlib.Path), got {type(value).__name__} {value!r}")


def check_callable(value: object, name: str) -> None:
    """:class:`InvalidRequestError` naming ``name`` unless ``value`` can be called."""
    if not callable(value):
        raise InvalidRequestError(f"{name} must be a function, e.g. lambda count: None, got {value!r}")


def check_flag(flag: object, name: str) -> None:
    """Refuse a ``flag`` that is not True or False: "no" is truthy, and a string must not replace the user's files."""
    if not isinstance(flag, bool):
        raise InvalidRequestError(f"{name} must be True or False, got {flag!r}")


def check_truncation(value: object) -> float | None:
    """``None`` (no truncation) or a finite number of at least :data:`MIN_TRUNCATION`."""
    if value is None:
        return None
    if isinstance(value, (np.integer, np.floating)):  # compared as Python numbers: float16 cannot hold the bound
        value = float(value)
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not real or not MIN_TRUNCATION <= value <= sys.float_info.max:  # 10**400: an int no float holds
        raise InvalidRequestError(f"truncation must be a finite number >= {MIN_TRUNCATION:g}, got {quoted(value)}")
    return float(value)


def _shown_class(digit: object) -> str:
    """A digit that is no class, as a refusal names it: 12, not np.int64(12); 3.0, not np.float64(3.0)."""
    return quoted(digit.item() if isinstance(digit, np.generic) else digit)


def not_classes_message(bad: list[str], num_classes: int) -> str:
    """The refusal of digits that are not classes of a model, ``bad`` each once (the first few of many named)."""
    shown = bad[:_NAMED_BAD_DIGITS]
    if len(bad) == 1:
        return f"digit {shown[0]} is not a class of this model (0-{num_classes - 1})"
    more = f" and {len(bad) - _NAMED_BAD_DIGITS:,} more" if len(bad) > _NAMED_BAD_DIGITS else ""
    return f"digits {', '.join(shown)}{more} are not classes of this model (0-{num_classes - 1})"


class DigitGenerator:
    """A loaded generator. ``DigitGenerator.from_path()`` opens the shipped model.

    >>> gen = DigitGenerator.from_path()
    >>> batch = gen.generate(10, digits=[7], seed=1)
    >>> batch.images.shape, batch.labels[:3]
    ((10, 28, 28), array([7, 7, 7]))
    """

    def __init__(
        self, path: Path, info: ModelInfo, session: ort.InferenceSession, provider: str, note: str, sha256: str
    ) -> None:
        self.path = path
        self.info = info
        self.provider = provider
        self.note = note
        self.sha256 = (
            sha256  # of the model bytes this generator runs (read once with the session) and its external data
        )
        self._session = session

    @classmethod
    def from_path(
        cls, path: str | os.PathLike[str] | None = None, provider: str = "auto", threads: int | None = None
    ) -> DigitGenerator:
        """Open ``path`` (default: the shipped model) on ``provider`` ("auto", "cpu" or "cuda").

        ``threads``: onnxruntime's intra-op threads (default: one per core). One generator may be
        called from several threads at once: onnxruntime's session is thread-safe, and calls share nothing
        else but the run options through which a stop signal ends every model call of the process.
        """
        path = check_path(path, "the model's path") if path is not None else default_model_path()
        opened = open_session(path, provider, threads)
        info = check_contract(opened.session, str(path))
        return cls(path, info, opened.session, opened.provider, opened.note, opened.sha256)

    @functools.cached_property
    def sha256_without_metadata(self) -> str:
        """:attr:`sha256` less the model's metadata: what ``evaluate --json`` records, so that ``export --quality``
        can check that the figures it stores were measured on the model it writes. Read from the file again,
        which must still hold the model this generator runs."""
        model = read_model_file(self.path)
        if model_sha256(model, self.path) != self.sha256:
            raise InvalidModelError(f"{self.path} changed after it was loaded; load it again")
        return model_sha256(model, self.path, with_metadata=False)

    @property
    def inputs(self) -> list[ort.NodeArg]:
        """onnxruntime's description of the model inputs (name, type, shape)."""
        return self._session.get_inputs()

    @property
    def outputs(self) -> list[ort.NodeArg]:
        """onnxruntime's description of the model outputs."""
        return self._session.get_outputs()

    @property
    def latent_dim(self) -> int:
        """The length of each digit's noise vector ``z`` (the model's metadata)."""
        return self.info.latent_dim

    @property
    def num_classes(self) -> int:
        """How many classes the model draws: labels 0 to ``num_classes - 1``."""
        return self.info.num_classes

    def check_digits(self, digits: Classes | None) -> list[int]:
        """Validate requested classes; ``None`` means all classes in turn."""
        if digits is None:
            return list(range(self.num_classes))
        # a sequence: a set has no order, an iterator may never end; text and bytes are no list of classes
        in_order = (isinstance(digits, np.ndarray) and digits.ndim == 1) or isinstance(digits, Sequence)
        if isinstance(digits, (str, bytes, bytearray, memoryview)) or not in_order:
            raise InvalidRequestError(f"digits must be a list of classes, e.g. [3, 7], got {quoted(digits)}")
        try:
            too_long = len(digits) > MAX_DIGITS_LISTED
        except OverflowError:  # a range longer than a Python index
            too_long = True
        if too_long:
            raise InvalidRequestError(
                f"the list of digits is too long: at most {MAX_DIGITS_LISTED:,} classes, which repeat in turn"
            )
        digits = list(digits)
        if not digits:
            raise InvalidRequestError("the list of digits is empty")
        bad = dict.fromkeys(_shown_class(d) for d in digits if not self._is_class(d))  # each once, in order
        if bad:
            raise InvalidRequestError(not_classes_message(list(bad), self.num_classes))
        return [int(d) for d in digits]

    def _is_class(self, digit: object) -> bool:
        return not isinstance(digit, bool) and isinstance(digit, (int, np.integer)) and 0 <= digit < self.num_classes

    def run(self, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Raw model call: (B, latent_dim) float32 and (B,) int64 -> (B, 1, 28, 28) float32 in [0, 1];
        :class:`InvalidRequestError` for inputs that are not those (finite noise, labels that are classes),
        :class:`ModelRunError` if onnxruntime fails to run it, :class:`ModelContractError` if what it
        returns is not that (a model can declare its output's dimensions symbolic, or return NaN)."""
        self._check_inputs(z, labels)
        try:
            (images,) = run_model(self._session, ["image"], {"z": z, "digit": labels})
        except ORT_ERRORS as exc:
            raise ModelRunError(f"{self.path}: the model failed to run: {ort_reason(exc)}") from exc
        expected = (len(z), 1, IMAGE_SIDE, IMAGE_SIDE)
        if images.dtype != np.float32 or images.shape != expected:
            raise ModelContractError(
                f"{self.path}: the model returned 'image' of shape {images.shape} ({images.dtype}) for "
                f"{len(z)} digits, not {expected} (float32)"
            )
        # in double precision, as the page compares; false for a NaN too
        if not (float(images.min()) >= -PIXEL_SLACK and float(images.max()) <= 1 + PIXEL_SLACK):
            if not np.isfinite(images).all():  # NaN would become black pixels, silently
                raise ModelContractError(f"{self.path}: the model returned pixels that are NaN or infinite, not 0 to 1")
            raise ModelContractError(
                f"{self.path}: the model returned pixels outside 0 to 1, not finished pixels (0 black, 1 white)"
            )
        return images

    def _check_inputs(self, z: object, labels: object) -> None:
        """Refuse what :meth:`run` would hand onnxruntime only to have it fail, or draw the wrong class (a label
        of -1 is class 9 to a Gather)."""
        if not isinstance(z, np.ndarray) or z.dtype != np.float32 or z.ndim != 2 or z.shape[1] != self.latent_dim:
            shape = f"(B, {self.latent_dim})"
            raise InvalidRequestError(f"z must be a float32 array of shape {shape}, got {shown_array(z)}")
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.shape != (len(z),):
            raise InvalidRequestError(f"labels must be an int64 array of shape ({len(z)},), got {shown_array(labels)}")
        if len(z) == 0:
            raise InvalidRequestError("z and labels hold no digit")
        if not np.isfinite(z).all():
            raise InvalidRequestError("z holds NaN or infinite values")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            others = sorted(set(labels.tolist()) - set(range(self.num_classes)))
            raise InvalidRequestError(not_classes_message([str(label) for label in others], self.num_classes))

    def check_request(
        self,
        num: Whole,
        digits: Classes | None = None,
        seed: Whole = 0,
        batch_size: Whole = DEFAULT_BATCH_SIZE,
        start: Whole = 0,
        truncation: Real | None = None,
    ) -> Request:
        """Validate the arguments of :meth:`iter_batches` (typed errors) and return them normalised. Indices run
        to :data:`MAX_INDEX` (labels and noise counters are int64 and uint64 arrays)."""
        start = check_int(start, "start index", minimum=0, maximum=MAX_INDEX)
        num = check_count(num)
        if start + num - 1 > MAX_INDEX:
            digits = f"digits {start}..{start + num - 1} run" if num <= MAX_INDEX else f"a count of {whole(num)} runs"
            raise InvalidRequestError(f"{digits} past index {MAX_INDEX}, the last one")
        return Request(
            num,
            tuple(self.check_digits(digits)),
            check_seed(seed),
            check_int(batch_size, "batch size", maximum=MAX_BATCH_SIZE),
            start,
            check_truncation(truncation),
        )

    def iter_batches(
        self,
        num: Whole,
        digits: Classes | None = None,
        seed: Whole = 0,
        batch_size: Whole = DEFAULT_BATCH_SIZE,
        start: Whole = 0,
        truncation: Real | None = None,
    ) -> Iterator[GeneratedDigits]:
        """Yield digits ``start .. start+num-1`` of the sequence defined by (digits, seed), batch by batch.

        ``truncation`` T redraws noise components beyond +-T (cleaner digits, less variety).
        """
        return self._batches(self.check_request(num, digits, seed, batch_size, start, truncation))

    def _batches(self, request: Request) -> Iterator[GeneratedDigits]:
        for lo in range(request.start, request.start + request.num, request.batch_size):
            hi = min(lo + request.batch_size, request.start + request.num)
            labels = labels_for(request.digits, lo, hi)
            noise = standard_normal(request.seed, lo, hi, self.latent_dim, request.truncation)
            yield GeneratedDigits(to_uint8(self.run(noise, labels)), labels, lo)

    def generate(
        self,
        num: Whole,
        digits: Classes | None = None,
        seed: Whole = 0,
        batch_size: Whole = DEFAULT_BATCH_SIZE,
        truncation: Real | None = None,
    ) -> GeneratedDigits:
        """Generate ``num`` digits at once (use :meth:`iter_batches` for very large ``num``);
        :class:`TooManyDigitsError` (a ``MemoryError``) before any work if they cannot be held."""
        batches = self.iter_batches(num, digits, seed, batch_size, truncation=truncation)
        return fill_digits(batches, *empty_digits(num, "; make them batch by batch with iter_batches"))
