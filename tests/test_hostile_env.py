"""A hostile or unlucky environment: planted libraries, odd files at the output path, races,
signals, huge or odd inputs. Every case ends in one line (or one logged line), never a
traceback; no code is loaded from a folder someone else could have written; no file is replaced
that was not asked for, and nothing but a regular file ever is.

TINY widths, one thread, and ``--max-pixels`` lowered so that the bounds bite at small sizes.
Ownership cases chown files to another user, which needs root; root passes permission checks,
so "not writable" cases rest on the mode checks the code makes itself.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import kernels_cpu
from kernels_cpu import _build as B

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
OTHER_UID = 54321
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="chown to another user needs root")


def cli(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "hpcm_triton", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout, cwd=ROOT, **kw)


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith("hpcm-triton: "), stderr
    return lines[0]


# ---------------------------------------------------------------- the kernel cache
needs_kernels = pytest.mark.skipif(not kernels_cpu.available(),
                                   reason=f"C kernels unavailable: {kernels_cpu.unavailable_reason()}")
PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *p = getenv("HPCM_TEST_PLANTED");
    if (p) { FILE *f = fopen(p, "w"); if (f) { fputs("ran\n", f); fclose(f); } }
}
int not_the_kernels(void) { return 0; }
"""


@pytest.fixture(scope="module")
def planted_lib(tmp_path_factory):
    """A shared library whose constructor writes the file $HPCM_TEST_PLANTED when it is loaded."""
    d = tmp_path_factory.mktemp("plant")
    (d / "planted.c").write_text(PLANTED_C)
    r = subprocess.run([B._compiler(), "-shared", "-fPIC", "-o", str(d / "planted.so"), str(d / "planted.c")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return d / "planted.so"


@pytest.fixture
def kcache(tmp_path, monkeypatch, caplog):
    """An empty kernel cache and temporary folder in tmp_path, and a compiler that copies the
    library this test run already built (a real build takes seconds)."""
    real = Path(B.load()._name)
    built = []

    def copy_compile(cc, flags, out):
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.copyfile(real, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
        built.append((out, flags))

    (tmp_path / "tmp").mkdir(mode=0o700)
    monkeypatch.setenv("HPCM_TRITON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HPCM_TEST_PLANTED", str(tmp_path / "planted-code-ran"))
    monkeypatch.delenv("HPCM_TRITON_CPU_MARCH", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(B, "_compile", copy_compile)
    caplog.set_level(logging.INFO, logger="kernels_cpu")
    name = f"libbiwkv4-{B._key(B._compiler(), B._arch_flags()[0])}.so"
    cache = tmp_path / "cache" / "cpu_kernels"
    return SimpleNamespace(root=tmp_path, cache=cache, lib=cache / name, name=name, built=built,
                           user_tmp=tmp_path / "tmp" / f"hpcm_triton-{os.getuid()}" / "cpu_kernels",
                           ran=tmp_path / "planted-code-ran", log=caplog)


def _warnings(caplog) -> list[str]:
    msgs = [r.getMessage() for r in caplog.records if r.name == "kernels_cpu" and r.levelno >= logging.WARNING]
    assert all("\n" not in m for m in msgs), msgs  # the command line prints each as one line
    return msgs


def _plant(k, planted_lib, where: Path, mode=0o755, owner=None) -> Path:
    where.mkdir(parents=True, exist_ok=True, mode=0o700)
    lib = where / k.name
    shutil.copyfile(planted_lib, lib)
    os.chmod(lib, mode)
    if owner is not None:
        os.chown(lib, owner, -1)
    return lib


@needs_kernels
def test_an_empty_cache_is_made_private(kcache):
    lib = B._load()
    assert Path(lib._name) == kcache.lib and lib.biwkv4_cpu_abi() == B.ABI
    for d in (kcache.cache, kcache.cache.parent):
        assert oct(d.stat().st_mode & 0o777) == oct(0o700), d
    assert _warnings(kcache.log) == []


@needs_kernels
@needs_root
def test_a_planted_library_of_another_user_is_never_loaded(kcache, planted_lib):
    """The reported hole: a library someone else put at the predictable name ran in compress."""
    planted = _plant(kcache, planted_lib, kcache.cache, owner=OTHER_UID)
    lib = B._load()
    assert not kcache.ran.exists(), "the planted library's constructor ran"
    (msg,) = _warnings(kcache.log)
    assert str(planted) in msg and f"owned by uid {OTHER_UID}" in msg and "not loaded" in msg
    built = kcache.built[0][0]
    assert built.parent.name.startswith("hpcm_triton-kernels-") and Path(lib._name) == built
    assert not built.parent.exists()  # the private folder is removed once the library is loaded
    assert lib.biwkv4_cpu_abi() == B.ABI


@needs_kernels
@pytest.mark.parametrize("how", ["other owner", "world-writable", "group-writable parent", "writable library"])
def test_a_cache_others_can_write_is_refused(kcache, planted_lib, how):
    if how == "other owner" and not IS_ROOT:
        pytest.skip("chown needs root")
    planted = _plant(kcache, planted_lib, kcache.cache, mode=0o777 if how == "writable library" else 0o755)
    refused = {"other owner": kcache.cache, "world-writable": kcache.cache,
               "group-writable parent": kcache.cache.parent, "writable library": planted}[how]
    if how == "other owner":
        os.chown(kcache.cache, OTHER_UID, -1)
    elif how == "world-writable":
        os.chmod(kcache.cache, 0o777)
    elif how == "group-writable parent":
        os.chmod(kcache.cache.parent, 0o770)
    lib = B._load()
    assert not kcache.ran.exists(), "the planted library's constructor ran"
    (msg,) = _warnings(kcache.log)
    assert msg.split(": ")[0].endswith(str(refused)), msg
    assert {"other owner": f"owned by uid {OTHER_UID}", "world-writable": "writable by group and others (mode 0777)",
            "group-writable parent": "writable by group (mode 0770)",
            "writable library": "writable by group and others (mode 0777)"}[how] in msg
    if how == "writable library":  # a fresh private folder, removed after loading
        assert not Path(lib._name).parent.exists()
    else:  # the per-user cache in the temporary folder, made private
        assert Path(lib._name) == kcache.user_tmp / kcache.name
        assert oct(kcache.user_tmp.stat().st_mode & 0o777) == oct(0o700)


@needs_kernels
@needs_root
def test_a_taken_per_user_temporary_cache_is_refused_too(kcache, planted_lib):
    """The cache cannot be written and the per-user folder in the temporary folder (a
    predictable name) belongs to someone else: a fresh private folder."""
    kcache.cache.parent.write_text("a file where the cache folder should be")
    _plant(kcache, planted_lib, kcache.user_tmp)
    os.chown(kcache.user_tmp.parent, OTHER_UID, -1)
    lib = B._load()
    assert not kcache.ran.exists()
    (msg,) = _warnings(kcache.log)
    assert str(kcache.user_tmp.parent) in msg and f"owned by uid {OTHER_UID}" in msg
    assert Path(lib._name).parent.name.startswith("hpcm_triton-kernels-")


@needs_kernels
@pytest.mark.parametrize("content", ["garbage", "no kernel symbols"])
def test_a_broken_cached_library_is_rebuilt(kcache, planted_lib, content):
    kcache.cache.mkdir(parents=True, mode=0o700)
    if content == "garbage":
        kcache.lib.write_bytes(b"not an ELF file")
        os.chmod(kcache.lib, 0o755)
    else:  # a loadable library (this user's own) without the kernels' symbols
        _plant(kcache, planted_lib, kcache.cache)
    lib = B._load()
    assert Path(lib._name) == kcache.lib and lib.biwkv4_cpu_abi() == B.ABI and len(kcache.built) == 1
    (msg,) = _warnings(kcache.log)
    assert msg.startswith(f"could not load the CPU kernel library {kcache.lib}") and msg.endswith("rebuilding it")


@needs_kernels
def test_a_library_that_stays_broken_is_a_reason_not_a_traceback(kcache, monkeypatch):
    def broken_compile(cc, flags, out):
        out.write_bytes(b"still not an ELF file")
        os.chmod(out, 0o755)

    monkeypatch.setattr(B, "_compile", broken_compile)
    with pytest.raises(kernels_cpu.CPUKernelUnavailable, match="rebuilding it failed: could not load"):
        B._load()


@needs_kernels
def test_cpu_march_still_picks_the_build(kcache, monkeypatch):
    monkeypatch.setenv("HPCM_TRITON_CPU_MARCH", "x86-64-v2")
    assert B._arch_flags() == (["-march=x86-64-v2"],)
    lib = B._load()
    ((out, flags),) = kcache.built
    assert flags == ["-march=x86-64-v2"] and Path(lib._name) == out and out.name != kcache.name
