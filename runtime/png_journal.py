"""The journal of a PNG run: the digest of each file it has written, appended batch by batch, so that ``--resume``
keeps those files by reading them rather than by making their digits again.

A run of ``generate`` (one shard of one) keeps its journal, ``.digitgen-png-run`` (``...-00001-of-00004`` for a
shard), in the output folder while it writes, and removes it once done: an interrupted or killed run leaves it
beside its files. It begins with the run's identity, a digest of everything that shapes a file's bytes (model,
libraries, noise scheme, digits, seed, truncation); then 24 bytes a file: its index and a 16-byte BLAKE2b digest of
its bytes. A file is kept on that record only if the journal is of the same identity and the file's bytes still
have the recorded digest, so a journal of another run, a damaged one, or a file changed since, costs only the
model calls it would have saved. Records are not synced: a power cut loses the last ones, which the resumed run
then checks by making their digits again. A run continues a journal after its last whole record, and one whose
journal the disk cannot take (full) stops journaling there and goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from digitgen.runtime.errors import OutputError
from digitgen.runtime.files import readable_file
from digitgen.runtime.shards import Shard

JOURNAL_NAME = ".digitgen-png-run"
_MAGIC = b"digitgen png run journal 1\n"
_IDENTITY_BYTES = 32
_HEADER_BYTES = len(_MAGIC) + _IDENTITY_BYTES
_RECORD = np.dtype([("index", "<i8"), ("digest", "u1", (16,))])  # not S16, which reads trailing zero bytes as none
_PACKED = struct.Struct("<q16s")  # one record
MAX_PNG_BYTES = 1 << 16  # a digit's PNG is under 1 KB; a larger file is no file of this run's


def journal_path(out_dir: Path, shard: Shard) -> Path:
    """The hidden journal of ``shard``'s PNGs in ``out_dir``."""
    return out_dir / f".{shard.name(JOURNAL_NAME.removeprefix('.'))}"


def run_identity(*parts: object) -> bytes:
    """The identity of a run: a digest of what shapes its files' bytes."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).digest()


def file_digest(data: bytes) -> bytes:
    """The digest the journal keeps of a PNG's bytes (16 bytes of BLAKE2b)."""
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(frozen=True)
class KeptDigits:
    """A batch's worth of digits whose files an earlier run recorded and still hold: kept, not made again."""

    start: int
    labels: np.ndarray
    digests: list[bytes]

    @property
    def indices(self) -> range:
        return range(self.start, self.start + len(self.labels))


@dataclass(frozen=True)
class RecordedFiles:
    """The files an earlier run of the same identity recorded: indices in ascending order, each once."""

    indices: np.ndarray
    digests: np.ndarray

    def digests_of(self, lo: int, hi: int) -> dict[int, bytes]:
        """The recorded digests of indices ``lo .. hi-1``."""
        first, last = np.searchsorted(self.indices, [lo, hi])
        return {
            index: digest.tobytes()
            for index, digest in zip(self.indices[first:last].tolist(), self.digests[first:last], strict=True)
        }


def recorded_files(path: Path, identity: bytes) -> RecordedFiles | None:
    """What the journal at ``path`` records, if it is a journal of a run of ``identity``; ``None`` otherwise."""
    if not readable_file(path):
        return None
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if data[:_HEADER_BYTES] != _MAGIC + identity:
        return None
    body = data[_HEADER_BYTES:]
    records = np.frombuffer(body[: len(body) - len(body) % _RECORD.itemsize], dtype=_RECORD)  # a torn last record
    indices, last = np.unique(records["index"][::-1], return_index=True)  # a file written twice: its last digest
    return RecordedFiles(indices, records["digest"][::-1][last])


def holds_recorded(path: Path, digest: bytes | None) -> bool:
    """Whether ``path`` is a file whose bytes have ``digest``."""
    if digest is None or not readable_file(path):
        return False
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PNG_BYTES + 1)
    except OSError:
        return False
    return len(data) <= MAX_PNG_BYTES and file_digest(data) == digest


class Journal:
    """The journal a run appends to as it writes (see the module's documentation)."""

    def __init__(self, path: Path, identity: bytes | None) -> None:
        """The journal at ``path``, continued if it is one of ``identity``, else begun again with the first record
        (so that a run refused before it wrote any file leaves the folder as it was); a file of that name that is
        no journal is someone's, and refused now. No identity (digits from elsewhere): no journal."""
        if identity is not None and os.path.lexists(path) and (path.is_symlink() or not _is_journal(path)):
            raise OutputError(f"{path} is not a journal of digitgen's, which a PNG run keeps there; move it")
        self.path = path
        self.identity = identity
        self.begun = False  # by this run: no journal of its identity was there
        self._file: BinaryIO | None = None
        self._whole: int | None = None  # bytes of the file that hold whole records and the header, once known
        self._failed = False  # a write failed: nothing more is recorded

    def record(self, indices: Iterable[int], digests: Iterable[bytes]) -> None:
        """Record files written (or kept). A journal that cannot be written (a full disk) is cut back to its last
        whole record, or removed if this run began it and it holds none, and records nothing more: it only saves a
        later ``--resume`` time, and the run goes on (its files, if any are to be written, meet the same disk)."""
        if self.identity is None or self._failed:
            return
        try:
            self._append(b"".join(map(_PACKED.pack, indices, digests)))
        except OSError:
            self._failed = True
            self._cut_back()

    def _append(self, records: bytes) -> None:
        header = b""
        if self._file is None:
            self.begun = recorded_files(self.path, self.identity) is None  # another run's, or a torn header
            self._file = self.path.open("wb" if self.begun else "r+b")
            if self.begun:
                header, self._whole = _MAGIC + self.identity, 0
            else:  # continued after its last whole record: a failed or killed run can leave part of one
                size = self._file.seek(0, os.SEEK_END)
                self._whole = size - (size - _HEADER_BYTES) % _RECORD.itemsize
                self._file.truncate(self._whole)
                self._file.seek(self._whole)
        data = header + records  # a journal's header goes with its first records
        self._file.write(data)
        self._file.flush()
        self._whole = (self._whole or 0) + len(data)

    def _cut_back(self) -> None:
        """After a failed write: the journal's file closed and cut to its last whole record."""
        if self._file is not None:
            with contextlib.suppress(OSError):  # the write left in its buffer fails again; the file closes all the same
                self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            if self._whole is None:  # not even opened: nothing of this run's in it
                return
            if self.begun and self._whole == 0:
                self.path.unlink(missing_ok=True)
            elif self.path.exists():
                os.truncate(self.path, self._whole)

    def close(self, *, remove: bool) -> None:
        """Close the journal's file; with ``remove``, delete it too (its run is complete)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if remove and self.identity is not None:
            self.path.unlink(missing_ok=True)


def remove_shard_journals(out_dir: Path) -> None:
    """Remove the journals that shards of a run left in ``out_dir``, whose every file one unsharded run, holding
    every index, has now checked or written."""
    for path in out_dir.glob(f"{JOURNAL_NAME}-*-of-*"):
        if not path.is_symlink() and _is_journal(path):
            path.unlink(missing_ok=True)


def _is_journal(path: Path) -> bool:
    """Whether ``path`` is a journal, or what a run killed as it began one left (its header cut short)."""
    if not readable_file(path):
        return False
    try:
        with path.open("rb") as f:
            return _MAGIC.startswith(f.read(len(_MAGIC)))
    except OSError:
        return False
