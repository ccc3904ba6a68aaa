"""Any bit depth and pixel mode loads correctly or is refused, and a conversion is said once."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from hpcm_triton import cli
from hpcm_triton import images as im


def _png16(path, a: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour)."""
    h, w = a.shape[:2]
    rows = b"".join(b"\0" + a[i].astype(">u2").tobytes() for i in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


def test_16bit_grey_is_scaled_from_65535(tmp_path, rng):
    a = (rng.random((70, 90)) * 65535).astype(np.uint16)
    _png16(tmp_path / "g16.png", a, 0)
    notes = []
    x = im.load_image(tmp_path / "g16.png", report=notes.append)
    assert x.shape == (1, 3, 70, 90) and x.is_contiguous()
    ref = a.astype(np.float64) / 65535  # issue 9: this image came out solid white (min = max = 1.0)
    np.testing.assert_allclose(x[0, 0].double().numpy(), ref, atol=1e-6)
    assert abs(x.mean().item() - ref.mean()) < 1e-5 and x.min() < 0.01 and x.max() > 0.99
    assert len(notes) == 1 and "16-bit" in notes[0]


def test_16bit_colour_keeps_its_scale(tmp_path, rng):
    a = (rng.random((40, 50, 3)) * 65535).astype(np.uint16)
    _png16(tmp_path / "c16.png", a, 2)
    notes = []
    x = im.load_image(tmp_path / "c16.png", report=notes.append)
    # all 16 bits are kept (float32 rounding only), not 8 of them
    np.testing.assert_allclose(x[0].permute(1, 2, 0).double().numpy(), a / 65535, atol=1e-7)
    assert len(notes) == 1 and "16-bit colour" in notes[0] and "8-bit RGB" in notes[0]


@pytest.mark.parametrize("mode, note", [("RGBA", "alpha channel dropped"), ("LA", "alpha channel dropped"),
                                        ("P", "palette"), ("CMYK", "CMYK"), ("1", "1-bit"), ("L", None),
                                        ("RGB", None)])
def test_modes_are_converted_and_said_once(tmp_path, rng, mode, note):
    rgb = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
    src = Image.fromarray(rgb, "RGB")
    img = src.convert(mode) if mode != "RGBA" else Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA")
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    notes = []
    x = im.load_image(path, report=notes.append)
    assert x.shape == (1, 3, 40, 50) and 0 <= x.min() and x.max() <= 1
    if note is None:
        assert notes == []
    else:
        assert len(notes) == 1 and note in notes[0]
    if mode == "RGBA":  # the colour values are kept, only alpha goes
        assert np.array_equal(im.to_uint8(x)[0].permute(1, 2, 0).numpy(), rgb)


def test_float_and_wide_integer_images(tmp_path):
    ok = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(ok, "F").save(tmp_path / "f.tiff")
    x = im.load_image(tmp_path / "f.tiff")
    np.testing.assert_allclose(x[0, 1].numpy(), ok)
    Image.fromarray(ok * 7, "F").save(tmp_path / "bad.tiff")
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        im.load_image(tmp_path / "bad.tiff")
    Image.fromarray(np.full((64, 64), 1 << 20, np.int32), "I").save(tmp_path / "i32.tiff")
    with pytest.raises(ValueError, match="outside 0..65535"):
        im.load_image(tmp_path / "i32.tiff")


def test_compress_says_the_conversion_once_on_stderr(tmp_path, rng, capsys):
    a = (rng.random((64, 64)) * 65535).astype(np.uint16)
    _png16(tmp_path / "g16.png", a, 0)
    assert cli.main(["compress", str(tmp_path / "g16.png"), "-o", str(tmp_path / "g.hpcm"), "--size", "tiny",
                     "--model", "phase2"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == ["hpcm-triton: note: g16.png: 16-bit greyscale, scaled from 0..65535; the decoded image will be "
                   "8-bit RGB"]
