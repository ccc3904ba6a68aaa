"""Compiling and loading the C kernels of kernels_cpu.

The C source (kernels_cpu/csrc) is compiled at first use with the system C compiler -- the same
requirement as Triton, whose launchers are also built with it -- for this machine's instruction
set (``-march=native``), and cached. The cache key covers the source, the flags, the compiler's
version and the CPU's feature flags, so a shared home directory never hands one machine a
library built for another. Concurrent first uses (test workers, several CLI processes) wait on a
file lock and build once; the library is written to a temporary name and renamed into place.

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


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe", delete=True)
        probe.close()
        return path
    except OSError:
        alt = Path(tempfile.gettempdir()) / f"hpcm_triton-{getattr(os, 'getuid', lambda: 0)()}" / "cpu_kernels"
        alt.mkdir(parents=True, exist_ok=True)
        return alt


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
    os.replace(tmp, out)


def _lock(f) -> None:
    """Exclusive lock on an open file until it is closed (POSIX; elsewhere no lock: concurrent
    first builds then each compile, and the rename keeps the result whole)."""
    try:
        import fcntl
    except ImportError:
        return
    fcntl.flock(f, fcntl.LOCK_EX)


def _build() -> Path:
    cc = _compiler()
    d = _writable_dir(cache_root() / "cpu_kernels")
    errors = []
    for arch in _arch_flags():
        key = _key(cc, arch)
        lib = d / f"libbiwkv4-{key}.so"
        if lib.exists():
            return lib
        with open(d / f".libbiwkv4-{key}.lock", "w") as lock:
            _lock(lock)   # another process may be building it right now
            if lib.exists():
                return lib
            log.info("compiling the CPU Bi-WKV4 kernels (once per machine, about 10 s) into %s", lib)
            try:
                _compile(cc, arch, lib)
                return lib
            except CPUKernelUnavailable as e:
                errors.append(str(e))
    raise CPUKernelUnavailable("\n".join(errors))


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    P, I, D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    if lib.biwkv4_cpu_abi() != ABI:
        raise CPUKernelUnavailable("the cached CPU kernel library has another interface version")
    for sfx in ("f32", "f64"):
        fn = getattr(lib, f"biwkv4_chunk_len_{sfx}")
        fn.restype, fn.argtypes = I, [D, I]
        fn = getattr(lib, f"biwkv4_fwd_{sfx}")
        fn.restype, fn.argtypes = ctypes.c_int, [P] * 7 + [I] * 4 + [ctypes.c_int]
        fn = getattr(lib, f"biwkv4_bwd_{sfx}")
        fn.restype, fn.argtypes = ctypes.c_int, [P] * 14 + [I] * 4 + [ctypes.c_int]
    return lib


@functools.lru_cache(maxsize=1)
def _load_cached():
    if os.environ.get("HPCM_TRITON_CPU_KERNEL", "1") == "0":
        return None, "disabled by HPCM_TRITON_CPU_KERNEL=0"
    try:
        return _declare(ctypes.CDLL(str(_build()))), None
    except CPUKernelUnavailable as e:
        return None, str(e)
    except OSError as e:   # a library that does not load (e.g. a foreign build in the cache)
        return None, f"could not load the CPU kernel library: {e}"


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
