"""Files appear complete or not at all, and nothing is replaced without permission."""

from __future__ import annotations

import errno
import filecmp
import os
import stat
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from digitgen.runtime.errors import OutputError
from digitgen.runtime.generator import check_path
from digitgen.runtime.signals import interrupts_held

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def temporary_name(path: Path) -> Path:
    """Where :func:`publish` writes ``path`` before renaming it: a hidden sibling."""
    return path.with_name(f".{path.name}.part")


# O_NOFOLLOW, O_NONBLOCK: a link or a pipe under a name this program opens in an output folder is opened as itself,
# at once, never written through or waited on (under a temporary file's name it is refused: _open_regular);
# O_BINARY: on Windows a descriptor opened without it writes each \n as \r\n
AS_ITSELF = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
_OPEN_TO_WRITE = os.O_WRONLY | os.O_CREAT | AS_ITSELF | getattr(os, "O_BINARY", 0)


def locking_available() -> bool:
    """Whether this system has the ``flock`` locks the claims here use (Windows has not: nothing is locked)."""
    return fcntl is not None


def try_flock(fd: int, *, shared: bool = False) -> bool:
    """Lock ``fd`` for this process without waiting; ``False`` if another process holds a lock that excludes
    this one (``True`` where there are no locks)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def held_elsewhere(path: Path) -> bool:
    """Whether another process holds ``path`` under an exclusive lock now. The look takes a shared lock, so that
    processes looking at once do not see each other; a path this process cannot open is not held."""
    try:
        fd = os.open(path, os.O_RDONLY | AS_ITSELF)
    except OSError:
        return False
    try:
        return not try_flock(fd, shared=True)
    finally:
        os.close(fd)


def _written_elsewhere(tmp: Path) -> OutputError:
    path = tmp.with_name(tmp.name.removeprefix(".").removesuffix(".part"))
    return OutputError(
        f"another process is writing {path} now (its temporary file {tmp.name} is in use); "
        "let it finish, or write elsewhere"
    )


def appeared_meanwhile(path: Path, folder: Path) -> OutputError:
    """The refusal of a file that was not there when the run was checked, found while it writes."""
    return OutputError(
        f"{path} appeared while this run was writing: another process is writing to {folder}; "
        "let it finish, or write elsewhere"
    )


def refuse_if_claimed(tmp: Path) -> None:
    """Refuse now, before any work, if another process holds ``tmp`` (see :func:`claim_temporary`)."""
    if held_elsewhere(tmp):
        raise _written_elsewhere(tmp)


def still_named(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file ``fd`` is open on (its last holder may have renamed or removed it
    between this process opening it and locking it)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)


def open_locked(
    path: Path, lock: Callable[[int], bool], cannot_open: Callable[[OSError], Exception], mode: int = 0o666
) -> int | None:
    """A descriptor of ``path``, made if need be, that ``lock(fd)`` has locked; ``None`` where it could not (another
    holds the lock). Opened again where the holder that let go last removed the file between this process opening it
    and locking it, so that no two processes hold locks of two files of one name. ``cannot_open(error)``: what to
    raise where it cannot be opened."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | AS_ITSELF, mode)
        except OSError as exc:
            raise cannot_open(exc) from exc
        try:
            if not lock(fd):
                os.close(fd)
                return None
            if still_named(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # removed by the holder that let go last: open the name again


def claim_temporary(tmp: Path) -> int:
    """Open ``tmp`` (a :func:`temporary_name`) empty for writing, locked so that no other process can claim it
    while this one writes it: a second run writing the same file is refused rather than interleaved with the
    first. Returns the descriptor, which holds the lock until it is closed (a killed process's lock goes with
    it). Without ``fcntl`` (Windows) the file is not locked."""
    while True:
        fd = _open_regular(tmp)
        try:
            if not try_flock(fd):
                raise _written_elsewhere(tmp)
            current = still_named(fd, tmp)
            if current and os.fstat(fd).st_size:  # a killed run's leftover (truncating an empty file costs as much)
                os.ftruncate(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        if current:
            return fd
        os.close(fd)  # a file already published or removed: open the name again


def _open_regular(tmp: Path) -> int:
    """``tmp`` opened to write, created if absent; :class:`OutputError` if something other than a regular file
    has its name (a link, whose target is not this run's to empty, or a pipe, which would never be written)."""
    try:
        fd = os.open(tmp, _OPEN_TO_WRITE, 0o666)
    except OSError:
        if not _regular(tmp, os.lstat):
            raise _not_a_file(tmp) from None
        raise
    if not _regular(fd, os.fstat):
        os.close(fd)
        raise _not_a_file(tmp)
    return fd


def _regular(what: Path | int, look: Callable[[Path | int], os.stat_result]) -> bool:
    """Whether ``what`` (a path, not followed, or a descriptor) is a regular file; a path gone counts as one."""
    try:
        return stat.S_ISREG(look(what).st_mode)
    except FileNotFoundError:
        return True


def _not_a_file(tmp: Path) -> OutputError:
    return OutputError(
        f"{tmp} is not a file a run left (a link, a pipe or a device has a temporary file's name); "
        "remove it, or write elsewhere"
    )


def check_writable(path: str | Path) -> None:
    """Refuse now, with :class:`OutputError`, a file that could not be written (a folder without permission, a
    read-only file system), before work whose result it would hold: its temporary file is made, then removed."""
    try:
        remove_leftover(temporary_name(Path(path)))
    except OSError as exc:
        if exc.errno is None:  # the project's own error (another process writes it now): already worded
            raise
        raise OutputError(f"cannot write {path}: {exc.strerror}") from exc


def remove_leftover(tmp: Path) -> None:
    """Remove ``tmp``, a temporary file left by a killed run; refuse one that a running process holds. It is
    removed while this process holds it, so no run can claim the name in between; with stop signals held, so
    that none leaves it behind (:func:`check_writable` makes one)."""
    with interrupts_held():
        fd = claim_temporary(tmp)
        if fcntl is None:  # Windows removes no open file (and there is no lock to hold)
            os.close(fd)
            tmp.unlink(missing_ok=True)
            return
        try:
            tmp.unlink(missing_ok=True)
        finally:
            os.close(fd)


@contextmanager
def _published(
    paths: Sequence[str | Path],
    resume: Callable[[Path], None] | None,
    durable: bool,
    replaceable: Collection[Path] | None = None,
) -> Iterator[list[tuple[Path, int]]]:
    """:func:`atomic_files`, yielding each temporary file with the descriptor that claims it."""
    paths = [Path(path) for path in paths]
    temps = [temporary_name(path) for path in paths]
    failing: Sequence[Path] = paths
    claimed: list[tuple[Path, int]] = []  # only these temporary files are this call's to remove
    still_open: list[int] = []
    renamed: set[Path] = set()  # published, no longer this call's to remove
    try:
        for tmp, path in zip(temps, paths, strict=True):
            failing = [path]
            with interrupts_held():  # a file claimed is a file noted, to be removed or renamed
                fd = claim_temporary(tmp)
                claimed.append((tmp, fd))
                still_open.append(fd)
        failing = paths
        yield claimed
        if durable:  # on the disk before a rename can make it the file's content
            for _tmp, fd in claimed:
                os.fsync(fd)
        if fcntl is None:  # Windows renames no open file
            _close_all(still_open)
        changed = [
            (tmp, path)
            for tmp, path in zip(temps, paths, strict=True)
            if not (resume and path.is_file() and filecmp.cmp(tmp, path, shallow=False))
        ]
        if replaceable is not None:
            for _tmp, path in changed:
                if path not in replaceable and os.path.lexists(path):  # not there when the run was checked
                    raise appeared_meanwhile(path, path.parent)
        if resume:
            for _tmp, path in changed:
                if path.is_file():
                    resume(path)
        with interrupts_held():  # each file renamed is a file noted, and a pair is renamed whole
            for tmp, path in changed:
                failing = [path]
                os.replace(tmp, path)
                renamed.add(tmp)
        if durable and changed:
            for folder in {path.parent for _tmp, path in changed}:
                _sync_folder(folder)
    except OSError as exc:
        if exc.errno is None:  # one of the project's own errors, raised in the block: already worded
            raise
        raise OutputError(f"cannot write {', '.join(map(str, failing))}: {exc.strerror}") from exc
    finally:
        if fcntl is None:
            _close_all(still_open)
        for tmp, _fd in claimed:
            if tmp not in renamed:  # removed while still held (on Windows: closed first)
                with suppress(OSError):
                    tmp.unlink(missing_ok=True)
        _close_all(still_open)


def _sync_folder(folder: Path) -> None:
    """Put ``folder``'s entries on the disk (its renames), where a folder can be opened for that (not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with suppress(OSError):  # some file systems cannot sync a folder: the renames stand as they keep them
            os.fsync(fd)
    finally:
        os.close(fd)


def _close_all(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


@contextmanager
def publish_all(paths: Sequence[str | Path], replaceable: Collection[Path] | None = None) -> Iterator[list[Path]]:
    """Yield a temporary sibling of each of ``paths`` to write: :func:`atomic_files`, durable, for a writer that
    opens the files itself."""
    with _published(paths, None, True, replaceable) as claimed:
        yield [tmp for tmp, _fd in claimed]


@contextmanager
def publish(path: str | Path) -> Iterator[Path]:
    """:func:`publish_all` of one file: yield its temporary sibling to write."""
    with publish_all([path]) as (tmp,):
        yield tmp


@contextmanager
def atomic_file(
    path: str | Path,
    resume: Callable[[Path], None] | None = None,
    *,
    durable: bool = True,
    replaceable: Collection[Path] | None = None,
) -> Iterator[BinaryIO]:
    """:func:`atomic_files` of one file."""
    with atomic_files([path], resume, durable=durable, replaceable=replaceable) as (f,):
        yield f


@contextmanager
def atomic_files(
    paths: Sequence[str | Path],
    resume: Callable[[Path], None] | None = None,
    *,
    durable: bool = True,
    replaceable: Collection[Path] | None = None,
) -> Iterator[list[BinaryIO]]:
    """Open a temporary sibling of each of ``paths`` for binary writing (closed before the renames); rename them
    onto ``paths`` only if the block succeeds, all together: an interrupt (a stop signal, which waits for the
    renames) leaves all the old files or all the new ones. With ``durable``, the files are on the disk before they
    are renamed, and the renames after, so that a power cut leaves each path's old file or its new one, never an
    empty or a partial file under a path's name. A kill that cannot be caught (SIGKILL, a power cut) between two
    renames, a matter of microseconds, leaves some paths new and some old: ``--overwrite --resume`` mends that.

    With ``resume`` (a check of an existing file), an existing path that already holds exactly the new bytes
    is left untouched (same file, same modification time), and ``resume`` is called with each existing path
    that holds other bytes: it may raise to refuse them all. The files are compared first, then renamed one
    after another with Ctrl-C, SIGTERM and SIGHUP held back. Writing or renaming that fails (a full disk, a folder in
    the way) raises :class:`OutputError`; a rename that fails stops there.

    Each temporary file is claimed first (:func:`claim_temporary`): another process writing the same file
    now is refused with :class:`OutputError`. With ``replaceable`` (the paths that were there when the run was
    checked), a path that has appeared since is refused too, before any rename: another process wrote it meanwhile.
    """
    with _published(paths, resume, durable, replaceable) as claimed, ExitStack() as opened:
        yield [opened.enter_context(os.fdopen(fd, "wb", closefd=False)) for _tmp, fd in claimed]


def refuse_one_file_twice(files: dict[str, str | Path | None]) -> None:
    """Raise :class:`OutputError` if two of ``files`` (option name -> path, ``None`` for not given) are one file:
    one output would overwrite the other, or the input it is made from."""
    seen: dict[Path, str] = {}
    for option, path in files.items():
        if path is None:
            continue
        resolved = Path(os.path.realpath(path))  # Path.resolve raises RuntimeError on a loop of links
        if resolved in seen:
            raise OutputError(f"{seen[resolved]} and {option} name the same file ({path}); give each its own")
        seen[resolved] = option


def refuse_writing_over(source: str | Path, option: str, outputs: Iterable[Path]) -> None:
    """Raise :class:`OutputError` if one of ``outputs``, files a run writes or replaces, is the file ``source`` it
    reads (``option`` names it): the run would replace its own input."""
    target = Path(os.path.realpath(source))
    parents: dict[Path, Path] = {}
    for path in outputs:
        if path.name == target.name:  # the folder's real path only then: a run may replace a million files
            real_parent = parents.setdefault(path.parent, Path(os.path.realpath(path.parent)))
            if real_parent == target.parent:
                raise OutputError(f"{path} is the file {option} names, which this run reads; write elsewhere")


def readable_file(path: Path) -> bool:
    """Whether ``path`` is, or links to, a regular file: one that reading cannot hang on (a pipe) or never end
    (a device)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def refuse_non_files(paths: Iterable[str | Path]) -> None:
    """Raise :class:`OutputError` if any of ``paths`` is a folder, a pipe, a device or a socket, which no run
    writes and none replaces, not even with --overwrite or --resume: a folder, only found when renaming, would stop
    a run after its work, or between the files of a pair; the others would be lost to the rename (``/dev/null``
    made a file). A link to a file, or to nothing, is replaced, never what it points to; a link to any of the
    others is refused as they are (``/dev/stdout`` is a link to the process's output, and ``--overwrite`` must not
    make it a file)."""
    for path in paths:
        try:
            mode = os.lstat(path).st_mode
        except OSError:  # not there (or not to be looked at): nothing to lose
            continue
        links = ""
        if stat.S_ISLNK(mode):
            try:
                mode, links = os.stat(path).st_mode, "links to"
            except OSError:  # a link to nothing (or a loop of links): replaced
                continue
        if stat.S_ISDIR(mode):
            raise OutputError(f"{path} {links or 'is'} a folder, not a file; move it, or name another file")
        if not stat.S_ISREG(mode):
            kind = "a pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
            raise OutputError(f"{path} {links or 'is'} {kind}, not a file, and no run replaces it; name another file")


def refuse_existing(paths: Iterable[str | Path | None], overwrite: bool, resumable: bool = False) -> tuple[Path, ...]:
    """Raise :class:`OutputError` if any of ``paths`` exists and ``overwrite`` is not set, or is not a file
    (:func:`refuse_non_files`); ``resumable``: the refusal offers ``--resume`` too (files an interrupted run
    leaves, which the same command continues). Returns the paths that exist: the ones ``overwrite`` replaces (the
    ``replaceable`` of :func:`atomic_files`)."""
    paths = list(paths)
    refuse_non_files(p for p in paths if p is not None)
    clashes = [Path(p) for p in paths if p is not None and os.path.lexists(p)]  # a dangling link is a file too
    if clashes and not overwrite:
        if len(clashes) == 1:
            named, them = f"{clashes[0]} already exists", "it"
        else:
            named, them = f"{clashes[0]} and {len(clashes) - 1:,} more already exist", "them"
        resume = "--resume to continue an interrupted run of this command, or " if resumable else ""
        raise OutputError(f"{named}; pass {resume}--overwrite to replace {them}")
    return tuple(clashes)


def folder_problem(folder: Path) -> str | None:
    """Why ``folder`` can be neither used nor made as a folder, in words that follow its name ("is a file, not a
    directory", "lies under P, which is a file", a link to nothing or a loop of links); ``None`` if nothing is in
    its way."""
    try:
        for parent in [folder, *folder.parents]:
            where = "is" if parent == folder else f"lies under {parent}, which is"
            if os.path.islink(parent) and not parent.exists():
                return f"{where} {_broken_link(parent)}"
            if parent.exists() and not parent.is_dir():
                return f"{where} a file" if parent != folder else "is a file, not a directory"
    except OSError as exc:  # a name too long, a folder that cannot be searched
        return f"cannot be looked at: {exc.strerror or exc}"
    return None


def _broken_link(link: Path) -> str:
    """A link that leads to no file, described: to a missing one, or in a loop of links."""
    try:
        os.stat(link)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"a link in a loop of links ({link} -> {os.readlink(link)} -> ...): name another folder"
    return f"a link to {os.readlink(link)}, which does not exist: create it, or name another folder"


def prepare_output_dir(out_dir: str | Path) -> tuple[Path, list[Path]]:
    """Create ``out_dir`` (and parents) or explain in one line why it cannot be used; returns it and the folders
    this created (deepest first)."""
    if str(out_dir) == "":  # Path("") is the current folder, unsaid
        raise OutputError("the output directory is an empty path; name a folder (. for the current folder)")
    out_dir = check_path(out_dir, "the output directory")
    problem = folder_problem(out_dir)
    if problem is not None:
        raise OutputError(f"output directory {out_dir} {problem}")
    try:
        created = make_folders(out_dir)
    except OSError as exc:
        raise OutputError(f"cannot create output directory {out_dir}: {exc.strerror or exc}") from exc
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {out_dir} is not writable")
    if not os.access(out_dir, os.R_OK):  # its listing tells what a run would replace or resume
        raise OutputError(f"output directory {out_dir} is not readable")
    return out_dir, created


def make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones this made, deepest first (only those: ``new/../mine``
    makes ``new``, not ``mine``, which is there already)."""
    made = []
    for path in reversed([folder, *folder.parents]):
        try:
            os.mkdir(path)
        except FileExistsError:  # there already (a file in the way is refused by the caller)
            continue
        made.append(path)
    return made[::-1]


def remove_if_empty(folders: Iterable[Path]) -> None:
    """Remove ``folders`` (deepest first) that are empty: a failed run leaves none that it created for nothing."""
    for path in folders:
        with suppress(OSError):  # not empty: something was put there (files this run completed, or another's)
            path.rmdir()


@contextmanager
def new_folders(folder: Path) -> Iterator[None]:
    """Create ``folder`` and its missing parents; remove those it created if the block fails."""
    created = make_folders(folder)
    try:
        yield
    except BaseException:
        remove_if_empty(created)
        raise
