"""Writing output files safely: never over an input, never over an existing file unless asked,
never a partial file, and with the permissions the user's umask gives (not mkstemp's 0600).

Every command that writes a file goes through :func:`check_output` before any work and
:func:`atomic_write` for the write itself.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(path: str | os.PathLike, *, force: bool = False,
                 inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Validate an output path before any work is done.

    Raises ``FileExistsError`` if ``path`` exists and ``force`` is false; ``ValueError`` if it is
    one of ``inputs`` (same path, or the same file through a link) even with ``force``, if it is
    a directory, or if its directory does not exist.
    """
    p = Path(path)
    for i in inputs:
        i = Path(i)
        if p.resolve() == i.resolve() or _same_file(p, i):
            raise ValueError(f"{path}: the output is the input file {i}; refusing to overwrite it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{path}: output directory {parent} does not exist")
    if p.is_dir():
        raise ValueError(f"{path}: is a directory")
    if (p.exists() or p.is_symlink()) and not force:
        raise FileExistsError(f"{path}: already exists (pass --force to overwrite)")
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``:
    readers see the old file or the whole new one, never a partial one. The file gets
    ``0666 & ~umask`` like a file opened with ``open(path, "w")``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.",
                               suffix=".tmp")
    os.close(fd)
    track(tmp)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        untrack(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """:func:`atomic_write` of a bytes object."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
