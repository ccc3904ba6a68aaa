"""Hostile and careless .hpcm files: every decode ends in bounded time and bounded memory,
with a BitstreamError (one line and exit 2 on the command line)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcm_triton import BitstreamError, bitstream
from hpcm_triton import images as im
from hpcm_triton.entropy import coder
from hpcm_triton.entropy.coder import CodedStream, DecodeSession, encode
from hpcm_triton.models.seeded import seeded_model

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

# A z/y stream whose first symbol escapes to the bypass coder with n_bypass = 8 and a raw value
# of 0x4FFFFFFE: the decoder returns a symbol near 2**29, which compressai's encoder cannot
# code (its bypass loop never ends for raw values of 2**28 or more). Layout: the rANS state
# (two 32-bit words) with low 16 bits 0xFFFF selects the escape symbol; the next word's low
# nibble is n_bypass, the word after it holds the raw nibbles.
CRAFTED = struct.pack("<4I", 0xFFFF, 0, 0xFFFFFFF8, 0x4FFFFFFE) + bytes(48)


@pytest.fixture(scope="module")
def model():
    return seeded_model("phase2", "tiny")


@pytest.fixture(scope="module")
def comp(model):
    return model.compress(im.bundled("chelsea")[..., :128, :128].contiguous())


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "hpcm_triton", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith("hpcm-triton: error: "), stderr
    return lines[0]


# ---------------------------------------------------------------- the bypass-coder hang
def test_encoder_refuses_symbols_it_cannot_code(model):
    t = model._cdf_tables()["y"]
    off, maxv = t.offsets[0], t.lengths[0] - 2
    ok = np.array([off - coder.BYPASS_LIMIT, off + maxv + coder.BYPASS_LIMIT - 1])  # the extremes that terminate
    encode([(ok, np.zeros(2, np.int32), t)])
    for bad in (off - coder.BYPASS_LIMIT - 1, off + maxv + coder.BYPASS_LIMIT, 2**31 - 1):
        with pytest.raises(ValueError, match="outside the coder's range.*check the checkpoint"):
            encode([(np.array([bad]), np.zeros(1, np.int32), t)])


def test_crafted_stream_is_refused_before_reencoding(model):
    t0 = time.perf_counter()
    with DecodeSession([CRAFTED], model._cdf_tables(), label="z stream") as s:
        with pytest.raises(BitstreamError, match="outside the coder's range"):
            s.decode(0, "z", np.zeros(1, np.int32))
            s.verify()  # today's code got here and never returned
    assert time.perf_counter() - t0 < 30


def test_crafted_file_ends_with_one_line(model, comp, tmp_path):
    z = comp["strings"][1][0]
    bad = {**comp, "strings": [comp["strings"][0], [CodedStream.of(CRAFTED, z.index_crcs)]]}
    path = tmp_path / "crafted.hpcm"
    bitstream.write(path, "phase2", model, bad)  # valid CRCs and fingerprints: only the z stream is hostile
    t0 = time.perf_counter()
    r = _cli("decompress", path, "-o", tmp_path / "out.png", timeout=180)
    assert r.returncode == 2, r.stderr
    assert "z stream" in _one_line(r.stderr)
    assert time.perf_counter() - t0 < 120
    assert not (tmp_path / "out.png").exists()


# ---------------------------------------------------------------- fuzz
_mutation = st.one_of(
    st.tuples(st.just("xor"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(1, 10**6), st.just(0)),
    st.tuples(st.just("append"), st.integers(1, 16), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("word"), st.integers(0, 10**6), st.integers(0, 2**32 - 1)),
)


def _mutate(s: bytes, how) -> bytes:
    kind, a, b = how
    s = bytearray(s)
    if len(s) < 4 and kind in ("xor", "word"):
        kind, a = "append", 1
    if kind == "xor":
        s[a % len(s)] ^= b
    elif kind == "cut":
        s = s[:max(0, len(s) - 4 * (1 + a % max(1, len(s) // 4)))]
    elif kind == "append":
        s += struct.pack("<I", b) * a
    else:
        i = 4 * (a % (len(s) // 4))
        s[i:i + 4] = struct.pack("<I", b)
    return bytes(s)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(which=st.sampled_from(["y", "z", "both"]), how=st.lists(_mutation, min_size=1, max_size=3),
       checksums=st.booleans())
def test_fuzz_mutated_streams_end_in_bounded_time(model, comp, which, how, checksums, monkeypatch_timeout):
    """Mutated y/z streams (a crafted file with recomputed CRCs): decoded, or refused with a
    BitstreamError, in bounded time; never a hang, a crash or another exception."""
    (y,), (z,) = comp["strings"]
    ny, nz = y, z
    for h in how:
        if which in ("y", "both"):
            ny = _mutate(ny, h)
        if which in ("z", "both"):
            nz = _mutate(nz, h)
    if checksums:
        ny, nz = CodedStream.of(ny, y.index_crcs), CodedStream.of(nz, z.index_crcs)
    t0 = time.perf_counter()
    try:
        out = model.decompress([[ny], [nz]], comp["shape"], image_size=comp["image_size"])
        assert out["x_hat"].shape == (1, 3, 128, 128)  # a mutation the decoder tolerates (e.g. appended words)
    except BitstreamError:
        pass
    assert time.perf_counter() - t0 < 20


@pytest.fixture(scope="module")
def monkeypatch_timeout():
    old = coder.TIMEOUT_S
    coder.TIMEOUT_S = 5.0  # a worker that hangs is given up on after 5 s (+ per-symbol allowance)
    yield
    coder.TIMEOUT_S = old


# ---------------------------------------------------------------- headers
def make_file(name=b"phase2", overrides=b"", H=128, W=128, zh=2, zw=2, n=1, threads=1, env=b"device=cpu",
              steps=(11, 1), y=bytes(8), z=bytes(8), version=2) -> bytes:
    """A .hpcm file with any header fields and valid CRCs (what an attacker can write)."""
    head = bitstream.MAGIC + struct.pack("<BB", version, len(name)) + name + struct.pack("<H", len(overrides))
    head += overrides + bitstream._FIXED.pack(b"\0" * 8, b"\0" * 8, H, W, zh, zw, n)
    if version >= 2:
        head += struct.pack("<HB", threads, len(env)) + env
    for _ in range(n):
        head += bitstream._PER_IMAGE.pack(len(y), zlib.crc32(y), len(z), zlib.crc32(z))
        if version >= 2:
            head += struct.pack(f"<BB{sum(steps)}H", *steps, *([0] * sum(steps)))
    return head + struct.pack("<I", zlib.crc32(head)) + (y + z) * n


def test_make_file_builds_what_the_reader_accepts():
    info = bitstream.from_bytes(make_file())
    assert info["model"] == "phase2" and info["image_size"] == (128, 128) and info["threads"] == 1


@pytest.mark.parametrize("fields, match", [
    (dict(name=b"phase9"), "unknown model"),
    (dict(overrides=b'{"M": 32768}'), "M=32768 is outside"),
    (dict(overrides=b'{"N": 100000}'), "N=100000 is outside"),
    (dict(overrides=b'{"M": "32"}'), "unusable"),
    (dict(overrides=b'{"M": true}'), "unusable"),
    (dict(overrides=b'{"transform_widths": [16, 24]}'), "transform_widths"),
    (dict(overrides=b'{"transform_widths": [16, 24, 100000]}'), "transform_widths"),
    (dict(overrides=b'{"ga_blocks": [2, 2, 4000]}'), "ga_blocks"),
    (dict(overrides=b'{"cells": ["attention", "attention", "attention"]}'), "not phase2's"),
    (dict(name=b"phase4", overrides=b'{"rwkv_prior_s3_blocks": [2, 5000]}'), "rwkv_prior_s3_blocks"),
    (dict(name=b"phase4", overrides=b'{"rwkv_prior_s1_s2_blocks": [4000, 1]}'), "rwkv_prior_s1_s2_blocks"),
    (dict(overrides=b'{"nonsense": 1}'), "unknown config fields"),
    (dict(overrides=b"[" * 30000 + b"]" * 30000), "unusable"),
    (dict(overrides=b"\xff\xfe"), "unusable"),
    (dict(H=16384, W=16384, zh=128, zw=128), "more than the limit"),
    (dict(H=100000, W=64), "image size"),
    (dict(H=10, W=128), "image size"),
    (dict(zh=3), "z shape 3×2"),
    (dict(n=0), "0 images"),
    (dict(n=65), "65 images"),
    (dict(threads=0), "thread count 0"),
    (dict(threads=60000), "thread count 60000"),
    (dict(steps=(200, 1)), "200 y and 1 z coding steps"),
])
def test_header_fields_are_validated(fields, match):
    t0 = time.perf_counter()
    with pytest.raises(BitstreamError, match=match):
        bitstream.from_bytes(make_file(**fields))
    assert time.perf_counter() - t0 < 5


def test_environment_text_is_printable():
    env = bitstream.from_bytes(make_file(env=b"device=cpu;gpu=\x1b[2Jevil\x07;torch=\xff"))["encoder"]
    assert env == {"device": "cpu", "gpu": "?[2Jevil?", "torch": "?"}


def test_pixel_cap_can_be_raised():
    data = make_file(H=8192, W=8192, zh=128, zw=128)
    with pytest.raises(BitstreamError, match="--max-pixels"):
        bitstream.from_bytes(data)
    assert bitstream.from_bytes(data, max_pixels=8192 * 8192)["image_size"] == (8192, 8192)


_PEAK = r"""
import resource, subprocess, sys
r = subprocess.run([sys.executable, "-m", "hpcm_triton", "decompress", sys.argv[1], "-o", sys.argv[2]],
                   capture_output=True, text=True, timeout=300,
                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (6 << 30, 6 << 30)))
print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.stderr.write(r.stderr)
"""


@pytest.mark.parametrize("kind", ["M=32768", "16384²"])
def test_memory_bomb_is_refused_with_small_peak(kind, tmp_path):
    """Issue 9: a 1.2 KB file asking for M = 32768 drove decompress to 18.8 GB; headers
    claiming a 16384² image likewise. Refused before any model is built: peak RSS < 1 GB."""
    # format version 1: what the reader before this fix parsed (and built a model from)
    if kind == "M=32768":
        data = make_file(overrides=json.dumps({"M": 32768, "N": 32}).encode(), y=bytes(600), z=bytes(600), version=1)
    else:
        data = make_file(name=b"hpcm-base", H=16384, W=16384, zh=256, zw=256, y=bytes(600), z=bytes(600),
                         version=1)
    path = tmp_path / "bomb.hpcm"
    path.write_bytes(data)
    assert len(data) < 1400
    r = subprocess.run([sys.executable, "-c", _PEAK, str(path), str(tmp_path / "out.png")], capture_output=True,
                       text=True, env=ENV, timeout=400)
    rc, peak_kb = map(int, r.stdout.split())
    assert rc == 2, r.stderr
    _one_line(r.stderr)
    print(f"{kind}: peak RSS {peak_kb / 1024:.0f} MB")
    assert peak_kb < 1 << 20, f"peak {peak_kb / 1024:.0f} MB"
    assert not (tmp_path / "out.png").exists()


def test_info_on_a_file_builds_no_model(tmp_path):
    # the memory-bomb header is described, not built (max_pixels does not apply to info)
    path = tmp_path / "big.hpcm"
    path.write_bytes(make_file(name=b"hpcm-base", H=16384, W=16384, zh=256, zw=256))
    r = _cli("info", path)
    assert r.returncode == 0, r.stderr
    assert "16384×16384" in r.stdout and "hpcm-base" in r.stdout and "z shape" in r.stdout
