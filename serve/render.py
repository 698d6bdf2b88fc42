"""Generate a checked request's digits with the runtime and encode them as the response body."""

from __future__ import annotations

import base64
import json
import threading
import time

from digitgen.runtime.encode import grid_png_bytes, idx_files, npz_bytes, png_bytes, tar_bytes
from digitgen.runtime.generator import DEFAULT_BATCH_SIZE, DigitGenerator, GeneratedDigits, empty_digits, fill_digits
from digitgen.runtime.layout import GRID_FILE, IDX_IMAGES_FILE, IDX_LABELS_FILE, NPZ_FILE, png_name
from digitgen.serve.limits import AbandonedError, TimeLimitError
from digitgen.serve.params import DigitsRequest

IDX_ARCHIVE = "digits-idx.tar"


def generate(
    generator: DigitGenerator,
    request: DigitsRequest,
    deadline: float = float("inf"),
    cancelled: threading.Event | None = None,
) -> GeneratedDigits:
    """The request's digits, batch by batch as ``digitgen generate`` makes them; between batches, stop
    with :class:`AbandonedError` once ``cancelled`` is set, or :class:`TimeLimitError` once
    ``time.monotonic()`` passes ``deadline``."""
    batches = generator.iter_batches(
        request.count, request.digits, request.seed, DEFAULT_BATCH_SIZE, truncation=request.truncation
    )

    def stop_if_abandoned_or_late(_count: int) -> None:
        if cancelled is not None and cancelled.is_set():
            raise AbandonedError
        if time.monotonic() > deadline:
            raise TimeLimitError

    return fill_digits(batches, *empty_digits(request.count, "; ask for less"), stop_if_abandoned_or_late)


def _json(digits: GeneratedDigits) -> bytes:
    pngs = [base64.b64encode(png_bytes(image)).decode("ascii") for image in digits.images]
    return json.dumps({"labels": digits.labels.tolist(), "images": pngs}, separators=(",", ":")).encode()


def encode(digits: GeneratedDigits, fmt: str) -> bytes:
    """The response body of ``fmt``: the bytes ``digitgen generate`` writes (IDX: both files in one tar;
    JSON: labels and base64 PNGs, each the bytes of the digit's PNG file)."""
    if fmt == "png":
        return png_bytes(digits.images[0])
    if fmt == "grid":
        return grid_png_bytes(digits.images)
    if fmt == "npz":
        return npz_bytes(digits.images, digits.labels)
    if fmt == "idx":
        images, labels = idx_files(digits.images, digits.labels)
        return tar_bytes([(IDX_IMAGES_FILE, images), (IDX_LABELS_FILE, labels)])
    return _json(digits)


def filename(fmt: str, first_label: int) -> str | None:
    """The name ``digitgen generate`` gives the file (IDX: the tar's), or ``None`` for JSON."""
    names = {"grid": GRID_FILE, "npz": NPZ_FILE, "idx": IDX_ARCHIVE}
    return png_name(0, first_label) if fmt == "png" else names.get(fmt)
