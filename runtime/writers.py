"""Write generated digits as PNG files, a contact sheet, an NPZ archive, an MNIST IDX pair or a
torchvision MNIST root.

A request is planned (checked) before any digit is made, then written. Every file is written under
a temporary name and renamed when complete, so an interrupted or failed run leaves complete files
or none; ``resume`` keeps the files that already hold exactly what the run would write, replaces
damaged ones and refuses complete files of other digits (another run's). Batches stream in, so PNG
and IDX output use memory independent of the number of digits.
"""

from __future__ import annotations

import array
import bisect
import contextlib
import dataclasses
import itertools
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from digitgen.runtime.encode import (
    encoder_versions,
    grid_png_bytes,
    idx_records,
    npz_bytes,
    png_bytes,
)
from digitgen.runtime.errors import InvalidRequestError, OtherRunError, OutputError
from digitgen.runtime.files import (
    appeared_meanwhile,
    atomic_file,
    atomic_files,
    new_folders,
    prepare_output_dir,
    refuse_existing,
    refuse_if_claimed,
    refuse_non_files,
    refuse_writing_over,
    remove_if_empty,
    remove_leftover,
    temporary_name,
)
from digitgen.runtime.generator import (
    DEFAULT_BATCH_SIZE,
    MAX_INDEX,
    Classes,
    DigitGenerator,
    GeneratedDigits,
    Real,
    Request,
    Whole,
    check_callable,
    check_flag,
    check_int,
    empty_digits,
    fill_digits,
    labels_for,
    shown_array,
)
from digitgen.runtime.idx import (
    IMAGE_SIDE,
    MNIST_RAW,
    check_idx_count,
    idx_header,
)
from digitgen.runtime.index_lock import claim_indices, refuse_if_indices_claimed
from digitgen.runtime.layout import (
    DEFAULT_TEST_COUNT,
    FORMATS,
    check_grid_count,
    existing_outputs,
    leftover_temporaries,
    output_names,
    png_index,
    png_name,
    pngs_in_range,
)
from digitgen.runtime.noise import NOISE_SCHEME
from digitgen.runtime.png_journal import (
    Journal,
    KeptDigits,
    RecordedFiles,
    file_digest,
    holds_recorded,
    journal_path,
    recorded_files,
    remove_shard_journals,
    run_identity,
)
from digitgen.runtime.resume import begins_with, holds, refuse_a_longer_run, refuse_other_digits, resume_check
from digitgen.runtime.run_record import (
    is_recorded,
    is_whole_record,
    record_name,
    run_record,
)
from digitgen.runtime.shards import WHOLE, Shard
from digitgen.runtime.signals import interrupts_held
from digitgen.runtime.text import quoted

OnBatch = Callable[[int], None]


@dataclass(frozen=True)
class Publishing:
    """How a run of a non-PNG format publishes its files: ``check`` (:func:`resume_check`'s answer) keeps or vets
    a file already there; ``replaceable`` are the files that were there when the run was checked, and a file found
    under another output's name while the run writes is refused."""

    check: Callable[[Path], None] | None
    replaceable: tuple[Path, ...]

    def files(self, paths: Sequence[Path]) -> AbstractContextManager[list[BinaryIO]]:
        """:func:`atomic_files` of ``paths``, published on these terms."""
        return atomic_files(paths, self.check, replaceable=self.replaceable)


MAX_RECORD_BYTES = 1 << 16  # a run record is a few hundred bytes: a larger file of its name is no record


def _check_arrays(batch: object) -> None:
    """A typed error unless ``batch`` holds uint8 images (N, 28, 28) and integer labels (N,) from 0 to 255 (what
    every format can store: an IDX label is one byte), as a hand-made batch passed to :func:`write_digits` may not."""
    if not isinstance(batch, GeneratedDigits):
        raise InvalidRequestError(
            f"a batch must be a GeneratedDigits(images, labels, start), got {type(batch).__name__}; "
            "no new file was kept"
        )
    images, labels, start = batch.images, batch.labels, batch.start
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise InvalidRequestError(
            f"a batch's images must be uint8 (N, 28, 28), got {shown_array(images)}; no new file was kept"
        )
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidRequestError(
            f"a batch's labels must be integers 0-255 of shape (N,), got {shown_array(labels)}; no new file was kept"
        )
    if labels.size and not 0 <= labels.min() <= labels.max() <= 255:
        raise InvalidRequestError(
            f"a batch's labels must be 0-255, got {labels.min()} to {labels.max()}; no new file was kept"
        )
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)):
        raise InvalidRequestError(f"a batch's start must be an integer, got {quoted(start)}; no new file was kept")


def _checked(
    batches: Iterable[GeneratedDigits | KeptDigits], start: int, stop: int
) -> Iterator[GeneratedDigits | KeptDigits]:
    """``batches`` while they hold exactly the digits ``start .. stop-1`` in order; a typed error otherwise."""
    expected = start
    for batch in batches:
        if not isinstance(batch, KeptDigits):
            _check_arrays(batch)
            if len(batch.images) != len(batch.labels):
                raise InvalidRequestError(
                    f"a batch holds {len(batch.images)} images and {len(batch.labels)} labels; no new file was kept"
                )
        if batch.start != expected or expected + len(batch.labels) > stop:
            raise InvalidRequestError(
                f"the batches do not hold digits {start}..{stop - 1} in order: got {len(batch.labels)} "
                f"starting at {batch.start} after {expected - start}; no new file was kept"
            )
        expected += len(batch.labels)
        yield batch
    if expected != stop:
        raise InvalidRequestError(
            f"the batches held {expected - start} digits, not the {stop - start} promised; no new file was kept"
        )


def _png_indices(shard: Shard, total: int) -> tuple[int, int | None]:
    """The PNG indices a run may write or remove: its shard's, or, unsharded, every one (a longer run's too)."""
    return (0, None) if shard.count == 1 else shard.bounds(total)


def _by_index(paths: Iterable[Path]) -> dict[int, list[Path]]:
    """PNG files grouped by their digit's index (a damaged run can leave one index under two labels)."""
    grouped: dict[int, list[Path]] = {}
    for path in paths:
        grouped.setdefault(png_index(path), []).append(path)
    return grouped


# PNGs written under one hold of the stop signals: a hold costs 10-40 us, a few percent of a PNG's time, and a
# stop signal waits for the rest of the group, a few milliseconds of writing
_FILES_A_HOLD = 32


def _write_pngs(
    batches: Iterable[GeneratedDigits | KeptDigits],
    out_dir: Path,
    replaced: Sequence[Path],
    resume: bool,
    vet: bool,
    on_batch: OnBatch,
    journal: Journal,
) -> int:
    """One PNG per digit; returns how many existing files were kept. Each batch's files, written or kept, are
    recorded in ``journal``; a :class:`KeptDigits` batch is kept as its files are.

    A file of the same index but another label is removed, so that, once the call is done, an index never has
    two labels in one folder, and so are ``replaced`` files past the batches' digits (a longer run's). With
    ``resume``, a file that already holds exactly the digit's bytes is kept as it is, a complete file of other
    digits is refused (:func:`refuse_other_digits`), and damaged files are replaced or removed only once every
    file has been checked, so that a refusal leaves them as they were; without ``vet`` (an overwrite resumed),
    every other file is replaced as it is reached and none is refused. If ``batches`` turn out not to hold the
    promised digits, or a file is refused, the files this call created are removed; those it replaced with
    ``--overwrite``'s permission hold their digits, and the error says how many.
    """
    stale = _by_index(replaced)
    kept, overwritten, created, created_labels = 0, 0, array.array("q"), bytearray()  # 9 bytes a created file
    discarded: list[Path] = []  # with resume: damaged files of another label, removed at the end
    repairs = _Repairs(out_dir)  # with resume: damaged files of this label, replaced at the end
    try:
        for batch in batches:
            if isinstance(batch, KeptDigits):  # each file holds exactly its digit: the only one of its index
                for index in batch.indices:
                    del stale[index]
                kept += len(batch.labels)
                journal.record(batch.indices, batch.digests)
                on_batch(len(batch.labels))
                continue
            for lo in range(0, len(batch.labels), _FILES_A_HOLD):
                hi = lo + _FILES_A_HOLD
                with interrupts_held():
                    chunk = zip(batch.images[lo:hi], batch.labels[lo:hi], strict=True)
                    for offset, (image, label) in enumerate(chunk, start=lo):
                        path = out_dir / png_name(batch.start + offset, int(label))
                        encoded = png_bytes(image)
                        earlier = stale.pop(batch.start + offset, [])
                        keep = resume and path in earlier and holds(path, encoded)
                        for old in earlier:
                            if vet and not (keep and old == path):
                                refuse_other_digits(old)
                        repaired = False
                        if keep:
                            kept += 1
                        elif path not in earlier and os.path.lexists(path):  # not there when the run was checked
                            raise appeared_meanwhile(path, out_dir)
                        elif vet and path in earlier:
                            repairs.add(batch.start + offset, int(label), encoded)
                            repaired = True
                        else:
                            _write_png(path, encoded)
                            if path not in earlier:
                                created.append(batch.start + offset)
                                created_labels.append(int(label))
                            else:
                                overwritten += 1
                        for old in earlier:
                            if old != path:
                                (discarded.append if vet else _remove)(old)
                        if not repaired:  # a damaged file is replaced at the end
                            journal.record([batch.start + offset], [file_digest(encoded)])
            on_batch(len(batch.labels))
        repairs.write()
        for path in [*discarded, *(path for past in stale.values() for path in past)]:
            _remove(path)
    except (InvalidRequestError, OtherRunError) as exc:
        for index, label in zip(created, created_labels, strict=True):
            _remove(out_dir / png_name(index, label))
        if overwritten:  # with permission, and not to be put back: said, so that no one takes the folder as it was
            files = "1 file it had replaced holds" if overwritten == 1 else f"{overwritten} files it had replaced hold"
            raise type(exc)(f"{exc}; {files} this request's digits now (--overwrite)") from exc
        raise
    finally:
        repairs.close()
    return kept


class _Repairs:
    """Damaged PNGs of a resumed run and the bytes to replace them with, set aside until every file has been
    checked: the bytes in an unnamed temporary file in the output folder (gone with the process, however it
    ends), 13 bytes each in memory, so that a folder of a million cut-short files costs no more memory than
    a complete one."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.indices, self.labels, self.sizes = array.array("q"), bytearray(), array.array("I")
        self._spool: BinaryIO | None = None

    def add(self, index: int, label: int, encoded: bytes) -> None:
        try:
            if self._spool is None:
                self._spool = tempfile.TemporaryFile(dir=self.out_dir)  # noqa: SIM115 (closed by close())
            self._spool.write(encoded)
        except OSError as exc:
            raise self._cannot_spool(exc) from exc
        self.indices.append(index)
        self.labels.append(label)
        self.sizes.append(len(encoded))

    def write(self) -> None:
        """Replace each damaged file with its digit."""
        if self._spool is None:
            return
        try:
            self._spool.seek(0)  # what is still in its buffer is written first
        except OSError as exc:
            raise self._cannot_spool(exc) from exc
        for index, label, size in zip(self.indices, self.labels, self.sizes, strict=True):
            _write_png(self.out_dir / png_name(index, label), self._spool.read(size))

    def close(self) -> None:
        if self._spool is not None:
            with contextlib.suppress(OSError):  # a write left in its buffer: refused already, by add() or write()
                self._spool.close()

    def _cannot_spool(self, exc: OSError) -> OutputError:
        return OutputError(
            f"cannot write in {self.out_dir} (the digits that replace its damaged files wait in a temporary file "
            f"there until every file has been checked): {exc.strerror or exc}"
        )


def _write_png(path: Path, encoded: bytes) -> None:
    # not synced one by one (a run of many small files would wait on the disk for each): after a power cut,
    # --resume finds and rewrites any file the disk did not keep whole
    with atomic_file(path, durable=False) as f:
        f.write(encoded)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


IN_MEMORY_FORMATS = " (npz and grid hold every digit, png and idx stream them)"  # a refusal's advice


def collect(batches: Iterable[GeneratedDigits], num: int, on_batch: OnBatch = lambda n: None) -> GeneratedDigits:
    """The ``num`` digits of ``batches`` in two arrays; ``on_batch`` after each batch (it may raise to stop).
    :class:`MemoryError` if they cannot be held."""
    return fill_digits(batches, *empty_digits(num, IN_MEMORY_FORMATS), on_batch)


def _write_grid(
    batches: Iterable[GeneratedDigits], paths: list[Path], num: int, publishing: Publishing, on_batch: OnBatch
) -> None:
    with publishing.files(paths[:1]) as (f,):
        f.write(grid_png_bytes(collect(batches, num, on_batch).images))


def _write_npz(
    batches: Iterable[GeneratedDigits],
    paths: list[Path],
    num: int,
    publishing: Publishing,
    on_batch: OnBatch,
    extras: Sequence[bytes] = (),
) -> None:
    """The NPZ file, then ``extras`` (the shard's run record) in the files after it, all published together."""
    with publishing.files(paths) as files:  # claimed first: a second run is refused at once
        digits = collect(batches, num, on_batch)
        files[0].write(npz_bytes(digits.images, digits.labels))
        for f, data in zip(files[1:], extras, strict=True):
            f.write(data)


def _write_idx(
    batches: Iterable[GeneratedDigits],
    paths: Sequence[Path],
    num: int,
    publishing: Publishing,
    on_batch: OnBatch,
    extras: Sequence[bytes] = (),
) -> None:
    """MNIST IDX pair (big-endian headers: magic and count, and the images' rows and cols), streamed batch by batch."""
    _write_idx_splits(batches, paths, [num], publishing, on_batch, extras)


def _write_idx_splits(
    batches: Iterable[GeneratedDigits],
    paths: Sequence[Path],
    sizes: Sequence[int],
    publishing: Publishing,
    on_batch: OnBatch,
    extras: Sequence[bytes] = (),
) -> None:
    """One IDX pair (images, labels) per split of ``sizes`` consecutive digits, then ``extras`` in the files after
    them, all published together (see :class:`Publishing`)."""
    with publishing.files(paths) as files:
        for f, data in zip(files[2 * len(sizes) :], extras, strict=True):
            f.write(data)
        pairs = [files[i : i + 2] for i in range(0, 2 * len(sizes), 2)]
        for (images_f, labels_f), size in zip(pairs, sizes, strict=True):
            images_f.write(idx_header(size, images=True))
            labels_f.write(idx_header(size, images=False))
        batches = iter(batches)
        first = next(batches)  # a request holds at least one digit
        cuts = list(itertools.accumulate(sizes[:-1], initial=int(first.start)))[1:]  # any integer type of start
        for batch in _cut_at(itertools.chain([first], batches), cuts):
            images_f, labels_f = pairs[bisect.bisect_right(cuts, batch.start)]
            image_records, label_records = idx_records(batch.images, batch.labels)
            images_f.write(image_records)
            labels_f.write(label_records)
            on_batch(len(batch.labels))


def _cut_at(batches: Iterable[GeneratedDigits], cuts: Sequence[int]) -> Iterator[GeneratedDigits]:
    """The same digits, with any batch that straddles a cut (a global index) split there."""
    for batch in batches:
        for cut in cuts:
            k = cut - int(batch.start)  # a uint64 start would wrap below the cut
            if 0 < k < len(batch.labels):
                yield GeneratedDigits(batch.images[:k], batch.labels[:k], batch.start)
                batch = GeneratedDigits(batch.images[k:], batch.labels[k:], cut)
        yield batch


@dataclass(frozen=True)
class WrittenFiles:
    """What a generation job wrote (:meth:`OutputPlan.write`): its files, and how many of an earlier run it kept."""

    paths: list[Path]  # the files written; for png, the output directory
    kept: int  # files of an earlier run kept as they were (resume only)
    files: int  # the files this request's output is made of, the kept ones included

    @property
    def written(self) -> int:
        """Files this run wrote (all of them, unless it resumed)."""
        return self.files - self.kept


@dataclass(frozen=True)
class OutputPlan:
    """A checked request: where its digits go and which existing files it may replace.

    Made by :func:`plan_output` before any digit is generated, so every refusal comes first.
    """

    out_dir: Path
    fmt: str
    total: int  # digits of the whole (unsharded) request; for mnist, of the train split
    shard: Shard
    test_count: int  # mnist only: digits total .. total+test_count-1 form the test split
    resume: bool
    existing: tuple[Path, ...]  # outputs already there, which the run may replace
    created: tuple[Path, ...] = ()  # the folders the plan created, removed again if the run fails with them empty
    record: bytes | None = None  # a sharded IDX or NPZ run's record, written beside its part
    overwrite: bool = False  # with resume: files of other digits in the way are replaced, not refused

    @property
    def start(self) -> int:
        """Global index of the first digit this run writes."""
        return self.shard.bounds(self.total)[0]

    @property
    def count(self) -> int:
        """How many digits this run writes."""
        return self.shard.size(self.total) + self.test_count

    @property
    def refuses_other_runs(self) -> bool:
        """Whether another run's complete files in the way are refused (``resume`` alone), not replaced."""
        return self.resume and not self.overwrite

    @property
    def recorded(self) -> bool:
        """Whether this run writes a record beside its part."""
        return self.record is not None and is_recorded(self.fmt, self.shard)

    def write(
        self,
        batches: Iterable[GeneratedDigits | KeptDigits],
        on_batch: OnBatch = lambda n: None,
        identity: bytes | None = None,
    ) -> WrittenFiles:
        """Write the digits ``start .. start+count-1``, streamed from ``batches`` in order. ``identity``: that of
        the run making them (:func:`~digitgen.runtime.png_journal.run_identity`), whose PNG files are journaled."""
        try:
            return self._write(batches, on_batch, identity)
        except BaseException:
            remove_if_empty(self.created)
            raise

    def _write(
        self, batches: Iterable[GeneratedDigits | KeptDigits], on_batch: OnBatch, identity: bytes | None
    ) -> WrittenFiles:
        png = self.fmt == "png"
        with claim_indices(self.out_dir, *_png_indices(self.shard, self.total)) if png else nullcontext():
            if self.out_dir.is_dir():  # a killed run's, of any label: none is left beside this run's digits
                for tmp in leftover_temporaries(self.out_dir, self.fmt, self.shard, self.total, self.recorded):
                    remove_leftover(tmp)
            batches = _checked(batches, self.start, self.start + self.count)
            if png:
                journal = Journal(journal_path(self.out_dir, self.shard), identity)
                try:
                    kept = _write_pngs(
                        batches, self.out_dir, self.existing, self.resume, self.refuses_other_runs, on_batch, journal
                    )
                # refused: the files it added are gone, and so goes a journal it began
                except (InvalidRequestError, OtherRunError):
                    journal.close(remove=journal.begun)
                    raise
                except BaseException:  # interrupted, or a failure: kept for --resume
                    journal.close(remove=False)
                    raise
                journal.close(remove=True)  # done: an earlier run's journal too, whose files this run checked
                if self.shard.count == 1:
                    remove_shard_journals(self.out_dir)
                return WrittenFiles([self.out_dir], kept, self.count)
        paths = [self.out_dir / name for name in output_names(self.fmt, self.shard, self.recorded)]
        before = {path: path.lstat() for path in self.existing}  # a dangling link is an existing file too
        publishing = Publishing(resume_check(self.resume, self.overwrite), self.existing)
        if self.fmt == "mnist":
            with new_folders(paths[0].parent):
                _write_idx_splits(batches, paths, [self.total, self.test_count], publishing, on_batch)
        elif self.fmt == "grid":
            _write_grid(batches, paths, self.count, publishing, on_batch)
        else:
            writer = _write_npz if self.fmt == "npz" else _write_idx
            writer(batches, paths, self.count, publishing, on_batch, [self.record] if self.recorded else [])
        return WrittenFiles(paths, sum(_unchanged(path, stat) for path, stat in before.items()), len(paths))


def _unchanged(path: Path, before: os.stat_result) -> bool:
    after = path.lstat()
    return (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def plan_output(
    out_dir: str | Path,
    fmt: str,
    total: Whole,
    *,
    shard: Shard = WHOLE,
    overwrite: bool = False,
    resume: bool = False,
    test_count: Whole | None = None,
    record: bytes | None = None,
) -> OutputPlan:
    """Check a request for ``shard`` of ``total`` digits as ``fmt`` in ``out_dir``; raise before writing anything.
    ``record``: the run's record, written beside a shard of IDX or NPZ (:mod:`~digitgen.runtime.run_record`).

    Existing outputs are refused unless ``overwrite`` (replace them) or ``resume`` (keep those that
    already hold exactly what this request writes, replace damaged ones, refuse another run's); both together
    continue an interrupted overwrite: keep what is exactly this request's, replace everything else.
    ``fmt="mnist"`` writes a torchvision root: ``MNIST/raw/`` with the train split (digits ``0 .. total-1``) and
    the test split (the next ``test_count`` digits, 10,000 unless given; no digit is in both).
    """
    if fmt not in FORMATS:
        raise InvalidRequestError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    total = check_int(total, "number of digits", maximum=MAX_INDEX + 1)
    check_flag(overwrite, "overwrite")
    check_flag(resume, "resume")
    shard = Shard.checked(shard, total)
    if fmt == "mnist":
        test_count = DEFAULT_TEST_COUNT if test_count is None else check_int(test_count, "the test split's count")
        if shard.count > 1:
            raise InvalidRequestError(
                "the mnist format writes one dataset root and is not sharded; shard the idx format"
            )
    elif test_count is not None:
        raise InvalidRequestError("a test split (--test-count, test_count) is written by the mnist format only")
    start, stop = shard.bounds(total)
    if fmt == "grid" and shard.count > 1:
        raise InvalidRequestError("the grid format writes one contact sheet and is not sharded; shard png, npz or idx")
    if fmt == "grid":
        check_grid_count(stop - start, "png, npz, idx or mnist")
    if fmt in ("idx", "mnist"):  # the whole request's: its shards merge into one file
        check_idx_count(max(total, test_count or 0))
    if fmt in ("npz", "grid"):
        # address space, not memory touched: a count that can never be held stops here
        empty_digits(stop - start, IN_MEMORY_FORMATS)
    created: list[Path] = []
    try:
        with interrupts_held():  # a folder made is a folder noted, removed again if the run goes no further
            out_dir, created = prepare_output_dir(out_dir)
        plan = OutputPlan(out_dir, fmt, total, shard, test_count or 0, resume, (), tuple(created), record, overwrite)
        plan = _with_existing(plan)
    except BaseException:
        remove_if_empty(created)
        raise
    return plan


def _remove_an_orphan_record(out_dir: Path, fmt: str, shard: Shard) -> None:
    """Remove the run record of a shard whose parts are gone (deleted once merged, say): it describes nothing now,
    and would stand in the way of the next run of that shard. A file of that name that is no record is someone's,
    and stays for the checks of any other file in the way."""
    record = out_dir / record_name(fmt, shard)
    if any(os.path.lexists(out_dir / name) for name in output_names(fmt, shard)) or not record.is_file():
        return
    if record.stat().st_size <= MAX_RECORD_BYTES and is_whole_record(record.read_bytes()):
        record.unlink()


def _with_existing(plan: OutputPlan) -> OutputPlan:
    """``plan`` with the outputs already in its folder, which it may replace; the checks of :func:`plan_output`
    that look into the folder: files other runs are writing now, and those this run would replace."""
    out_dir, fmt, shard, total = plan.out_dir, plan.fmt, plan.shard, plan.total
    if fmt == "mnist":
        for folder in (out_dir / MNIST_RAW).parent, out_dir / MNIST_RAW:
            if os.path.lexists(folder) and not folder.is_dir():
                raise OutputError(
                    f"{folder} is a file where the mnist format writes a folder; move it, or write elsewhere"
                )
    if fmt == "png":  # a run writing these files now is refused here, before any progress
        refuse_if_indices_claimed(out_dir, *_png_indices(shard, total))
    else:
        for name in output_names(fmt, shard, plan.recorded):
            refuse_if_claimed(temporary_name(out_dir / name))
    if plan.recorded:
        _remove_an_orphan_record(out_dir, fmt, shard)
    existing = existing_outputs(out_dir, fmt, shard, total, plan.recorded)
    refuse_existing(existing, plan.overwrite or plan.resume, resumable=fmt == "png")  # others leave no part
    if plan.overwrite and fmt == "png" and shard.count == 1:
        # a longer run's digits go too, so that the folder ends as this run's (a shard removes only its own)
        longer = pngs_in_range(out_dir, total, sys.maxsize)
        refuse_non_files(longer)
        existing += longer
    elif plan.refuses_other_runs and fmt == "png":
        refuse_a_longer_run(out_dir, total)
    return dataclasses.replace(plan, existing=tuple(existing))


def write_digits(
    batches: Iterable[GeneratedDigits],
    out_dir: str | Path,
    fmt: str,
    total: Whole,
    *,
    shard: Shard = WHOLE,
    overwrite: bool = False,
    resume: bool = False,
    test_count: Whole | None = None,
    on_batch: OnBatch = lambda n: None,
) -> list[Path]:
    """Write ``shard`` of a ``total``-digit request, streamed from ``batches``.

    ``batches`` must hold exactly the shard's digits, in order (as :meth:`DigitGenerator.iter_batches`
    yields them); for ``mnist``, the ``total`` train digits then the ``test_count`` test digits (default
    10,000). Anything else raises :class:`InvalidRequestError` and leaves no new file. Returns the files
    written; for ``png``, whose files are many, the output directory.
    """
    if not isinstance(batches, Iterable):
        raise InvalidRequestError(f"batches must be an iterable of GeneratedDigits, got {type(batches).__name__}")
    check_callable(on_batch, "on_batch")
    plan = plan_output(out_dir, fmt, total, shard=shard, overwrite=overwrite, resume=resume, test_count=test_count)
    return plan.write(batches, on_batch).paths


@dataclass(frozen=True)
class GenerationJob:
    """A checked ``digitgen generate`` request; :meth:`run` makes and writes the digits."""

    gen: DigitGenerator
    plan: OutputPlan
    request: Request  # checked and normalised once, by plan_generation: the label cycle, seed and truncation

    def discard(self) -> None:
        """Remove the output folders the plan created, where they are still empty: for a job stopped before it
        ran (:meth:`run` does so itself if it fails or is stopped)."""
        remove_if_empty(self.plan.created)

    def run(self, on_batch: OnBatch = lambda n: None) -> WrittenFiles:
        """Make the digits and write them as planned, ``on_batch`` told each batch's size (it may raise to stop)."""
        if self.plan.fmt != "png":
            return self.plan.write(self._made(self.plan.start, self.plan.count), on_batch)
        r = self.request
        versions = encoder_versions(self.gen.provider)  # with the model and the request: what shapes the bytes
        identity = run_identity(self.gen.sha256, versions, NOISE_SCHEME, r.digits, r.seed, r.truncation)
        return self.plan.write(self._png_batches(identity), on_batch, identity)

    def _made(self, start: int, count: int) -> Iterator[GeneratedDigits]:
        """The digits ``start .. start+count-1``, made by the model."""
        r = self.request
        return self.gen.iter_batches(count, r.digits, r.seed, r.batch_size, start, r.truncation)

    def _png_batches(self, identity: bytes) -> Iterator[GeneratedDigits | KeptDigits]:
        """The batches to write; resumed, those whose files an interrupted run recorded and still hold are kept
        as they are, their digits not made again (read once the run holds its indices)."""
        plan = self.plan
        recorded = recorded_files(journal_path(plan.out_dir, plan.shard), identity) if plan.resume else None
        if recorded is None:
            yield from self._made(plan.start, plan.count)
            return
        existing = _by_index(plan.existing)
        for lo in range(plan.start, plan.start + plan.count, self.request.batch_size):
            hi = min(lo + self.request.batch_size, plan.start + plan.count)
            kept = _kept_on_record(plan.out_dir, labels_for(self.request.digits, lo, hi), lo, recorded, existing)
            if kept is not None:
                yield kept
            else:
                yield from self._made(lo, hi - lo)


def _kept_on_record(
    out_dir: Path, labels: np.ndarray, start: int, recorded: RecordedFiles, existing: dict[int, list[Path]]
) -> KeptDigits | None:
    """The digits ``start ..`` of ``labels`` as kept, if each has its file alone at its index, holding the bytes
    whose digest an earlier run of this one recorded; ``None`` if any does not (the batch is made again)."""
    digests = recorded.digests_of(start, start + len(labels))
    for index, label in enumerate(labels.tolist(), start):
        path = out_dir / png_name(index, label)
        if existing.get(index) != [path] or not holds_recorded(path, digests.get(index)):
            return None
    return KeptDigits(start, labels, [digests[index] for index in range(start, start + len(labels))])


def plan_generation(
    gen: DigitGenerator,
    out_dir: str | Path,
    num: Whole,
    fmt: str = "png",
    *,
    digits: Classes | None = None,
    seed: Whole = 0,
    batch_size: Whole = DEFAULT_BATCH_SIZE,
    shard: Shard = WHOLE,
    overwrite: bool = False,
    resume: bool = False,
    truncation: Real | None = None,
    test_count: Whole | None = None,
) -> GenerationJob:
    """Check everything about a :func:`generate_files` request, generating nothing and writing no file."""
    if not isinstance(gen, DigitGenerator):
        raise InvalidRequestError(
            f"gen must be a DigitGenerator (DigitGenerator.from_path(...)), got {type(gen).__name__}"
        )
    request = gen.check_request(num, digits, seed, batch_size, truncation=truncation)
    shard = Shard.checked(shard, request.num)
    record = run_record(fmt, request.num, shard.count, request.digits, request.seed, request.truncation, gen.sha256)
    plan = None
    try:
        plan = plan_output(
            out_dir, fmt, num, shard=shard, overwrite=overwrite, resume=resume, test_count=test_count, record=record
        )
        job = GenerationJob(gen, plan, request)
        _refuse_other_runs(job, record)
    except BaseException:  # a refusal or a stop signal: no folder made for nothing
        if plan is not None:
            remove_if_empty(plan.created)
        raise
    return job


def _refuse_other_runs(job: GenerationJob, record: bytes) -> None:
    """The checks of :func:`plan_generation` that look at the files already in the job's way."""
    gen, plan, fmt = job.gen, job.plan, job.plan.fmt
    refuse_writing_over(gen.path, "--generator", plan.existing)
    if plan.refuses_other_runs and fmt == "png" and plan.existing:
        _refuse_another_runs_folder(gen, min(plan.existing, key=png_index), job.request)
    if plan.refuses_other_runs and fmt in ("idx", "npz", "mnist") and not plan.recorded and plan.existing:
        _refuse_another_runs_arrays(gen, plan, job.request)
    if plan.refuses_other_runs and plan.recorded:  # the shard's record says at once whether its parts are another run's
        path = plan.out_dir / record_name(fmt, plan.shard)
        if os.path.lexists(path) and not holds(path, record):
            refuse_other_digits(path)


def _first_digit(gen: DigitGenerator, request: Request, index: int) -> Iterator[GeneratedDigits]:
    """Digit ``index`` of ``request`` made again, alone: what tells a run's files from another's."""
    return gen.iter_batches(1, request.digits, request.seed, 1, start=index, truncation=request.truncation)


def _refuse_another_runs_folder(gen: DigitGenerator, first: Path, request: Request) -> None:
    """Make the digit of the folder's first PNG again, and refuse the folder now if that file is another run's: a
    resume with a mistyped option stops before any work (each file is checked again as it is reached)."""
    (digit,) = _first_digit(gen, request, png_index(first))
    if first.name != png_name(digit.start, int(digit.labels[0])) or not holds(first, png_bytes(digit.images[0])):
        refuse_other_digits(first)


def _refuse_another_runs_arrays(gen: DigitGenerator, plan: OutputPlan, request: Request) -> None:
    """Make the first digit of each split again, and refuse now an IDX or NPZ file already there that says it holds
    another count or begins with another digit: a resume with a mistyped option stops before any work, as for PNGs
    (each file is compared whole when the run has made its digits)."""
    splits = [(plan.start, plan.shard.size(plan.total))]
    if plan.fmt == "mnist":
        splits.append((plan.total, plan.test_count))
    names = output_names(plan.fmt, plan.shard)
    per_split = len(names) // len(splits)  # an NPZ file, or an IDX pair
    for at, (start, count) in enumerate(splits):
        (first,) = _first_digit(gen, request, start)
        for name in names[at * per_split : (at + 1) * per_split]:
            if not begins_with(plan.out_dir / name, count, first):
                refuse_other_digits(plan.out_dir / name, count)  # whole: refused; damaged: replaced as the run ends


def generate_files(
    gen: DigitGenerator,
    out_dir: str | Path,
    num: Whole,
    fmt: str = "png",
    *,
    digits: Classes | None = None,
    seed: Whole = 0,
    batch_size: Whole = DEFAULT_BATCH_SIZE,
    shard: Shard = WHOLE,
    overwrite: bool = False,
    resume: bool = False,
    truncation: Real | None = None,
    test_count: Whole | None = None,
    on_batch: OnBatch = lambda n: None,
) -> list[Path]:
    """What ``digitgen generate`` does: make ``shard`` of ``num`` digits with ``gen`` and write them as ``fmt``.

    ``resume`` continues an interrupted run: files that already hold exactly what this request
    writes are kept, a damaged one is replaced, missing ones are written; a complete file of other digits
    is another run's, and refused with :class:`OtherRunError` (with ``overwrite`` too, replaced: an interrupted
    overwrite, continued). Returns the files written (for ``png``, the output directory).
    """
    check_callable(on_batch, "on_batch")
    job = plan_generation(
        gen,
        out_dir,
        num,
        fmt,
        digits=digits,
        seed=seed,
        batch_size=batch_size,
        shard=shard,
        overwrite=overwrite,
        resume=resume,
        truncation=truncation,
        test_count=test_count,
    )
    return job.run(on_batch).paths
