"""The ``.hpcm`` file container for compressed images (docs/bitstream.md has every version).

Layout (little-endian), version 3::

    magic            4s   b"HPCM"
    version          u8   3
    name_len         u8   then the model name (ascii), e.g. b"phase3"
    overrides_len    u16  then JSON of the config fields that differ from the named preset
                          (empty for the official widths; lets a reader rebuild the model)
    config_fp        8s   sha256(canonical JSON of the full config)[:8]
    weights_fp       8s   sha256(CDF tables + every parameter's bytes)[:8]
    H, W             u32  original image size (the decoder crops to it)
    zh, zw           u32  z's spatial shape
    n_images         u16
    threads          u16  the CPU thread count the encoder ran with (information)
    env_len          u8   then the encoder's environment (ascii ``key=value;…``: device, cpu
                          instruction set or gpu name, Bi-WKV4 backend, torch and compressai
                          versions; information)
    per image        y_len u32, y_crc32 u32, z_len u32, z_crc32 u32,
                     y_steps u8 (11), z_steps u8 (0), then one u64 per y step: the check of
                     that step's CDF indexes (:func:`hpcm_triton.entropy.checks.index_check`)
    header_crc32     u32  of every byte above
    payload               per image: y bytes, then z bytes; nothing after

Version 2 (read, decoded as it was written) has one u16 per y and z step instead, the low 16
bits of a CRC32 of the step's indexes, and its decoder runs with the encoder's thread count.
Version 1 (read) lacks threads, env and the per-step checks.

What a decoder must share with the encoder, and how each is checked:

* the model name, configuration and weights, CDF tables included: the fingerprints (checked
  before decoding; the tables are the same on every machine, docs/bitstream.md §3);
* the symbols: every y step's CDF indexes are checked before the step is decoded; where this
  machine's floats put a few scales on the other side of a table boundary, the flipped
  indexes are found by a bounded search (docs/bitstream.md §4), and a step the search cannot
  repair ends in a :class:`ParameterMismatchError` naming what differs between the two
  environments;
* nothing else: any thread count, CPU instruction set, Bi-WKV4 backend or device decodes the
  same symbols, and pixels within one level of the encoder's own reconstruction.

Every header field is validated against what this library writes before anything is
allocated: a known variant whose configuration lies within :data:`CONFIG_BOUNDS`, an image
no larger than ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`), a z shape that matches
the image size, and the schedule's step counts. The fingerprints make a file from another
model, configuration or set of weights fail with a clear message instead of decoding to
garbage (rANS would happily decode noise). The CRCs catch storage corruption before the
decoder sees it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

from .defaults import DEFAULT_MAX_PIXELS
from .entropy import checks
from .entropy.coder import BitstreamError, CodedStream, ParameterMismatchError
from .models.config import PRESETS, TABLE_BUFFERS, HPCMConfig

# torch is imported inside the functions that need it: reading and validating a header must
# not cost the ~0.9 GB that importing torch (a CUDA build) does.

MAGIC = b"HPCM"
VERSION = 3
VERSIONS = (1, 2, 3)                   # what this reader reads
_FIXED = struct.Struct("<8s8sIIIIH")   # config_fp, weights_fp, H, W, zh, zw, n_images
_PER_IMAGE = struct.Struct("<IIII")    # y_len, y_crc, z_len, z_crc
_STEPS = {"y": 11, "z": 1}             # chunks per stream: HPCM's 11 coding steps; z in one
# Checked steps per stream in version 3: z's indexes are its channel numbers, not computed.
_CHECKED = {"y": 11, "z": 0}

MAX_SIDE = 1 << 16
MAX_IMAGES = 64

# What a file's configuration may say (a reader builds the model it describes): the structure
# (cells, fusion, prior) of the named variant, widths up to the official ones and depths up to
# twice HPCM-Large's. (lo, hi) per integer; a tuple field gives (length, lo, hi).
CONFIG_BOUNDS = {
    "M": (8, 320), "N": (8, 256), "transform_widths": (3, 4, 384), "ga_blocks": (3, 0, 16),
    "gs_blocks": (3, 0, 16), "prior_s1_s2_blocks": (2, 0, 8), "prior_s3_blocks": (2, 0, 8),
    "attention_windows": (3, 1, 16), "attention_heads": (1, 64), "rwkv_rates": (3, 1, 8),
    "rwkv_prior_s1_s2_blocks": (2, 0, 8), "rwkv_prior_s3_blocks": (2, 0, 8),
}
_STRUCTURE = ("cells", "fusion", "prior")


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
    if not isinstance(overrides, dict):
        raise ValueError(f"config overrides must be a JSON object, got {type(overrides).__name__}")
    known = HPCMConfig.json_fields(overrides)
    bad = set(overrides) - set(known)
    if bad:
        raise ValueError(f"unknown config fields {sorted(bad)}")
    return PRESETS[name].with_(**known)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config(name: str, config: HPCMConfig) -> None:
    """Raise ValueError unless ``config`` is one this library writes and reads for ``name``:
    the variant's own structure and every size within :data:`CONFIG_BOUNDS`."""
    preset = PRESETS[name]
    for f in _STRUCTURE:
        if getattr(config, f) != getattr(preset, f):
            raise ValueError(f"{f}={getattr(config, f)!r} is not {name}'s ({getattr(preset, f)!r})")
    for f, b in CONFIG_BOUNDS.items():
        v = getattr(config, f)
        if len(b) == 3:
            n, lo, hi = b
            ok = isinstance(v, tuple) and len(v) == n and all(_is_int(e) and lo <= e <= hi for e in v)
            want = f"{n} integers in [{lo}, {hi}]"
        else:
            lo, hi = b
            ok = _is_int(v) and lo <= v <= hi
            want = f"an integer in [{lo}, {hi}]"
        if not ok:
            raise ValueError(f"{f}={v!r} is outside what this library supports ({want})")
    if config.M % 8:
        raise ValueError(f"M={config.M} is not a multiple of 8")
    if not isinstance(config.use_checkpoint, bool):
        raise ValueError(f"use_checkpoint={config.use_checkpoint!r} is not a boolean")


def z_shape(config: HPCMConfig, H: int, W: int) -> tuple[int, int]:
    """z's (h, w) for an H×W image: the image padded to ``config.pad_multiple``, over 64."""
    m = config.pad_multiple
    return -(-H // m) * m // 64, -(-W // m) * m // 64


def config_fingerprint(config: HPCMConfig) -> bytes:
    """8 bytes identifying a configuration (``use_checkpoint`` excluded: it does not change the math)."""
    d = _jsonable(dataclasses.asdict(config))
    d.pop("use_checkpoint", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).digest()[:8]


def weights_fingerprint(model) -> bytes:
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
def _env_bytes(env: dict) -> bytes:
    from .coding_env import RECORDED

    items = [f"{k}={env[k]}" for k in RECORDED if env.get(k) is not None]
    raw = ";".join(i.replace(";", ",") for i in items).encode("ascii", "replace")
    return raw[:255]


def _env_from(raw: bytes) -> dict:
    # printable ASCII only: these strings end up in error messages and on terminals
    text = "".join(c if " " <= c <= "~" else "?" for c in raw.decode("ascii", "replace"))
    env = {}
    for item in text.split(";"):
        if "=" in item:
            k, v = item.split("=", 1)
            env[k] = v
    return env


def _step_checks(stream, kind: str) -> list[int]:
    found = list(getattr(stream, "index_checks", ()))
    if len(found) != _STEPS[kind] or getattr(stream, "check_kind", None) != checks.WSUM62:
        raise ValueError(f"the {kind} stream has {len(found)} recorded coding steps, expected {_STEPS[kind]}: "
                         "pass model.compress(x)'s output as it is")
    return found[:_CHECKED[kind]]


def to_bytes(model_name: str, model, compressed: dict) -> bytes:
    """Serialize ``model.compress(x)``'s output into the container format."""
    import torch

    from .coding_env import environment

    name = model_name.lower()
    if name not in PRESETS:
        raise ValueError(f"unknown model {model_name!r}; choose from {', '.join(PRESETS)}")
    check_config(name, model.config)
    if not getattr(model, "quantized_cdf_y", torch.empty(0)).numel():
        raise ValueError("the model has no CDF tables: call model.update() before compress/write")
    y_strings, z_strings = compressed["strings"]
    if len(y_strings) != len(z_strings) or not y_strings or len(y_strings) > MAX_IMAGES:
        raise ValueError(f"compressed['strings'] must be [y_strings, z_strings] with one entry per image "
                         f"(1..{MAX_IMAGES} images)")
    zh, zw = (int(v) for v in compressed["shape"])
    H, W = (int(v) for v in (compressed.get("image_size") or (64 * zh, 64 * zw)))
    threads = compressed.get("threads") or torch.get_num_threads()
    env = environment(next(model.parameters()).device, threads, model)
    overrides = json.dumps(config_overrides(name, model.config), separators=(",", ":"), sort_keys=True).encode()
    if len(overrides) > 0xFFFF:
        raise ValueError("config overrides too large for the header")
    env_raw = _env_bytes(env)
    head = io.BytesIO()
    head.write(MAGIC)
    head.write(struct.pack("<BB", VERSION, len(name)))
    head.write(name.encode("ascii"))
    head.write(struct.pack("<H", len(overrides)))
    head.write(overrides)
    head.write(_FIXED.pack(config_fingerprint(model.config), weights_fingerprint(model), H, W, zh, zw,
                           len(y_strings)))
    head.write(struct.pack("<HB", int(threads), len(env_raw)))
    head.write(env_raw)
    for y, z in zip(y_strings, z_strings):
        ysteps, zsteps = _step_checks(y, "y"), _step_checks(z, "z")
        head.write(_PER_IMAGE.pack(len(y), zlib.crc32(y), len(z), zlib.crc32(z)))
        head.write(struct.pack(f"<BB{len(ysteps) + len(zsteps)}Q", len(ysteps), len(zsteps), *ysteps, *zsteps))
    header = head.getvalue()
    payload = b"".join(bytes(y) + bytes(z) for y, z in zip(y_strings, z_strings))
    return header + struct.pack("<I", zlib.crc32(header)) + payload


def write(dest, model_name: str, model, compressed: dict) -> int:
    """Write a ``.hpcm`` file (a path: atomically via a temp file + rename, with the umask's
    permissions; or a binary file object). Returns the number of bytes written."""
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


def _stream(data: bytes, step_checks, version: int) -> bytes:
    if not step_checks:
        return data
    return CodedStream.of(data, step_checks, checks.WSUM62 if version >= 3 else checks.CRC16)


def from_bytes(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict:
    """Parse a container → {"model", "config", "config_fingerprint", "weights_fingerprint",
    "strings": [[y…], [z…]], "shape": (zh, zw), "image_size": (H, W), "n_images", "threads",
    "encoder" (environment dict), "version", "header_bytes"}.

    Every header field is validated (see the module docstring) before anything is allocated;
    ``max_pixels`` bounds H·W·n_images (None: no bound). Raises
    :class:`~hpcm_triton.BitstreamError` for anything that is not an intact, decodable file.
    """
    data = bytes(data)
    r = _Reader(data)
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise BitstreamError(f"not an HPCM file (magic bytes {data[:4]!r}, expected {MAGIC!r})")
    r.take(len(MAGIC), "magic")
    version, name_len = r.unpack("<BB", "header")
    if version not in VERSIONS:
        raise BitstreamError(f"unsupported HPCM file format version {version} "
                             f"(this reader knows {', '.join(map(str, VERSIONS))})")
    raw_name = r.take(name_len, "model name")
    (ov_len,) = r.unpack("<H", "header")
    raw_ov = r.take(ov_len, "config")
    cfp, wfp, H, W, zh, zw, n = r.unpack(_FIXED, "header")
    threads, env = None, {}
    if version >= 2:
        threads, env_len = r.unpack("<HB", "header")
        env = _env_from(r.take(env_len, "encoder environment"))
    if not 1 <= n <= MAX_IMAGES:
        raise BitstreamError(f"file header is inconsistent: {n} images (this library writes 1..{MAX_IMAGES})")
    per, steps = [], []
    for _ in range(n):
        per.append(r.unpack(_PER_IMAGE, "stream table"))
        if version >= 2:
            ny, nz = r.unpack("<BB", "stream table")
            want = (_CHECKED["y"], _CHECKED["z"]) if version >= 3 else (_STEPS["y"], _STEPS["z"])
            if (ny, nz) != want:
                raise BitstreamError(f"file header is inconsistent: {ny} y and {nz} z coding steps checked "
                                     f"(version {version} files check {want[0]} and {want[1]})")
            found = r.unpack(f"<{ny + nz}{'Q' if version >= 3 else 'H'}", "stream table")
            steps.append((found[:ny], found[ny:]))
        else:
            steps.append(((), ()))
    header_end = r.pos
    (hcrc,) = r.unpack("<I", "header checksum")
    if zlib.crc32(data[:header_end]) != hcrc:
        raise BitstreamError("corrupted file: header CRC32 mismatch")
    # ---- validate every field before anything is built or allocated
    name = raw_name.decode("ascii", "replace")
    try:
        if name not in PRESETS:
            raise ValueError(f"unknown model; this library writes {', '.join(PRESETS)}")
        config = config_from(name, json.loads(raw_ov.decode()) if raw_ov else {})
        check_config(name, config)
    except (ValueError, TypeError, RecursionError, UnicodeDecodeError) as e:
        raise BitstreamError(f"file header names an unusable model/config ({name[:40]!r}): {e}") from None
    if threads is not None and not 1 <= threads <= 256:
        raise BitstreamError(f"file header is inconsistent: encoder thread count {threads} (1..256)")
    if not (64 <= H < MAX_SIDE and 64 <= W < MAX_SIDE):
        raise BitstreamError(f"file header is inconsistent: image size {H}×{W} "
                             f"(this library writes 64..{MAX_SIDE - 1} per side)")
    if max_pixels is not None and n * H * W > max_pixels:
        raise BitstreamError(f"file claims {n} image(s) of {H}×{W} = {n * H * W:,} pixels, more than the limit of "
                             f"{max_pixels:,} (pass --max-pixels to allow it)")
    if (zh, zw) != z_shape(config, H, W):
        raise BitstreamError(f"file header is inconsistent: z shape {zh}×{zw} for a {H}×{W} image "
                             f"({name} writes {z_shape(config, H, W)})")
    y_strings, z_strings = [], []
    for i, ((yl, ycrc, zl, zcrc), (ysteps, zsteps)) in enumerate(zip(per, steps)):
        for kind, ln, crc, st, out in (("y", yl, ycrc, ysteps, y_strings), ("z", zl, zcrc, zsteps, z_strings)):
            s = r.take(ln, f"{kind} stream of image {i}")
            if zlib.crc32(s) != crc:
                raise BitstreamError(f"corrupted file: CRC32 mismatch in the {kind} stream of image {i}")
            out.append(_stream(s, st, version))
    if r.pos != len(data):
        raise BitstreamError(f"corrupted file: {len(data) - r.pos} unexpected bytes after the last stream")
    return {"model": name, "config": config, "config_fingerprint": cfp, "weights_fingerprint": wfp,
            "strings": [y_strings, z_strings], "shape": (zh, zw), "image_size": (H, W), "n_images": n,
            "threads": threads, "encoder": env, "version": version, "header_bytes": header_end + 4}


def read(src, model=None, model_name: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict:
    """Read a ``.hpcm`` file (path or binary file object) → see :func:`from_bytes`.

    With ``model`` (and optionally ``model_name``), also :func:`check` that it can decode the file.
    """
    if hasattr(src, "read"):
        data = src.read()
    else:
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file" + (" (it is a directory)" if path.is_dir() else ""))
        data = path.read_bytes()
    info = from_bytes(data, max_pixels=max_pixels)
    if model is not None:
        check(info, model, model_name)
    return info


def check(info: dict, model, model_name: str | None = None) -> None:
    """Raise :class:`~hpcm_triton.BitstreamError` unless ``model`` is the one that wrote ``info``.

    Files of versions 1 and 2 were written with CDF tables rebuilt on loading and with the
    golden rule's seeded weights (docs/bitstream.md §3): for those, a model whose weights
    fingerprint does not match is first brought to what their writers used (tables rebuilt
    by ``update(force=True)``; a seeded model reseeded by the golden rule) and checked again,
    and left as it was if that does not match either.
    """
    if model_name is not None and model_name.lower() != info["model"]:
        raise BitstreamError(f"file was written by model {info['model']!r}, not {model_name.lower()!r}")
    if config_fingerprint(model.config) != info["config_fingerprint"]:
        raise BitstreamError(f"file was written by {info['model']!r} with a different configuration "
                             f"(file config {info['config_fingerprint'].hex()}, "
                             f"model config {config_fingerprint(model.config).hex()})")
    if weights_fingerprint(model) == info["weights_fingerprint"]:
        return
    if info["version"] < 3 and _as_older_writers(info, model):
        return
    raise BitstreamError(f"file was written by {info['model']!r} with different weights or CDF tables "
                         f"(file {info['weights_fingerprint'].hex()}, model {weights_fingerprint(model).hex()}); "
                         "use the same checkpoint that compressed it")


def _as_older_writers(info: dict, model) -> bool:
    """Try the ways versions 1 and 2 built a model (see :func:`check`); True once one matches."""
    from .models.seeded import reseed_

    saved = {name: getattr(model, name).clone() for name in TABLE_BUFFERS}
    model.update(force=True)
    if weights_fingerprint(model) == info["weights_fingerprint"]:
        return True
    rule = getattr(model, "seeded_rule", None)
    if rule == "portable":
        reseed_(model, "golden")
        if weights_fingerprint(model) == info["weights_fingerprint"]:
            return True
        reseed_(model, rule)
    for name, t in saved.items():
        setattr(model, name, t)
    model._tables = None
    return False


def decompress(info: dict, model, details: bool = False):
    """Decompress a parsed (and :func:`check`-ed) file with ``model`` → x_hat (B, 3, H, W), or
    with ``details`` a dict: ``x_hat``, ``flips`` (per image, the flipped CDF indexes repaired
    at each y coding step) and ``flips_total``.

    Version 3: any thread count (torch's current one), instruction set, Bi-WKV4 backend or
    device. Versions 1 and 2 are decoded as they were written: with the encoder's thread count,
    and without repairs. A step that cannot be repaired raises
    :class:`~hpcm_triton.entropy.coder.ParameterMismatchError` naming what differs between the
    encoder's recorded environment and this one.
    """
    from .coding_env import describe, differences, environment

    threads = info.get("threads") if info["version"] < 3 else None
    try:
        out = model.decompress(info["strings"], info["shape"], image_size=info["image_size"], threads=threads)
    except ParameterMismatchError as e:
        here = environment(next(model.parameters()).device, threads, model)
        diff = differences(info.get("encoder") or {}, here)
        if diff:
            why = "this machine computes different floats than the encoder's (" + "; ".join(diff) + ")"
            if info["version"] < 3:
                why += (f": a version-{info['version']} file decodes only where the encoder's arithmetic is "
                        f"reproduced; decode it on a machine like the encoder's ({describe(info['encoder'])})")
        else:
            why = (f"the encoder's recorded environment matches this one ({describe(here)}), so the stream was "
                   "altered after its checks were written, or this CPU/GPU rounds differently from the "
                   "encoder's of the same kind")
        raise ParameterMismatchError(f"{e}; {why}") from None
    if not details:
        return out["x_hat"]
    flips = out.get("flips", [])
    return {"x_hat": out["x_hat"], "flips": flips, "flips_total": sum(sum(f) for f in flips)}


def describe_flips(flips) -> str:
    """One line on the repairs :func:`decompress` (``details=True``) reports."""
    total = sum(sum(f) for f in flips)
    if not total:
        return "no flipped CDF index"
    steps = sorted({k + 1 for f in flips for k, n in enumerate(f) if n})
    return (f"{total} flipped CDF index{'es' if total > 1 else ''} repaired (y coding step"
            f"{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))})")


def decode(src, model, model_name: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """Read, check and decompress a file with ``model`` → x_hat (B, 3, H, W)."""
    return decompress(read(src, model, model_name, max_pixels=max_pixels), model)


def describe_file(info: dict) -> dict:
    """What a parsed file holds, for ``hpcm-triton info FILE`` (no model is built)."""
    H, W = info["image_size"]
    ys, zs = info["strings"]
    total = info["header_bytes"] + sum(len(s) for s in ys + zs)
    return {"format version": info["version"], "model": info["model"],
            "config overrides": config_overrides(info["model"], info["config"]) or "none (official widths)",
            "image size": f"{H}×{W} (height×width)" + (f" × {info['n_images']} images" if info["n_images"] > 1
                                                        else ""),
            "z shape": "×".join(map(str, info["shape"])),
            "file bytes": f"{total:,} ({8 * total / (H * W * info['n_images']):.4f} bpp)",
            "header bytes": info["header_bytes"],
            "y stream bytes": ", ".join(f"{len(s):,}" for s in ys),
            "z stream bytes": ", ".join(f"{len(s):,}" for s in zs),
            "config fingerprint": info["config_fingerprint"].hex(),
            "weights fingerprint": info["weights_fingerprint"].hex(),
            "index checks": {1: "none (version 1)", 2: "16-bit CRC per step (compared only)",
                             3: "62-bit per y step (flipped indexes repaired)"}[info["version"]],
            "encoder threads": info["threads"] if info["threads"] is not None else "not recorded (version 1)",
            "encoder environment": ", ".join(f"{k}={v}" for k, v in info["encoder"].items()) or "not recorded"}
