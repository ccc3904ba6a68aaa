"""A hostile or unlucky environment: planted libraries, odd files at the output path, races,
signals, huge or odd inputs. Every case ends in one line (or one logged line), never a
traceback; no code is loaded from a folder someone else could have written; no file is replaced
that was not asked for, and nothing but a regular file ever is.

TINY widths, one thread, and ``--max-pixels`` lowered so that the bounds bite at small sizes.
Ownership cases chown files to another user, which needs root; root passes permission checks,
so "not writable" cases rest on the mode checks the code makes itself.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import kernels_cpu
from hpcm_triton import bitstream, cli
from hpcm_triton import images as im
from hpcm_triton.outputs import (TMP_SUFFIX, Interrupted, atomic_write, atomic_write_bytes, check_output,
                                 remove_stale)
from hpcm_triton.training import loop as L
from kernels_cpu import _build as B

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
OTHER_UID = 54321
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="chown to another user needs root")


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
    """A library someone else put at the cache's predictable name never runs (its constructor
    would run inside compress)."""
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


# ---------------------------------------------------------------- outputs


def main_error(capsys, *args) -> str:
    rc = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc == 2, err
    return one_line(err)


def leftovers(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(TMP_SUFFIX)]


def _make(kind: str, path: Path):
    """Something that is not a regular file at ``path``."""
    if kind == "character device":
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
        except PermissionError:
            pytest.skip("mknod is not permitted here")
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        return s
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink loop":
        path.symlink_to(path.name)
    return None


@pytest.mark.parametrize("kind", ["character device", "FIFO", "socket", "directory", "symlink loop"])
def test_only_a_regular_file_is_ever_replaced(tmp_path, capsys, kind):
    out = tmp_path / "out"
    keep = _make(kind, out)
    before = os.lstat(out)
    try:
        assert f"{out}: is a" in main_error(capsys, "compress", "chelsea", "-o", out, "--force")
        for force in (False, True):
            with pytest.raises(ValueError, match=f"is a {kind}" if kind != "directory" else "is a directory"):
                check_output(out, force=force)
        with pytest.raises(ValueError, match="only a regular file is ever replaced|symlink loop"):
            atomic_write_bytes(out, b"data")  # what is found at rename time is checked again
        after = os.lstat(out)
        assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino) and leftovers(tmp_path) == []
    finally:
        if keep is not None:
            keep.close()


def test_force_replaces_a_regular_file_or_a_link_to_one(tmp_path, capsys):
    target = tmp_path / "target.hpcm"
    target.write_bytes(b"old")
    link = tmp_path / "link.hpcm"
    link.symlink_to(target.name)
    dangling = tmp_path / "dangling.hpcm"
    dangling.symlink_to("nowhere")
    assert "already exists (a symbolic link)" in main_error(capsys, "compress", "chelsea", "-o", dangling)
    for p in (target, link):
        assert "already exists" in main_error(capsys, "compress", "chelsea", "-o", p, "--size", "tiny")
        assert check_output(p, force=True) == p
    atomic_write_bytes(link, b"new")  # the link is replaced by the file, the file it named is kept
    assert not link.is_symlink() and link.read_bytes() == b"new" and target.read_bytes() == b"old"


def test_a_file_that_appears_while_writing_is_kept(tmp_path):
    out = tmp_path / "out.hpcm"

    def slow_write(tmp):
        Path(tmp).write_bytes(b"ours")
        out.write_bytes(b"someone else's")  # appears after the check, before the rename

    with pytest.raises(FileExistsError, match="appeared while this command ran"):
        atomic_write(out, slow_write, exclusive=True)
    assert out.read_bytes() == b"someone else's" and leftovers(tmp_path) == []


def test_two_writers_of_one_new_path_one_wins_one_is_refused(tmp_path):
    out = tmp_path / "out.hpcm"

    def first(tmp):  # the second writer runs to completion while the first is writing
        Path(tmp).write_bytes(b"first")
        atomic_write_bytes(out, b"second", exclusive=True)

    with pytest.raises(FileExistsError):
        atomic_write(out, first, exclusive=True)
    assert out.read_bytes() == b"second" and leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def small_png(tmp_path_factory):
    from hpcm_triton import images as im

    p = tmp_path_factory.mktemp("img") / "small.png"
    im.save_image(im.bundled("chelsea")[..., 100:164, 150:246], p)  # 64×96
    return p


def test_compress_refuses_an_output_that_appeared_meanwhile(tmp_path, capsys, monkeypatch, small_png):
    out = tmp_path / "x.hpcm"
    to_bytes = bitstream.to_bytes

    def racing(*a, **k):
        out.write_bytes(b"precious")
        return to_bytes(*a, **k)

    monkeypatch.setattr(bitstream, "to_bytes", racing)
    args = ("compress", small_png, "-o", out, "--size", "tiny", "--model", "hpcm-base", "--threads", "1")
    assert "appeared while this command ran" in main_error(capsys, *args)
    assert out.read_bytes() == b"precious" and leftovers(tmp_path) == []
    assert cli.main([str(a) for a in (*args, "--force")]) == 0 and out.read_bytes()[:4] == b"HPCM"


def test_an_unwritable_folder_is_refused_first_naming_the_output(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    monkeypatch.setattr(bitstream, "read", lambda *a, **k: pytest.fail("decompress started its work"))
    for args in (("compress", "chelsea", "-o", ro / "x.hpcm"), ("decompress", tmp_path / "a.hpcm", "-o", ro / "x.png")):
        if args[0] == "decompress":
            (tmp_path / "a.hpcm").write_bytes(b"HPCM")
        msg = main_error(capsys, *args)
        assert f"{args[-1]}: cannot write in {ro}: it is {'read-only' if IS_ROOT else 'not writable'}" in msg, msg
    why = "read-only (mode 0555)" if IS_ROOT else "not writable"
    for args in (("evaluate", "--size", "tiny", "--out", ro / "ev"), ("train", "--size", "tiny", "--out", ro / "run"),
                 ("demo", "--size", "tiny", "--models", "hpcm-base", "--keep", ro / "keep")):
        assert main_error(capsys, *args) == f"hpcm-triton: error: {args[-1]}: cannot write in {ro}: it is {why}"
    assert os.listdir(ro) == []
    # a folder that refuses the temporary file anyway (here: mkstemp fails): the output is named
    monkeypatch.setattr(tempfile, "mkstemp", lambda **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(OSError, match=f"^{tmp_path / 'y.png'}: cannot write in {tmp_path} \\(Permission denied\\)$"):
        atomic_write_bytes(tmp_path / "y.png", b"data")


@pytest.mark.parametrize("name", ["rec.xyz", "rec", "-"])
def test_decompress_checks_the_image_suffix_before_any_work(tmp_path, capsys, monkeypatch, name):
    (tmp_path / "a.hpcm").write_bytes(b"HPCM")
    monkeypatch.setattr(bitstream, "read", lambda *a, **k: pytest.fail("decompress started its work"))
    out = name if name == "-" else tmp_path / name
    msg = main_error(capsys, "decompress", tmp_path / "a.hpcm", "-o", out)
    assert {"rec.xyz": "unknown image suffix '.xyz'", "rec": "no image suffix",
            "-": "standard output is not supported"}[name] in msg


@pytest.mark.skipif(not IS_ROOT, reason="a temporary file of another user needs chown")
def test_stale_temporary_files_are_removed_after_a_day(tmp_path):
    old = time.time() - 2 * 24 * 3600
    names = {"stale": ".out.png.a1b2c3d4" + TMP_SUFFIX, "fresh": ".out.png.e5f6g7h8" + TMP_SUFFIX,
             "other user": ".x.png.i9j0k1l2" + TMP_SUFFIX, "not ours": ".out.png.m3n4o5p6.tmp"}
    for what, n in names.items():
        (tmp_path / n).write_bytes(b"partial")
        if what != "fresh":
            os.utime(tmp_path / n, (old, old))
    os.chown(tmp_path / names["other user"], OTHER_UID, -1)
    atomic_write_bytes(tmp_path / "out.png", b"data")
    assert sorted(os.listdir(tmp_path)) == sorted(["out.png", *(n for w, n in names.items() if w != "stale")])
    assert remove_stale(tmp_path, older_than=0) == [names["fresh"]]


# ---------------------------------------------------------------- inputs
@pytest.mark.parametrize("kind", ["FIFO", "character device"])
def test_an_input_that_is_not_a_regular_file_is_named(tmp_path, capsys, kind):
    src = tmp_path / "in"
    if kind == "FIFO":
        os.mkfifo(src)
    else:
        src = Path("/dev/zero")
    for args in (("compress", src, "-o", tmp_path / "x.hpcm"), ("decompress", src, "-o", tmp_path / "x.png"),
                 ("info", src), ("demo", "--image", src, "--size", "tiny", "--models", "hpcm-base")):
        assert f"{src}: is a {kind}, expected a" in main_error(capsys, *args)
    assert [n for n in os.listdir(tmp_path) if n != "in"] == []


# ---------------------------------------------------------------- bounded inputs, EXIF


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width``×``height`` 1-bit pixels: its header and the start of its
    data, tens of bytes (what a decompression bomb looks like before it is decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64)))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))


@pytest.mark.parametrize("side, limit", [(8000, None), (30000, None), (1100, 1_000_000), (3000, 1_000_000)])
def test_an_image_over_the_bound_is_refused_from_its_header(tmp_path, capsys, no_pixel_decoding, side, limit):
    """8000² and 30000² (a bomb to Pillow too) at the default bound; 1100² (up to twice the bound:
    Pillow only warns) and 3000² (more than twice: Pillow raises) with --max-pixels lowered."""
    bomb = png_header_only(tmp_path / "bomb.png", side, side)
    bound = limit or cli.DEFAULT_MAX_PIXELS
    extra = () if limit is None else ("--max-pixels", limit)
    expect = f"bomb.png: image is {side}×{side} (height×width) = {side * side:,} pixels, more than the limit of {bound:,}"
    assert expect in main_error(capsys, "compress", bomb, "-o", tmp_path / "x.hpcm", "--size", "tiny", *extra)
    assert expect in main_error(capsys, "demo", "--image", bomb, "--size", "tiny", "--models", "hpcm-base", *extra)
    data = tmp_path / "data"
    data.mkdir()
    os.replace(bomb, data / "bomb.png")
    assert expect in main_error(capsys, "evaluate", "--data", data, "--size", "tiny", "--out", tmp_path / "ev", *extra)
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_the_bound_is_exact(small_png, tmp_path, capsys):
    """64×96 = 6,144 pixels: allowed at --max-pixels 6144, refused at 6143."""
    args = ("compress", small_png, "--size", "tiny", "--model", "hpcm-base", "--threads", "1", "-o")
    assert "more than the limit of 6,143" in main_error(capsys, *args, tmp_path / "a.hpcm", "--max-pixels", 6143)
    assert cli.main([str(a) for a in (*args, tmp_path / "a.hpcm", "--max-pixels", 6144)]) == 0
    assert "--max-pixels 0: must be positive" in main_error(capsys, *args, tmp_path / "b.hpcm", "--max-pixels", 0)


def test_exif_orientation_is_applied_and_said_once(tmp_path, capsys):
    from PIL import Image, ImageOps

    stored = im.to_uint8(im.bundled("chelsea")[0, :, 100:164, 150:246]).permute(1, 2, 0).numpy()  # 64×96
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # "turn 90° clockwise to show"
    src = tmp_path / "rotated.png"
    img.save(src, exif=exif.tobytes())
    shown = np.asarray(ImageOps.exif_transpose(Image.open(src)))
    x = im.load_image(src)
    assert x.shape == (1, 3, 96, 64) and np.array_equal(im.to_uint8(x[0]).permute(1, 2, 0).numpy(), shown)
    assert cli.main(["compress", str(src), "-o", str(tmp_path / "r.hpcm"), "--size", "tiny", "--model", "hpcm-base",
                     "--threads", "1"]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert notes == ["hpcm-triton: note: rotated.png: EXIF orientation 6 applied (turned 90° clockwise)"]
    assert bitstream.read(tmp_path / "r.hpcm")["image_size"] == (96, 64)


# ---------------------------------------------------------------- one run per training folder; SIGTERM


@pytest.fixture(scope="module")
def train_data(small_png):
    return small_png.parent  # one 64×96 image: no time spent decoding the bundled photos


@pytest.fixture
def TRAIN(train_data):
    return dict(model="phase3", size="tiny", batch_size=1, crop=64, workers=0, val_every=0, log_every=1,
                checkpoint_every=100, data=str(train_data))


@pytest.fixture
def TRAIN_ARGS(train_data):
    return ("train", "--size", "tiny", "--batch-size", "1", "--crop", "64", "--workers", "0", "--val-every", "0",
            "--data", train_data, "--steps", "1")


@pytest.fixture
def single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, capsys, TRAIN_ARGS):
    out = tmp_path / "run"
    out.mkdir()
    with L.hold_folder(out):  # a run in progress (another process would hold it the same way)
        for extra in ((), ("--force",), ("--resume",)):
            msg = main_error(capsys, *TRAIN_ARGS, "--out", out, *extra)
            if extra != ("--resume",):
                assert f"{out}: another training run is using this folder (pid {os.getpid()})" in msg, msg
    assert sorted(os.listdir(out)) == ["train.lock"]


@pytest.mark.parametrize("artifact", ["best.pt", "log.jsonl", "tb"])
def test_any_earlier_run_file_stops_a_fresh_run(tmp_path, capsys, artifact, single_thread, TRAIN_ARGS):
    """A run that died after best.pt but before its first checkpoint.pt: running the same command
    again must not delete best.pt and log.jsonl."""
    out = tmp_path / "run"
    out.mkdir()
    (out / artifact).mkdir() if artifact == "tb" else (out / artifact).write_bytes(b"earlier run")
    assert f"already holds a run ({artifact})" in main_error(capsys, *TRAIN_ARGS, "--out", out)
    assert (out / artifact).exists()
    if artifact == "log.jsonl":  # --force starts afresh
        assert cli.main([str(a) for a in (*TRAIN_ARGS, "--out", out, "--force")]) == 0
        assert json.loads((out / "log.jsonl").read_text().splitlines()[0])["event"] == "start"


def _signal_at_step(monkeypatch, step: int, signals):
    """Send ``signals`` to this process during the forward pass of training step ``step`` (1-based)."""
    calls = [0]
    rd_loss = L.rd_loss

    def hooked(*a, **k):
        calls[0] += 1
        if calls[0] == step:
            for s in signals:
                os.kill(os.getpid(), s)
        return rd_loss(*a, **k)

    monkeypatch.setattr(L, "rd_loss", hooked)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_saves_and_resumes_exactly(tmp_path, monkeypatch, single_thread, sig, TRAIN):
    ref = L.train(tmp_path / "ref", steps=4, **TRAIN)["model"].state_dict()
    before = signal.getsignal(sig)
    _signal_at_step(monkeypatch, 2, [sig])
    with pytest.raises(Interrupted) as e:
        L.train(tmp_path / "run", steps=4, **TRAIN)
    assert e.value.signum == sig and str(e.value).startswith("stopped after step 2; checkpoint saved: ")
    assert signal.getsignal(sig) == before  # the handler is given back
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2 and leftovers(tmp_path / "run") == []
    events = [json.loads(ln)["event"] for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert events == ["start", "train", "train", "interrupted"]
    monkeypatch.undo()
    got = L.train(tmp_path / "run", resume=True, steps=4, **TRAIN)["model"].state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_a_second_signal_interrupts_at_once_and_leaves_no_temporary_file(tmp_path, monkeypatch, single_thread,
                                                                         TRAIN):
    _signal_at_step(monkeypatch, 2, [signal.SIGTERM, signal.SIGTERM])
    with pytest.raises(Interrupted) as e:
        L.train(tmp_path / "run", steps=4, **TRAIN)
    assert e.value.signum == signal.SIGTERM and str(e.value) == ""
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and leftovers(tmp_path / "run") == []


def _stat(pid) -> list[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _alive(pid: int) -> bool:
    return (_stat(pid) or ["Z"])[0] != "Z"


def _children(pid: int) -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and _stat(d)[1:2] == [str(pid)] and _alive(int(d))]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux")
def test_sigterm_to_a_training_job_saves_stops_its_workers_and_exits_143(tmp_path, TRAIN_ARGS):
    """What a cluster scheduler does before SIGKILL: SIGTERM to every process of the job."""
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "hpcm_triton", *TRAIN_ARGS[:-1], "100000", "--workers", "1",
                          "--out", str(out), "--log-every", "1", "--checkpoint-every", "100000"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "log.jsonl").exists() and '"train"' in (out / "log.jsonl").read_text()):
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""
            time.sleep(0.05)
        workers = _children(p.pid)
        assert workers, "no data-loader worker"
        os.killpg(p.pid, signal.SIGTERM)
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    err = p.stderr.read()
    assert rc == 143, err
    line = one_line(err)
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert line == f"hpcm-triton: interrupted: stopped after step {step}; checkpoint saved: {out / 'checkpoint.pt'} " \
                   "(continue with --resume)" and step >= 1
    assert leftovers(out) == []
    deadline = time.monotonic() + 2
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(_alive(w) for w in workers), "a data-loader worker outlived the run"


# ---------------------------------------------------------------- a reader that goes away
def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path, small_png):
    """`hpcm-triton info f.hpcm | head -1`: no "Broken pipe" error, the status of a Unix tool that
    SIGPIPE ended (141), as `head` leaves `cat` and `ls`."""
    f = tmp_path / "a.hpcm"
    assert cli.main(["compress", str(small_png), "-o", str(f), "--size", "tiny", "--model", "hpcm-base",
                     "--threads", "1"]) == 0
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the command writes
    try:
        p = subprocess.run([sys.executable, "-m", "hpcm_triton", "info", str(f)], stdout=w, stderr=subprocess.PIPE,
                           text=True, env=ENV, cwd=ROOT, timeout=60)
    finally:
        os.close(w)
    assert (p.returncode, p.stderr) == (128 + signal.SIGPIPE, "")
    p = subprocess.run(["bash", "-c", f'"{sys.executable}" -m hpcm_triton info "{f}" | head -1; '
                        'echo "status ${PIPESTATUS[0]}" >&2'], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert p.stdout == f"{f}:\n" and p.stderr in ("status 0\n", "status 141\n"), p.stderr


# ---------------------------------------------------------------- weights that are not finite
@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory, small_png):
    """A training-format checkpoint with a NaN, an official-format state_dict with an inf, and a
    file the seeded model wrote (what decompress --checkpoint is given)."""
    import dataclasses

    from hpcm_triton.models.seeded import seeded_model

    d = tmp_path_factory.mktemp("weights")
    model = seeded_model("hpcm-base", "tiny")
    sd = model.state_dict()
    name = "g_a.branch.0.weight"
    nan = {k: v.clone() for k, v in sd.items()}
    nan[name].view(-1)[3] = float("nan")
    torch.save({"model": "hpcm-base", "config": dataclasses.asdict(model.config), "state_dict": nan}, d / "nan.pt")
    inf = {k: v.clone() for k, v in sd.items()}
    inf[name].view(-1)[0] = float("inf")
    torch.save({"state_dict": inf}, d / "inf.pth")
    assert cli.main(["compress", str(small_png), "-o", str(d / "a.hpcm"), "--size", "tiny", "--model", "hpcm-base",
                     "--threads", "1"]) == 0
    return SimpleNamespace(nan=d / "nan.pt", inf=d / "inf.pth", hpcm=d / "a.hpcm", name=name)


def test_non_finite_weights_are_named_in_one_line(tmp_path, capsys, bad_weights, small_png, TRAIN_ARGS):
    w = bad_weights
    for ck, extra in ((w.nan, ()), (w.inf, ("--model", "hpcm-base"))):
        expect = f"checkpoint {ck} has non-finite weights in {w.name}"
        for args in (("compress", small_png, "-o", tmp_path / "x.hpcm", "--size", "tiny", "--checkpoint", ck, *extra),
                     ("decompress", w.hpcm, "-o", tmp_path / "x.png", "--checkpoint", ck),
                     ("evaluate", ck, *extra, "--data", small_png.parent, "--out", tmp_path / "ev")):
            msg = main_error(capsys, *args)
            assert expect in msg and "pmf" not in msg and "symbol" not in msg, msg
    train = (*TRAIN_ARGS[:-2], "--model", "hpcm-base", "--steps", "1")
    assert f"checkpoint {w.inf} has non-finite weights in {w.name}" in main_error(
        capsys, *train, "--out", tmp_path / "official", "--init-official", w.inf)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(w.nan, run / "checkpoint.pt")
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert "not a hpcm-triton training checkpoint" in main_error(capsys, *train, "--out", run, "--resume")
    saved.update(optimizer={}, run={})  # what a resumable checkpoint has besides the weights
    torch.save(saved, run / "checkpoint.pt")
    assert f"checkpoint {run / 'checkpoint.pt'} has non-finite weights in {w.name}" in main_error(
        capsys, *train, "--out", run, "--resume")
    assert sorted(os.listdir(tmp_path)) == ["run"]


# ---------------------------------------------------------------- temporary files on interrupts
def test_evaluate_s_temporary_folder_is_removed_by_an_interrupt(tmp_path, monkeypatch, small_png):
    """SIGINT and SIGTERM end evaluate through outputs.remove_pending (cli._exit_on_signals):
    the folder of its .hpcm files must be registered there while it exists."""
    from hpcm_triton import evaluate as ev
    from hpcm_triton import outputs

    seen = []

    def interrupted(model, name, x, path):
        seen.append(Path(path).parent)
        assert str(Path(path).parent) in outputs._PENDING
        outputs.remove_pending()  # what the signal handler does before it exits
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "evaluate_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(None, size="tiny", data=small_png.parent, out_dir=tmp_path / "ev", progress=False)
    assert seen and not seen[0].exists() and not (tmp_path / "ev").exists()
