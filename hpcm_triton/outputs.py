"""Writing output files safely: never over an input, only ever over a regular file and only when
asked, never a partial file, and with the permissions the user's umask gives (not mkstemp's 0600).

Every command that writes a file goes through :func:`check_output` before any work and
:func:`atomic_write` for the write itself:

* :func:`check_output` refuses, in one line: an output that is an input (also through a link),
  a directory, a device, FIFO or socket (even with ``--force``), a symlink loop, an existing
  file without ``--force``, a folder that does not exist or cannot be written, and an unknown
  suffix where the format comes from it;
* :func:`atomic_write` writes a temporary file beside the output (``.NAME.XXXXXXXX`` +
  :data:`TMP_SUFFIX`) and then, with ``exclusive``, links it into place, so that a file that
  appeared at the output path while the command ran is never replaced; without it, renames it
  over the output, refusing anything but a regular file there. Its temporary files are removed
  on every exit that runs Python (errors, and the interrupt handlers through
  :func:`remove_pending`); ones that a kill left behind are removed by the next write into the
  same folder once they are a day old (:func:`remove_stale`).
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

# The ending of this project's temporary output files, and the age after which one found beside
# an output is taken for the leftover of a killed process and removed.
TMP_SUFFIX = ".hpcm-triton.tmp"
STALE_SECONDS = 24 * 3600


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _kind(mode: int) -> str | None:
    """The kind of a file that is not a regular file, in words; None for a regular file."""
    for test, name in ((stat.S_ISREG, None), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def input_kind(path: str | os.PathLike) -> str | None:
    """What is wrong with ``path`` as an input file, in words (``"no such file"``, ``"is a FIFO"``,
    ``"is a directory"``, …), or None for a readable regular file (or a link to one)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "no such file" + (" (a link to a missing file)" if os.path.islink(path) else "")
    except OSError as e:
        return "is a symlink loop" if e.errno == errno.ELOOP else f"cannot be read ({e.strerror})"
    kind = _kind(st.st_mode)
    return None if kind is None else f"is {kind}"


def _existing(p: Path, shown) -> str | None:
    """The kind of what is at the output path ``p`` ("file", "link" to a file or to nothing), or
    None if nothing is. Raises ValueError for what is never replaced: a directory, a device, a
    FIFO, a socket, a symlink loop."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return "link"
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ValueError(f"{shown}: is a symlink loop; refusing to write through it") from None
            raise
    kind = _kind(st.st_mode)
    if kind is not None:
        raise ValueError(f"{shown}: is {kind}; only a regular file is ever replaced, even with --force")
    return "file"


def _unwritable(folder: Path) -> str | None:
    """Why no file can be created in ``folder``, or None. For root, whom permissions do not
    stop, a folder without any write permission counts as read-only (as a file without any
    execute permission does not run)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "it is not writable"
    if hasattr(os, "geteuid") and os.geteuid() == 0 and not os.stat(folder).st_mode & 0o222:
        return f"it is read-only (mode {stat.S_IMODE(os.stat(folder).st_mode):04o})"
    return None


def check_output(path: str | os.PathLike, *, force: bool = False, inputs: Iterable[str | os.PathLike] = (),
                 suffixes: Iterable[str] | None = None) -> Path:
    """Validate an output path before any work is done.

    Raises ``FileExistsError`` if something exists at ``path`` and ``force`` is false, and
    ``ValueError`` even with ``force`` if ``path`` is one of ``inputs`` (same path, or the same
    file through a link), is not a regular file (directory, device, FIFO, socket, symlink
    loop), is ``-`` (standard output), has a suffix not in ``suffixes`` (when given), or if its
    folder does not exist or cannot be written.
    """
    p = Path(path)
    for i in inputs:
        i = Path(i)
        if os.path.realpath(p) == os.path.realpath(i) or _same_file(p, i):
            raise ValueError(f"{path}: the output is the input file {i}; refusing to overwrite it")
    if str(path) == "-":
        raise ValueError("-: writing to standard output is not supported; name an output file")
    if suffixes is not None:
        suffixes = tuple(suffixes)
        if p.suffix.lower() not in suffixes:
            what = f"unknown image suffix {p.suffix!r}" if p.suffix else "no image suffix"
            raise ValueError(f"{path}: {what}; name the file with one of " + ", ".join(suffixes))
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{path}: output directory {parent} does not exist")
    kind = _existing(p, path)
    if kind is not None and not force:
        raise FileExistsError(f"{path}: already exists{' (a symbolic link)' if kind == 'link' else ''} "
                              "(pass --force to overwrite)")
    why = _unwritable(parent)
    if why:
        raise ValueError(f"{path}: cannot write in {parent}: {why}")
    return p


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM as an exception, where a command handles interrupts itself (a training
    run saves a checkpoint first). The command line exits with 128 + ``signum`` and one line,
    ``interrupted`` and the message if there is one."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = signum


def check_output_folder(path: str | os.PathLike) -> Path:
    """Validate, before any work, a folder a command will write files in (making it if needed):
    ValueError if it, or where it does not exist the nearest folder above it, is not a
    directory or cannot be written."""
    p = Path(path)
    near = p
    while not os.path.lexists(near):  # ends at "." or "/"
        near = near.parent
    if not near.is_dir():
        raise ValueError(f"{path}: exists and is not a directory" if near == p else f"{path}: {near} is not a directory")
    why = _unwritable(near)
    if why:
        raise ValueError(f"{path}: cannot write in {near}: {why}")
    return p


# Temporary files and folders being written right now: removed by remove_pending() when an
# interrupt ends the process before their writer could clean up (the CLI's signal handler).
_PENDING: set = set()


def track(path: str | os.PathLike) -> None:
    """Register a temporary file or folder to be removed if the process is interrupted."""
    _PENDING.add(str(path))


def untrack(path: str | os.PathLike) -> None:
    _PENDING.discard(str(path))


def remove_pending() -> None:
    """Remove every tracked temporary file or folder (best effort; for interrupt handlers)."""
    import shutil

    for p in list(_PENDING):
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
        except OSError:
            pass
        _PENDING.discard(p)


@contextlib.contextmanager
def temporary_folder(prefix: str):
    """A fresh private temporary folder for the block: removed after it, and by
    :func:`remove_pending` if an interrupt ends the process first."""
    import shutil

    path = tempfile.mkdtemp(prefix=prefix)
    track(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        untrack(path)


def remove_stale(folder: str | os.PathLike, older_than: float = STALE_SECONDS) -> list[str]:
    """Remove this project's temporary files (hidden, ending in :data:`TMP_SUFFIX`, regular,
    owned by this user) older than ``older_than`` seconds from ``folder``: the leftovers of a
    process killed while it wrote (SIGKILL runs no handler). Returns the names removed."""
    removed, limit = [], time.time() - older_than
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not (e.name.startswith(".") and e.name.endswith(TMP_SUFFIX)):
            continue
        try:
            st = e.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and (uid is None or st.st_uid == uid) and st.st_mtime < limit:
                os.unlink(e.path)
                removed.append(e.name)
        except OSError:
            pass
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _link_exclusively(tmp: str, path: Path) -> None:
    """Put the finished ``tmp`` at ``path``, which must not exist: a hard link (atomic, fails if
    anything is there), or where the file system has no hard links, a copy into a file created
    with O_EXCL."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
            raise
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with open(tmp, "rb") as src, os.fdopen(fd, "wb") as dst:
            fd = None
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
    except BaseException:
        if fd is not None:
            os.close(fd)
        os.unlink(path)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, exclusive: bool = False) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then put it at ``path``:
    readers see the old file or the whole new one, never a partial one. The file gets
    ``0666 & ~umask`` like a file opened with ``open(path, "w")``.

    ``exclusive``: ``path`` must still not exist when the file is put there (what the command
    line does without ``--force``): anything that appeared there meanwhile is kept and
    ``FileExistsError`` raised. Otherwise a regular file (or a link to one) at ``path`` is
    replaced, and anything else refused with ValueError (see :func:`check_output`).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    remove_stale(folder)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name[:100]}.", suffix=TMP_SUFFIX)
    except OSError as e:
        raise OSError(f"{path}: cannot write in {folder} ({e.strerror or e})") from None
    os.close(fd)
    track(tmp)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if exclusive:
            try:
                _link_exclusively(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path}: appeared while this command ran; it is kept, and the output was not "
                                      "written (pass --force to overwrite)") from None
            os.unlink(tmp)
        else:
            _existing(path, path)
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        untrack(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, exclusive: bool = False) -> None:
    """:func:`atomic_write` of a bytes object."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), exclusive=exclusive)
