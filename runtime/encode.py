"""In-memory encodings of generated digits: the bytes that the writers put in files and the HTTP
service sends, from one implementation each.

Every encoding is a pure function of its arrays (no time stamps, no user or host names), so the
same digits always give the same bytes.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Sequence

import numpy as np
from PIL import Image

from digitgen.runtime.idx import idx_header

GRID_COLUMNS = 10
GRID_GAP = 2
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


def png_bytes(image: np.ndarray) -> bytes:
    """A (H, W) uint8 picture as a grayscale PNG."""
    out = io.BytesIO()
    Image.fromarray(image, mode="L").save(out, format="PNG")
    return out.getvalue()


def contact_sheet(images: np.ndarray, columns: int = GRID_COLUMNS) -> np.ndarray:
    """Tile (N, 28, 28) images into one uint8 picture, ``columns`` per row, gray gaps between."""
    rows = -(-len(images) // columns)
    cell = 28 + GRID_GAP
    sheet = np.full((rows * cell + GRID_GAP, columns * cell + GRID_GAP), 128, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        sheet[GRID_GAP + r * cell : GRID_GAP + r * cell + 28, GRID_GAP + c * cell : GRID_GAP + c * cell + 28] = image
    return sheet


def grid_png_bytes(images: np.ndarray) -> bytes:
    """The contact sheet of (N, 28, 28) images as a PNG."""
    return png_bytes(contact_sheet(images))


def npz_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """A compressed NumPy archive holding ``images`` and ``labels`` (what ``np.savez_compressed``
    writes, with a fixed entry time so that equal arrays give equal bytes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, mode="w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in (("images", images), ("labels", labels)):
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH)
            entry.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(entry, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    return out.getvalue()


def idx_records(images: np.ndarray, labels: np.ndarray) -> tuple[bytes, bytes]:
    """The bodies of the IDX images and labels files for these digits (no headers)."""
    return images.astype(np.uint8).tobytes(), labels.astype(np.uint8).tobytes()


def idx_files(images: np.ndarray, labels: np.ndarray) -> tuple[bytes, bytes]:
    """The whole IDX images file and labels file of these digits."""
    image_records, label_records = idx_records(images, labels)
    return idx_header(len(images), images=True) + image_records, idx_header(len(labels), images=False) + label_records


def tar_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of ``(name, content)`` files, owned by nobody, dated 1970."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, content in members:
            entry = tarfile.TarInfo(name)
            entry.size, entry.mode = len(content), 0o644
            archive.addfile(entry, io.BytesIO(content))
    return out.getvalue()
