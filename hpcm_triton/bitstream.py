"""The ``.hpcm`` file container for compressed images.

Layout (little-endian), version 1::

    magic            4s   b"HPCM"
    version          u8   1
    name_len         u8   then the model name (ascii), e.g. b"phase3"
    overrides_len    u16  then JSON of the config fields that differ from the named preset
                          (empty for the official widths; lets a reader rebuild the model)
    config_fp        8s   sha256(canonical JSON of the full config)[:8]
    weights_fp       8s   sha256(CDF tables + every parameter's bytes)[:8]
    H, W             u32  original image size (the decoder crops to it)
    zh, zw           u32  z's spatial shape
    n_images         u16  then per image: y_len u32, y_crc32 u32, z_len u32, z_crc32 u32
    header_crc32     u32  of every byte above
    payload               per image: y bytes, then z bytes; nothing after

The fingerprints make a file from another model, configuration or set of weights fail with a
clear message instead of decoding to garbage (rANS would happily decode noise). The CRCs
catch storage corruption before the decoder sees it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import torch

from .entropy import BitstreamError
from .models.config import PRESETS, HPCMConfig
from .models.hpcm import TABLE_BUFFERS

MAGIC = b"HPCM"
VERSION = 1
_FIXED = struct.Struct("<8s8sIIIIH")   # config_fp, weights_fp, H, W, zh, zw, n_images
_PER_IMAGE = struct.Struct("<IIII")    # y_len, y_crc, z_len, z_crc


# ---------------------------------------------------------------- configs and fingerprints
def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def config_overrides(name: str, config: HPCMConfig) -> dict:
    """The fields of ``config`` that differ from the preset ``name`` (JSON-ready)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(PRESETS)}")
    base = dataclasses.asdict(PRESETS[name])
    return _jsonable({k: v for k, v in dataclasses.asdict(config).items() if base[k] != v})


def config_from(name: str, overrides: dict) -> HPCMConfig:
    """Inverse of :func:`config_overrides` (JSON lists become tuples again)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(PRESETS)}")
    known = HPCMConfig.json_fields(overrides)
    bad = set(overrides) - set(known)
    if bad:
        raise ValueError(f"unknown config fields {sorted(bad)}")
    return PRESETS[name].with_(**known)


def config_fingerprint(config: HPCMConfig) -> bytes:
    """8 bytes identifying a configuration (``use_checkpoint`` excluded: it does not change the math)."""
    d = _jsonable(dataclasses.asdict(config))
    d.pop("use_checkpoint", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).digest()[:8]


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> bytes:
    """8 bytes identifying the weights: the CDF tables plus every parameter's float32 bytes.

    Exact bytes, not float sums, so the value does not depend on the device's reduction order.
    """
    h = hashlib.sha256()
    for name in TABLE_BUFFERS:
        t = getattr(model, name, None)
        if t is not None:
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.digest()[:8]


# ---------------------------------------------------------------- encoding
def to_bytes(model_name: str, model, compressed: dict) -> bytes:
    """Serialize ``model.compress(x)``'s output into the container format."""
    name = model_name.lower()
    if name not in PRESETS:
        raise ValueError(f"unknown model {model_name!r}; choose from {', '.join(PRESETS)}")
    if not getattr(model, "quantized_cdf_y", torch.empty(0)).numel():
        raise ValueError("the model has no CDF tables: call model.update() before compress/write")
    y_strings, z_strings = compressed["strings"]
    if len(y_strings) != len(z_strings) or not y_strings:
        raise ValueError("compressed['strings'] must be [y_strings, z_strings] with one entry per image")
    zh, zw = (int(v) for v in compressed["shape"])
    H, W = (int(v) for v in (compressed.get("image_size") or (64 * zh, 64 * zw)))
    overrides = json.dumps(config_overrides(name, model.config), separators=(",", ":"), sort_keys=True).encode()
    if len(overrides) > 0xFFFF:
        raise ValueError("config overrides too large for the header")
    head = io.BytesIO()
    head.write(MAGIC)
    head.write(struct.pack("<BB", VERSION, len(name)))
    head.write(name.encode("ascii"))
    head.write(struct.pack("<H", len(overrides)))
    head.write(overrides)
    head.write(_FIXED.pack(config_fingerprint(model.config), weights_fingerprint(model), H, W, zh, zw,
                           len(y_strings)))
    for y, z in zip(y_strings, z_strings):
        head.write(_PER_IMAGE.pack(len(y), zlib.crc32(y), len(z), zlib.crc32(z)))
    header = head.getvalue()
    payload = b"".join(bytes(y) + bytes(z) for y, z in zip(y_strings, z_strings))
    return header + struct.pack("<I", zlib.crc32(header)) + payload


def write(dest, model_name: str, model, compressed: dict) -> int:
    """Write a ``.hpcm`` file (a path: atomically via a temp file + rename; or a binary file
    object). Returns the number of bytes written."""
    data = to_bytes(model_name, model, compressed)
    if hasattr(dest, "write"):
        dest.write(data)
    else:
        from .outputs import atomic_write_bytes

        atomic_write_bytes(dest, data)
    return len(data)


# ---------------------------------------------------------------- decoding
class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise BitstreamError(f"truncated file: it ends inside the {what} "
                                 f"(needs {self.pos + n} bytes, has {len(self.data)})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct | str, what: str):
        st = struct.Struct(st) if isinstance(st, str) else st
        return st.unpack(self.take(st.size, what))


def from_bytes(data: bytes) -> dict:
    """Parse a container → {"model", "config", "config_fingerprint", "weights_fingerprint",
    "strings": [[y…], [z…]], "shape": (zh, zw), "image_size": (H, W), "version", "header_bytes"}.

    Raises :class:`~hpcm_triton.BitstreamError` for anything that is not an intact file.
    """
    data = bytes(data)
    r = _Reader(data)
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise BitstreamError(f"not an HPCM file (magic bytes {data[:4]!r}, expected {MAGIC!r})")
    r.take(len(MAGIC), "magic")
    version, name_len = r.unpack("<BB", "header")
    if version != VERSION:
        raise BitstreamError(f"unsupported HPCM file format version {version} (this reader knows {VERSION})")
    raw_name = r.take(name_len, "model name")
    (ov_len,) = r.unpack("<H", "header")
    raw_ov = r.take(ov_len, "config")
    cfp, wfp, H, W, zh, zw, n = r.unpack(_FIXED, "header")
    per = [r.unpack(_PER_IMAGE, "stream table") for _ in range(n)]
    header_end = r.pos
    (hcrc,) = r.unpack("<I", "header checksum")
    if zlib.crc32(data[:header_end]) != hcrc:
        raise BitstreamError("corrupted file: header CRC32 mismatch")
    name = raw_name.decode("ascii", "replace")
    try:
        config = config_from(name, json.loads(raw_ov.decode()) if raw_ov else {})
    except (ValueError, TypeError) as e:
        raise BitstreamError(f"file header names an unusable model/config ({name!r}): {e}") from None
    if n == 0 or min(H, W, zh, zw) == 0:
        raise BitstreamError(f"file header is inconsistent (images={n}, size={H}×{W}, z={zh}×{zw})")
    y_strings, z_strings = [], []
    for i, (yl, ycrc, zl, zcrc) in enumerate(per):
        for kind, ln, crc, out in (("y", yl, ycrc, y_strings), ("z", zl, zcrc, z_strings)):
            s = r.take(ln, f"{kind} stream of image {i}")
            if zlib.crc32(s) != crc:
                raise BitstreamError(f"corrupted file: CRC32 mismatch in the {kind} stream of image {i}")
            out.append(s)
    if r.pos != len(data):
        raise BitstreamError(f"corrupted file: {len(data) - r.pos} unexpected bytes after the last stream")
    return {"model": name, "config": config, "config_fingerprint": cfp, "weights_fingerprint": wfp,
            "strings": [y_strings, z_strings], "shape": (zh, zw), "image_size": (H, W), "version": version,
            "header_bytes": header_end + 4}


def read(src, model=None, model_name: str | None = None) -> dict:
    """Read a ``.hpcm`` file (path or binary file object) → see :func:`from_bytes`.

    With ``model`` (and optionally ``model_name``), also :func:`check` that it can decode the file.
    """
    if hasattr(src, "read"):
        data = src.read()
    else:
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        data = path.read_bytes()
    info = from_bytes(data)
    if model is not None:
        check(info, model, model_name)
    return info


def check(info: dict, model, model_name: str | None = None) -> None:
    """Raise :class:`~hpcm_triton.BitstreamError` unless ``model`` is the one that wrote ``info``."""
    if model_name is not None and model_name.lower() != info["model"]:
        raise BitstreamError(f"file was written by model {info['model']!r}, not {model_name.lower()!r}")
    if config_fingerprint(model.config) != info["config_fingerprint"]:
        raise BitstreamError(f"file was written by {info['model']!r} with a different configuration "
                             f"(file config {info['config_fingerprint'].hex()}, "
                             f"model config {config_fingerprint(model.config).hex()})")
    if weights_fingerprint(model) != info["weights_fingerprint"]:
        raise BitstreamError(f"file was written by {info['model']!r} with different weights or CDF tables "
                             f"(file {info['weights_fingerprint'].hex()}, model {weights_fingerprint(model).hex()}); "
                             "use the same checkpoint that compressed it")


def decode(src, model, model_name: str | None = None) -> torch.Tensor:
    """Read, check and decompress a file with ``model`` → x_hat (B, 3, H, W)."""
    info = read(src, model, model_name)
    return model.decompress(info["strings"], info["shape"], image_size=info["image_size"])["x_hat"]
