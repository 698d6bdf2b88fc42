"""In-memory encodings of generated digits: the bytes that the writers put in files and the HTTP
service sends, from one implementation each.

Every encoding is a pure function of its arrays (no time stamps, no user or host names), so the
same digits always give the same bytes.
"""

from __future__ import annotations

import io
import math
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnxruntime as ort

from digitgen.runtime.idx import IMAGE_SIDE, idx_header

GRID_COLUMNS = 10
GRID_GAP = 2
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"  # what a zip archive, and so an NPZ file, begins with
PNG_ZLIB_LEVEL = 6


def encoder_versions(provider: str) -> str:
    """What shapes generated files' bytes besides the model and the request: the libraries that compute their
    pixels and encode them."""
    return f"onnxruntime {ort.__version__} {provider}|numpy {np.__version__}|zlib {zlib.ZLIB_RUNTIME_VERSION}"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def is_whole_png(data: bytes) -> bool:
    """Whether ``data`` is a whole PNG file: the signature, then chunks whose lengths and CRCs hold, up to an
    IEND that ends the data (a truncated or damaged file fails)."""
    if not data.startswith(PNG_SIGNATURE):
        return False
    at = len(PNG_SIGNATURE)
    while at + 12 <= len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        end = at + 12 + length
        if end > len(data) or zlib.crc32(data[at + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            return False
        if data[at + 4 : at + 8] == b"IEND":
            return end == len(data)
        at = end
    return False


def png_bytes(image: np.ndarray) -> bytes:
    """A (H, W) uint8 picture as an 8-bit grayscale PNG: one IDAT chunk, every row unfiltered.

    For these mostly black digits unfiltered rows deflate smaller than Pillow's adaptive filters
    (about 320 bytes a digit against 340), and the whole encoding takes half the time.
    """
    height, width = image.shape
    rows = np.zeros((height, width + 1), dtype=np.uint8)  # each row starts with its filter type, 0 (none)
    rows[:, 1:] = image
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # bit depth 8, grayscale, no interlace
    pixels = zlib.compress(rows.tobytes(), PNG_ZLIB_LEVEL)
    return PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


def contact_sheet(images: np.ndarray, columns: int = GRID_COLUMNS) -> np.ndarray:
    """Tile (N, 28, 28) images into one uint8 picture, ``columns`` per row, gray gaps between."""
    rows = -(-len(images) // columns)
    cell = IMAGE_SIDE + GRID_GAP
    sheet = np.full((rows * cell + GRID_GAP, columns * cell + GRID_GAP), 128, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = (GRID_GAP + k * cell for k in divmod(i, columns))
        sheet[top : top + IMAGE_SIDE, left : left + IMAGE_SIDE] = image
    return sheet


def grid_png_bytes(images: np.ndarray) -> bytes:
    """The contact sheet of (N, 28, 28) images as a PNG."""
    return png_bytes(contact_sheet(images))


def open_npz(path: Path) -> np.lib.npyio.NpzFile:
    """``path`` opened as a NumPy archive, pickles refused; ``ValueError`` for a file that is no zip archive (one
    array's ``.npy`` bytes under an ``.npz`` name, which ``np.load`` would return instead, or other bytes, which it
    would try to read as a pickle), or an array whose header declares more or fewer bytes than the archive holds,
    which ``np.load`` would allocate first."""
    with path.open("rb") as f:
        begins = f.read(len(np.lib.format.MAGIC_PREFIX))
    if begins.startswith(np.lib.format.MAGIC_PREFIX):
        raise ValueError("it holds one NumPy array (.npy), not an archive of images and labels")
    if not begins.startswith(ZIP_SIGNATURE):
        raise ValueError("it is not a NumPy archive: a zip file's signature does not begin it")
    loaded = np.load(path, allow_pickle=False)
    try:
        for member in loaded.zip.infolist():
            if member.filename.endswith(".npy"):
                _check_declared_size(loaded.zip, member)
    except BaseException:
        loaded.close()
        raise
    return loaded


def read_npy_header(f: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The shape, Fortran order and type an ``.npy`` stream declares, leaving ``f`` at its first byte of data."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(f)


def _check_declared_size(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
    """``ValueError`` unless the array in ``member`` holds as many bytes as its header says it has."""
    with archive.open(member) as f:
        shape, _, dtype = read_npy_header(f)
        if dtype.hasobject:
            return  # an array of objects is a pickle, which reading refuses
        if not all(type(size) is int for size in shape):  # numpy's header reader lets (True,) through
            raise ValueError(f"{member.filename} declares a shape of {list(shape)}, not of whole numbers")
        declared = math.prod(shape) * dtype.itemsize
        held = member.file_size - f.tell()
    if declared != held:
        raise ValueError(f"{member.filename} declares {declared} bytes of {dtype} {list(shape)} but holds {held}")


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
    """An uncompressed tar of ``(name, content)`` files, with no owner's name (uid and gid 0), dated 1970."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, content in members:
            entry = tarfile.TarInfo(name)
            entry.size, entry.mode = len(content), 0o644
            archive.addfile(entry, io.BytesIO(content))
    return out.getvalue()
