"""The .hpcm container: round trip, and every kind of damaged or foreign file is refused clearly."""
from __future__ import annotations

import io
import os
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcm_triton import BitstreamError, bitstream
from hpcm_triton import images as im
from hpcm_triton.models import TINY
from hpcm_triton.models.config import PRESETS
from hpcm_triton.models.seeded import seeded_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small():
    return im.bundled("chelsea")[..., 60:188, 100:292].contiguous()  # (1, 3, 128, 192)


@pytest.fixture(scope="module")
def model():
    return seeded_model("phase3", "tiny")


@pytest.fixture(scope="module")
def comp(model, small):
    return model.compress(small)


@pytest.fixture(scope="module")
def data(model, comp):
    return bitstream.to_bytes("phase3", model, comp)


def test_round_trip_path(tmp_path, model, comp, small):
    path = tmp_path / "a.hpcm"
    n = bitstream.write(path, "phase3", model, comp)
    assert n == os.path.getsize(path)
    assert os.listdir(tmp_path) == ["a.hpcm"]  # the temp file was renamed, not left behind
    info = bitstream.read(path, model, "phase3")
    assert info["model"] == "phase3"
    assert info["strings"] == [[bytes(s) for s in comp["strings"][0]], [bytes(s) for s in comp["strings"][1]]]
    assert info["shape"] == tuple(comp["shape"]) and info["image_size"] == (128, 192)
    assert info["config"] == model.config
    # header overhead is small next to the payload
    assert info["header_bytes"] == n - sum(len(s) for ss in info["strings"] for s in ss)
    assert info["header_bytes"] < 320  # TINY config overrides, encoder environment, 11 × 8 bytes of step checks
    x_file = bitstream.decode(path, model, "phase3")
    x_mem = model.decompress(comp)["x_hat"]
    assert x_file.shape == small.shape and torch.equal(x_file, x_mem)


def test_round_trip_fileobj(model, comp, data):
    buf = io.BytesIO()
    bitstream.write(buf, "phase3", model, comp)
    assert buf.getvalue() == data
    buf.seek(0)
    assert bitstream.read(buf)["strings"][0][0] == comp["strings"][0][0]


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("tiny", [False, True])
def test_config_overrides_round_trip(name, tiny):
    cfg = PRESETS[name].with_(**TINY) if tiny else PRESETS[name]
    ov = bitstream.config_overrides(name, cfg)
    assert (ov == {}) == (not tiny)
    assert bitstream.config_from(name, ov) == cfg


@pytest.mark.parametrize("cut", [1, 4, 17, 30, 60])
def test_truncated(data, cut):
    with pytest.raises(BitstreamError, match="truncated"):
        bitstream.from_bytes(data[:-cut] if cut < 60 else data[:cut])


def test_empty_and_wrong_magic(data):
    with pytest.raises(BitstreamError, match="not an HPCM file"):
        bitstream.from_bytes(b"")
    with pytest.raises(BitstreamError, match="not an HPCM file"):
        bitstream.from_bytes(b"\x89PNG" + data[4:])


def test_flipped_payload_byte(data):
    bad = bytearray(data)
    bad[-5] ^= 0x10
    with pytest.raises(BitstreamError, match="CRC32 mismatch in the (y|z) stream"):
        bitstream.from_bytes(bytes(bad))


def test_flipped_header_byte(data):
    bad = bytearray(data)
    bad[-len(data) + 30] ^= 0x01  # inside the fingerprints/sizes
    with pytest.raises(BitstreamError, match="header CRC32"):
        bitstream.from_bytes(bytes(bad))


def test_unknown_version(data):
    bad = bytearray(data)
    bad[4] = 9
    with pytest.raises(BitstreamError, match="unsupported .* version 9"):
        bitstream.from_bytes(bytes(bad))


def test_trailing_bytes(data):
    with pytest.raises(BitstreamError, match="unexpected bytes"):
        bitstream.from_bytes(data + b"\0")


@settings(max_examples=60, deadline=None)
@given(draw=st.data())
def test_any_single_byte_corruption_is_refused(data, draw):
    i = draw.draw(st.integers(0, len(data) - 1), label="offset")
    x = draw.draw(st.integers(1, 255), label="xor")
    bad = bytearray(data)
    bad[i] ^= x
    with pytest.raises(BitstreamError):
        bitstream.from_bytes(bytes(bad))


def test_other_model_refused(data):
    info = bitstream.from_bytes(data)
    other = seeded_model("phase2", "tiny")
    with pytest.raises(BitstreamError, match="written by model 'phase3', not 'phase2'"):
        bitstream.check(info, other, "phase2")
    # without the name, phase2's different config is still caught
    with pytest.raises(BitstreamError, match="different configuration"):
        bitstream.check(info, other)


def test_other_config_refused(data):
    info = bitstream.from_bytes(data)
    other = seeded_model("phase3", "tiny", M=40)
    with pytest.raises(BitstreamError, match="different configuration"):
        bitstream.check(info, other, "phase3")


def test_other_weights_refused(data):
    info = bitstream.from_bytes(data)
    other = seeded_model("phase3", "tiny")
    with torch.no_grad():
        next(other.g_s.parameters()).view(-1)[0] += 1e-3  # decoder-only change: the CDF tables are unchanged
    with pytest.raises(BitstreamError, match="different weights"):
        bitstream.check(info, other, "phase3")
    bitstream.check(info, seeded_model("phase3", "tiny"), "phase3")  # a fresh seeded build matches


def test_no_partial_file_on_failure(tmp_path, comp):
    path = tmp_path / "out.hpcm"
    untabled = seeded_model("phase3", "tiny")
    untabled.quantized_cdf_y = torch.empty(0, dtype=torch.int32)
    with pytest.raises(ValueError, match="update"):
        bitstream.write(path, "phase3", untabled, comp)
    assert os.listdir(tmp_path) == []


def test_header_layout_is_documented(data):
    # magic, version, then the name: the fixed prefix of the layout in the module docstring
    assert data[:4] == b"HPCM" and data[4] == bitstream.VERSION
    n = data[5]
    assert data[6:6 + n] == b"phase3"
    (ov_len,) = struct.unpack("<H", data[6 + n:8 + n])
    assert ov_len > 0  # TINY widths are recorded so a reader can rebuild the model


def test_images_are_contiguous_nchw(tmp_path):
    # a channels-last view makes forward and decompress round differently in g_s (see images.from_uint8)
    x = im.bundled("chelsea")
    assert x.shape == (1, 3, 300, 451) and x.is_contiguous() and x.dtype == torch.float32
    im.save_image(x, tmp_path / "c.png")
    y = im.load_image(tmp_path / "c.png")
    assert y.is_contiguous() and torch.equal(x, y)
