"""Compiling and loading the C kernels of kernels_cpu.

The C source (kernels_cpu/csrc) is compiled at first use with the system C compiler -- the same
requirement as Triton, whose launchers are also built with it -- for this machine's instruction
set (``-march=native``), and cached. The cache key covers the source, the flags, the compiler's
version and the CPU's feature flags, so a shared home directory never hands one machine a
library built for another. Concurrent first uses (test workers, several CLI processes) wait on a
file lock and build once; the library is written to a temporary name and renamed into place.

Loading a library runs its code, so a library is loaded only from a folder no one else can
have written: the folder (created 0700) must be owned by this user and not writable by group or
others, every folder above it owned by this user or root and not writable by group or others
(unless sticky, as /tmp is), and the library a regular file owned by this user without group or
world write. A cache folder that cannot be written, or that fails the checks (one logged line
naming it), is replaced by a per-user one in the temporary folder under the same checks, and
failing that by a fresh private temporary folder (removed once the library is loaded). A cached
library that fails them is refused the same way, and the kernels are built in a fresh private
temporary folder. A cached library that does not load or lacks the expected symbols is rebuilt
once; if that fails too, the kernels are unavailable with the reason (backend "auto" then warns
and uses the pure-PyTorch scan).

Environment:
    CC                       compiler (default: cc, then gcc, clang)
    HPCM_TRITON_CACHE        cache root (default: ~/.cache/hpcm_triton)
    HPCM_TRITON_CPU_KERNEL   "0" disables the compiled kernels (backend "auto" then uses the
                             pure-PyTorch scan)
    HPCM_TRITON_CPU_MARCH    the target instruction set instead of this machine's, as gcc's
                             -march takes it (e.g. x86-64-v2: no AVX or FMA): builds the kernels
                             another machine would run, to test that files travel between them
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("kernels_cpu")

ABI = 1
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("biwkv4.c", "biwkv4_impl.h")
# no -ffast-math: the vectoriser must not reorder a channel's arithmetic (determinism, exactness)
BASE_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared", "-pthread",
              "-std=gnu11"]
def _arch_flags() -> tuple[list[str], ...]:
    march = os.environ.get("HPCM_TRITON_CPU_MARCH")
    if march:
        return ([f"-march={march}"],)
    return (["-march=native"], [])   # the second: compilers that lack -march=native


class CPUKernelUnavailable(RuntimeError):
    """The C kernels could not be built or loaded (no compiler, compile error, disabled)."""


def cache_root() -> Path:
    return Path(os.environ.get("HPCM_TRITON_CACHE", str(Path.home() / ".cache" / "hpcm_triton")))


def _compiler() -> str:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    raise CPUKernelUnavailable("no C compiler found (set CC, or install gcc)")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _key(cc: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((CSRC / name).read_bytes())
    try:
        ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        ver = cc
    for part in (" ".join(flags), ver.splitlines()[0] if ver else cc, platform.machine(),
                 _cpu_flags(), str(ABI)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _uid() -> int | None:
    """This process's user id; None where files have no POSIX owner (nothing to check there)."""
    return os.getuid() if hasattr(os, "getuid") else None


def _writers(mode: int) -> str:
    return {0o022: "group and others", 0o020: "group", 0o002: "others"}[mode & 0o022]


def _check_folder(d: Path) -> str | None:
    """Why no code may be loaded from the folder ``d`` (a resolved path), or None: it must be
    owned by this user and not writable by group or others, and so must every folder above it
    (owned by this user or root; writable by others only with the sticky bit, as /tmp is)."""
    uid = _uid()
    if uid is None:
        return None
    for i, a in enumerate((d, *d.parents)):
        st = os.stat(a)
        owners = (uid,) if i == 0 else (uid, 0)
        if not stat.S_ISDIR(st.st_mode):
            return f"{a}: not a folder"
        if st.st_uid not in owners:
            return f"{a}: owned by uid {st.st_uid}, not by this user (uid {uid})"
        if st.st_mode & 0o022 and not (i > 0 and st.st_mode & stat.S_ISVTX):
            return f"{a}: writable by {_writers(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _check_library(lib: Path) -> str | None:
    """Why the cached library ``lib`` may not be loaded, or None: it must be a regular file (not
    a link) owned by this user and not writable by group or others."""
    uid = _uid()
    if uid is None:
        return None
    st = os.lstat(lib)
    if not stat.S_ISREG(st.st_mode):
        return f"{lib}: not a regular file"
    if st.st_uid != uid:
        return f"{lib}: owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & 0o022:
        return f"{lib}: writable by {_writers(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


class _Untrusted(CPUKernelUnavailable):
    """A cache folder or library that someone other than this user could have written."""


class _Folder:
    """Where the library is built and loaded from: a checked cache folder, or a fresh private
    temporary one (``temporary``: removed by :meth:`discard`, once the library is loaded)."""

    def __init__(self, path: Path, temporary: bool):
        self.path, self.temporary = path, temporary

    @classmethod
    def private(cls) -> "_Folder":
        return cls(Path(tempfile.mkdtemp(prefix="hpcm_triton-kernels-")), True)

    @classmethod
    def open(cls, want: Path) -> "_Folder":
        """``want``, with each missing folder on its way created 0700, checked and probed for
        writing. Raises OSError if it cannot be written, :class:`_Untrusted` if it is not
        private to this user."""
        for p in reversed([p for p in (want, *want.parents) if not p.exists()]):
            try:
                p.mkdir(mode=0o700)
            except FileExistsError:
                pass
        d = Path(os.path.realpath(want))  # checked once, then used by its real path
        why = _check_folder(d)
        if why:
            raise _Untrusted(why)
        tempfile.NamedTemporaryFile(dir=d, prefix=".probe", delete=True).close()
        return cls(d, False)

    @classmethod
    def cache(cls) -> "_Folder":
        """The cache folder; if it cannot be written or is refused (one logged line), a per-user
        one in the temporary folder under the same checks; failing both, a fresh private
        temporary folder."""
        fallback = Path(tempfile.gettempdir()) / f"hpcm_triton-{_uid() or 0}" / "cpu_kernels"
        for want in (cache_root() / "cpu_kernels", fallback):
            try:
                return cls.open(want)
            except _Untrusted as e:
                log.warning("kernel cache %s: not used (no code is loaded from a folder others can write)", e)
            except OSError as e:
                log.debug("kernel cache %s: cannot be written (%s)", want, e.strerror or e)
        log.info("building the CPU kernels in a private temporary folder")
        return cls.private()

    def discard(self) -> None:
        if self.temporary:
            shutil.rmtree(self.path, ignore_errors=True)


def _compile(cc: str, flags: list[str], out: Path) -> None:
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = [cc, *BASE_FLAGS, *flags, "-I", str(CSRC), "-o", str(tmp), str(CSRC / "biwkv4.c"), "-lm"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        raise CPUKernelUnavailable(f"could not run {cc}: {e}") from None
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise CPUKernelUnavailable(f"{' '.join(cmd)} failed:\n{r.stderr.strip()[-2000:]}")
    os.chmod(tmp, 0o755)  # whatever the umask: a library others can write is refused (_check_library)
    os.replace(tmp, out)


def _lock(f) -> None:
    """Exclusive lock on an open file until it is closed (POSIX; elsewhere no lock: concurrent
    first builds then each compile, and the rename keeps the result whole)."""
    try:
        import fcntl
    except ImportError:
        return
    fcntl.flock(f, fcntl.LOCK_EX)


def _build(cc: str, folder: _Folder, broken: Path | None = None) -> Path:
    """The library in ``folder``, compiled if absent (or if it is ``broken``, a library that did
    not load). Raises :class:`_Untrusted` for a cached library that fails the checks."""
    errors = []
    for arch in _arch_flags():
        key = _key(cc, arch)
        lib = folder.path / f"libbiwkv4-{key}.so"
        with open(folder.path / f".libbiwkv4-{key}.lock", "w") as lock:
            _lock(lock)   # another process may be building it right now
            if broken == lib and lib.exists():
                lib.unlink()
            if lib.exists():
                why = _check_library(lib)
                if why:
                    raise _Untrusted(why)
                return lib
            log.info("compiling the CPU Bi-WKV4 kernels (%s, about 10 s) into %s",
                     "in every run until the cache is usable" if folder.temporary else "once per machine", lib)
            try:
                _compile(cc, arch, lib)
                return lib
            except CPUKernelUnavailable as e:
                errors.append(str(e))
    raise CPUKernelUnavailable("\n".join(errors))


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    P, I, D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    if lib.biwkv4_cpu_abi() != ABI:
        raise CPUKernelUnavailable("another interface version")
    for sfx in ("f32", "f64"):
        fn = getattr(lib, f"biwkv4_chunk_len_{sfx}")
        fn.restype, fn.argtypes = I, [D, I]
        fn = getattr(lib, f"biwkv4_fwd_{sfx}")
        fn.restype, fn.argtypes = ctypes.c_int, [P] * 7 + [I] * 4 + [ctypes.c_int]
        fn = getattr(lib, f"biwkv4_bwd_{sfx}")
        fn.restype, fn.argtypes = ctypes.c_int, [P] * 14 + [I] * 4 + [ctypes.c_int]
    return lib


def _open(lib: Path) -> ctypes.CDLL:
    handle = None
    try:
        handle = ctypes.CDLL(str(lib))
        return _declare(handle)
    except (OSError, AttributeError, CPUKernelUnavailable) as e:  # not a library; lacks a symbol
        if handle is not None:  # unloaded, or the dynamic loader hands it back for the rebuilt file's name
            try:
                import _ctypes

                _ctypes.dlclose(handle._handle)
            except (ImportError, AttributeError, OSError):
                pass
        detail = " ".join(str(e).split())[:300]
        raise CPUKernelUnavailable(f"could not load the CPU kernel library {lib}: {detail}") from None


def _load() -> ctypes.CDLL:
    """Build (or find) the library and load it, by the rules of the module docstring."""
    cc = _compiler()
    folder = _Folder.cache()
    try:
        try:
            lib = _build(cc, folder)
        except _Untrusted as e:
            log.warning("kernel library %s: not loaded; building the CPU kernels in a private temporary folder", e)
            folder = _Folder.private()
            lib = _build(cc, folder)
        try:
            return _open(lib)
        except CPUKernelUnavailable as e:
            log.warning("%s; rebuilding it", e)
            first = str(e)
        try:
            return _open(_build(cc, folder, broken=lib))
        except CPUKernelUnavailable as e:
            raise CPUKernelUnavailable(f"{first}; rebuilding it failed: {e}") from None
    finally:
        folder.discard()  # a loaded library stays mapped after its file is removed


@functools.lru_cache(maxsize=1)
def _load_cached():
    if os.environ.get("HPCM_TRITON_CPU_KERNEL", "1") == "0":
        return None, "disabled by HPCM_TRITON_CPU_KERNEL=0"
    try:
        return _load(), None
    except CPUKernelUnavailable as e:
        return None, str(e)


def load() -> ctypes.CDLL:
    """The loaded library; raises :class:`CPUKernelUnavailable` with the reason."""
    lib, why = _load_cached()
    if lib is None:
        raise CPUKernelUnavailable(why)
    return lib


def available() -> bool:
    return _load_cached()[0] is not None


def unavailable_reason() -> str | None:
    return _load_cached()[1]
