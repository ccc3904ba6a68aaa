"""Images in and out, the bundled offline test photos, and the quality metrics.

Tensors here are (1, 3, H, W) float32 in [0, 1] unless stated otherwise.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .defaults import BUNDLED_PHOTOS, DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES


def _skimage(name: str):
    def load():
        import skimage.data

        return getattr(skimage.data, name)()
    return load


def _grace_hopper():
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        from PIL import Image

        return np.asarray(Image.open(f).convert("RGB"))


# The bundled photos' loaders, in the order of defaults.BUNDLED_PHOTOS (sizes as H×W).
BUNDLED = dict(zip(BUNDLED_PHOTOS, (
    _skimage("chelsea"),             # 300×451 cat
    _skimage("astronaut"),           # 512×512
    _skimage("coffee"),              # 400×600
    _skimage("rocket"),              # 427×640
    _skimage("hubble_deep_field"),   # 872×1000
    _grace_hopper,                   # 600×512, matplotlib sample data (may be absent)
), strict=True))


def from_uint8(a: np.ndarray) -> torch.Tensor:
    """(H, W, 3) or (H, W) uint8 array → (1, 3, H, W) float32 in [0, 1]."""
    a = np.asarray(a)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image array (H, W, 3), got shape {a.shape}")
    a = a[..., :3]
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {a.dtype}")
    # contiguous NCHW: a channels-last view makes convolutions pick other kernels, and then
    # forward(x) and decompress differ in the last float bits
    return torch.from_numpy(np.array(a, copy=True, order="C")).permute(2, 0, 1)[None].float().div_(255).contiguous()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(…, 3, H, W) float in [0, 1] → uint8 via round(x·255) clamped, as the official test does."""
    return x.detach().float().mul(255).round().clamp_(0, 255).to(torch.uint8)


def bundled_names(available_only: bool = True) -> list[str]:
    if not available_only:
        return list(BUNDLED)
    out = []
    for n in BUNDLED:
        try:
            BUNDLED[n]()
            out.append(n)
        except Exception:
            pass
    return out


def bundled(name: str) -> torch.Tensor:
    """A bundled photo by name → (1, 3, H, W). Raises ValueError for an unknown or missing one."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled image {name!r}; choose from {', '.join(BUNDLED)}")
    try:
        return from_uint8(BUNDLED[name]())
    except Exception as e:  # e.g. matplotlib without its sample data
        raise ValueError(f"bundled image {name!r} is not available here: {e}") from None


def _pixels(im) -> tuple[np.ndarray, list[str]]:
    """A Pillow image → ((H, W, 3) uint8 array, or float32 in [0, 1] for deeper pixels; what
    was converted).

    8-bit modes map 0..255, 16-bit ones 0..65535; palette, bilevel, CMYK, YCbCr, LAB and HSV
    images are converted to RGB, greyscale is replicated to three channels, and an alpha
    channel is dropped (its colour values kept). Anything else raises ValueError.
    """
    mode, notes = im.mode, []
    if getattr(im, "n_frames", 1) > 1:
        notes.append(f"{im.n_frames} frames, using the first")
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im)
        if mode == "I" and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"32-bit integer pixels outside 0..65535 (min {a.min()}, max {a.max()}); "
                             "convert the image to 8 or 16 bits per channel")
        notes.append("16-bit greyscale, scaled from 0..65535")
        g = a.astype(np.float64) / 65535.0
        return np.repeat(g[..., None], 3, -1).astype(np.float32), notes
    if mode == "F":
        a = np.asarray(im).astype(np.float64)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError("floating-point pixels outside [0, 1]; convert the image to 8 or 16 bits per channel")
        notes.append("floating-point greyscale, used as [0, 1]")
        return np.repeat(a[..., None], 3, -1).astype(np.float32), notes
    if mode in ("RGB", "L"):
        pass
    elif mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        notes.append("alpha channel dropped")
    elif mode == "P":
        notes.append("palette image converted to RGB"
                     + ("; its transparency dropped" if "transparency" in im.info else ""))
    elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        notes.append({"1": "1-bit image", "RGBX": "RGBX image"}.get(mode, f"{mode} image") + " converted to RGB")
    else:
        raise ValueError(f"unsupported pixel mode {mode!r}")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    rgb = np.asarray(im.convert("RGB"))
    if rgb.dtype != np.uint8:
        raise ValueError(f"unexpected {rgb.dtype} pixels after converting mode {mode!r} to RGB")
    return rgb, notes


def _png_header(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, or None for another file."""
    with open(path, "rb") as f:
        head = f.read(26)
    return (head[24], head[25]) if len(head) == 26 and head[12:16] == b"IHDR" else None


def _png16_colour(path: Path) -> np.ndarray:
    """A 16-bit colour PNG at full precision → (H, W, 3) float32 in [0, 1] (alpha dropped).
    Pillow reads these at 8 bits; torchvision's PNG decoder keeps all 16."""
    from torchvision.io import ImageReadMode, decode_png, read_file

    a = decode_png(read_file(str(path)), mode=ImageReadMode.UNCHANGED)  # (C, H, W) uint16
    return (a[:3].permute(1, 2, 0).to(torch.float64) / 65535.0).to(torch.float32).numpy()


# EXIF orientation (tag 0x0112) → how the stored pixels are turned into what viewers show:
# (transpose, quarter turns counter-clockwise, then mirror left-right), as Pillow's
# ImageOps.exif_transpose turns them.
_ORIENTATIONS = {2: (False, 0, True, "mirrored left-right"), 3: (False, 2, False, "turned 180°"),
                 4: (False, 2, True, "flipped upside down"), 5: (True, 0, False, "transposed"),
                 6: (False, 3, False, "turned 90° clockwise"), 7: (True, 2, False, "transversed"),
                 8: (False, 1, False, "turned 90° counter-clockwise")}


def _orientation(im) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block: the pixels are still usable as stored
        return 1
    return value if value in _ORIENTATIONS else 1


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W, C) pixels as stored → as shown, for an EXIF orientation of 2..8."""
    transpose, turns, flip, _ = _ORIENTATIONS[orientation]
    if transpose:
        a = a.transpose(1, 0, 2)
    a = np.rot90(a, turns)
    return a[:, ::-1] if flip else a


def check_pixels(path, height: int, width: int, max_pixels: int | None) -> None:
    """Raise ValueError for an image of more than ``max_pixels`` pixels (None: no bound)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(f"{path}: image is {height}×{width} (height×width) = {width * height:,} pixels, more than "
                         f"the limit of {max_pixels:,}; refused before decoding it (pass --max-pixels to allow it)")


_UNREADABLE = (OSError, SyntaxError, RuntimeError)  # what Pillow raises on a damaged or foreign file


def _image_file(path: Path) -> None:
    """Raise FileNotFoundError for a missing ``path``, ValueError for one that is not a regular
    file (a FIFO would block the read, a device would never end it)."""
    from .outputs import input_kind

    why = input_kind(path)
    if why == "no such file":
        raise FileNotFoundError(f"{path}: no such file")
    if why:
        raise ValueError(f"{path}: {why}, expected an image file")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image file, from its header alone (no pixels are decoded). Raises like
    :func:`load_image`."""
    from PIL import Image

    path = Path(path)
    _image_file(path)
    old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # the header only: nothing to bound yet
    try:
        with Image.open(path) as im:
            w, h = im.size
    except _UNREADABLE as e:
        raise ValueError(f"{path}: not a readable image ({e.__class__.__name__}: {e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old
    return h, w


def load_image(path: str | os.PathLike, report=None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Read an image file (PNG, JPEG, … via Pillow; 16-bit colour PNG via torchvision) →
    (1, 3, H, W) float32 in [0, 1], turned as its EXIF orientation says.

    Any bit depth and mode Pillow reads is converted (see :func:`_pixels`); ``report(msg)`` is
    called once with what was converted or turned, if anything. An image of more than
    ``max_pixels`` pixels (None: no bound) is refused from its header, before its pixels are
    decoded; Pillow's decompression-bomb limit is set to the same bound. Raises
    FileNotFoundError for a missing file and ValueError for anything else that is not a
    readable regular image file (a FIFO, a device, a directory), an unsupported mode, or an
    image over the bound.
    """
    import warnings

    from PIL import Image

    path = Path(path)
    _image_file(path)
    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the bound is checked below
            try:
                im = Image.open(path)
            except Image.DecompressionBombError:  # more than twice the bound: say by how much
                check_pixels(path, *image_size(path), max_pixels)
                raise
        with im:
            check_pixels(path, *im.size[::-1], max_pixels)
            im.load()
            orientation = _orientation(im)
            if im.format == "PNG" and im.mode in ("RGB", "RGBA") and _png_header(path) in ((16, 2), (16, 6)):
                pixels = _png16_colour(path)
                notes = ["16-bit colour, scaled from 0..65535" + ("; alpha channel dropped" if im.mode == "RGBA"
                                                                  else "")]
            else:
                pixels, notes = _pixels(im)
    except (*_UNREADABLE, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: not a readable image ({e.__class__.__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(e if str(e).startswith(f"{path}: ") else f"{path}: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    if orientation != 1:
        pixels = _orient(pixels, orientation)
        notes.append(f"EXIF orientation {orientation} applied ({_ORIENTATIONS[orientation][3]})")
    if notes and pixels.dtype != np.uint8:
        notes.append("the decoded image will be 8-bit RGB")
    if report is not None and notes:
        report(f"{path.name}: " + "; ".join(notes))
    if pixels.dtype == np.uint8:
        return from_uint8(pixels)
    # contiguous NCHW (see from_uint8)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None].contiguous()


def resolve_image(spec: str, report=None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[str, torch.Tensor]:
    """An existing file path, else a bundled photo name → (label, image); see :func:`load_image`."""
    if os.path.lexists(spec) or spec not in BUNDLED:
        return Path(spec).name, load_image(spec, report, max_pixels)
    return spec, bundled(spec)


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files (by suffix) directly inside ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def save_image(x: torch.Tensor, path: str | os.PathLike, *, exclusive: bool = False) -> None:
    """Save a (1, 3, H, W) or (3, H, W) image in [0, 1] (8-bit rounded); format from the suffix.
    ``exclusive``: see :func:`hpcm_triton.outputs.atomic_write`."""
    import io

    from PIL import Image

    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"save_image takes one image, got a batch of {x.shape[0]}")
        x = x[0]
    a = to_uint8(x).permute(1, 2, 0).cpu().numpy()
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image suffix; use .png")
    buf = io.BytesIO()
    Image.fromarray(a, "RGB").save(buf, format=fmt)
    from .outputs import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue(), exclusive=exclusive)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two images in [0, 1], after 8-bit rounding of both (official test)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (to_uint8(a).double() - to_uint8(b).double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """MS-SSIM (pytorch_msssim, data_range 255 on 8-bit-rounded images); None if the package
    is missing or the image is too small for 5 scales (shorter side ≤ 160 px)."""
    try:
        from pytorch_msssim import ms_ssim as _ms_ssim
    except ImportError:
        return None
    if min(a.shape[-2:]) <= 160:
        return None
    return float(_ms_ssim(to_uint8(a).float(), to_uint8(b).float(), data_range=255.0).mean())
