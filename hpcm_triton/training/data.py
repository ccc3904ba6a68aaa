"""Training data: images decoded lazily in DataLoader workers, and a sample order that is a pure
function of (seed, epoch, position).

The run draws from an endless *stream*: stream position ``p`` is image ``perm_e[p mod n]`` of
epoch ``e = p div n`` (``perm_e`` a permutation seeded by (seed, e)), cropped and flipped by a
generator seeded by (seed, p). Step ``s`` of a run with global batch ``B`` consumes positions
``s·B … s·B + B − 1``; with K processes, rank ``r`` takes the ``r``-th slice of B/K of them. So a
sample depends on neither the worker that decodes it, nor the process, nor whether the run was
interrupted: a resumed run (which restarts the stream at ``step·B``) sees the same crops as an
uninterrupted one, and K processes see exactly the images one process would.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .. import images as im

SUFFIXES = im.IMAGE_SUFFIXES
_MASK = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): nearby inputs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK


@dataclass(frozen=True)
class Source:
    """One image: a file path, or the name of a bundled photo."""
    path: str | None = None
    bundled: str | None = None

    @property
    def label(self) -> str:
        return self.path or f"bundled:{self.bundled}"

    def decode(self) -> np.ndarray:
        """(H, W, 3) uint8."""
        if self.bundled is not None:
            from ..images import BUNDLED

            a = np.asarray(BUNDLED[self.bundled]())
        else:
            from PIL import Image

            with Image.open(self.path) as img:
                a = np.asarray(img.convert("RGB"))
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        return a[..., :3]

    def size(self) -> tuple[int, int]:
        """(H, W), reading only the header of a file."""
        if self.bundled is not None:
            return tuple(self.decode().shape[:2])
        from PIL import Image

        with Image.open(self.path) as img:
            w, h = img.size
        return h, w


@dataclass
class Scan:
    sources: list
    too_small: list
    unreadable: list
    label: str

    def summary(self) -> str:
        s = f"{len(self.sources)} images from {self.label}"
        if self.too_small:
            s += f"; {len(self.too_small)} smaller than the crop skipped"
        if self.unreadable:
            s += f"; {len(self.unreadable)} unreadable skipped"
        return s


def scan(folder: str | os.PathLike | None, min_side: int = 0, what: str = "training") -> Scan:
    """The usable images of ``folder`` (recursive; None or "bundled": the bundled photos).

    Images with a side below ``min_side`` and files that cannot be read are skipped and listed.
    Raises FileNotFoundError / ValueError (one line) for a missing, empty or unusable folder.
    """
    if folder is None or str(folder) == "bundled":
        cands = [Source(bundled=n) for n in im.bundled_names()]
        label = "the bundled photos"
    else:
        root = Path(folder)
        if not root.exists():
            raise FileNotFoundError(f"{folder}: {what} data folder does not exist")
        if not root.is_dir():
            raise ValueError(f"{folder}: {what} data is not a folder")
        try:
            files = sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        except OSError as e:
            raise ValueError(f"{folder}: cannot read the {what} data folder ({e.strerror or e})") from None
        if not files:
            raise ValueError(f"{folder}: no image files ({', '.join(SUFFIXES)}) in the {what} data folder")
        cands = [Source(path=str(p)) for p in files]
        label = str(folder)
    sources, small, bad = [], [], []
    for s in cands:
        try:
            h, w = s.size()
        except Exception:  # unreadable header, permission, truncated file, …
            bad.append(s.label)
            continue
        (sources if min(h, w) >= min_side else small).append(s)
    res = Scan(sources, small, bad, label)
    if not sources:
        raise ValueError(f"{label}: no usable {what} images ({len(small)} smaller than {min_side} px, "
                         f"{len(bad)} unreadable)")
    return res


def worker_init(_worker_id: int, parent_pid: int) -> None:
    """In a DataLoader worker: interrupts are the trainer's to handle (it finishes the step, saves
    a checkpoint and then stops its workers), and the worker dies with the trainer if it is killed."""
    import signal

    from ..entropy.coder import die_with_parent

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent_pid)


class CropStream(Dataset):
    """``dataset[p]`` → the (3, crop, crop) float crop at stream position ``p`` (see the module doc)."""

    def __init__(self, sources: list, crop: int, seed: int):
        self.sources = list(sources)
        self.crop = int(crop)
        self.seed = int(seed)
        self._perm = (None, None)

    def __len__(self) -> int:  # one epoch; the sampler walks the endless stream
        return len(self.sources)

    def permutation(self, epoch: int) -> list:
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, 1, epoch))
            self._perm = (epoch, torch.randperm(len(self.sources), generator=g).tolist())
        return self._perm[1]

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, image index) of a stream position."""
        epoch, pos = divmod(int(position), len(self.sources))
        return epoch, self.permutation(epoch)[pos]

    def __getitem__(self, position: int) -> torch.Tensor:
        _, idx = self.locate(position)
        a = self.sources[idx].decode()
        g = torch.Generator().manual_seed(mix_seed(self.seed, 2, position))
        c = self.crop
        h, w = a.shape[:2]
        top = int(torch.randint(0, h - c + 1, (1,), generator=g))
        left = int(torch.randint(0, w - c + 1, (1,), generator=g))
        flips = torch.rand(2, generator=g)
        p = torch.from_numpy(np.ascontiguousarray(a[top:top + c, left:left + c])).permute(2, 0, 1)
        if flips[0] < 0.5:
            p = p.flip(-1)
        if flips[1] < 0.5:
            p = p.flip(-2)
        return p.float().div_(255).contiguous()


class StreamSampler(Sampler):
    """Stream positions for one process: step ``s`` (from ``start_step`` on, endlessly) gives
    ``s·B + rank·b … s·B + rank·b + b − 1`` with ``b = B / world_size`` — the distributed sampler."""

    def __init__(self, global_batch: int, start_step: int = 0, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"--batch-size {global_batch} is not divisible by the {world_size} processes")
        self.B, self.start, self.rank, self.world = global_batch, start_step, rank, world_size
        self.local = global_batch // world_size

    def positions(self, step: int) -> list:
        first = step * self.B + self.rank * self.local
        return list(range(first, first + self.local))

    def __iter__(self):
        s = self.start
        while True:
            yield from self.positions(s)
            s += 1


def load_validation(folder, crop: int = 0, max_images: int = 0) -> tuple[list, Scan]:
    """Validation images, decoded once: [(label, (1, 3, H, W) float)], centre-cropped to at most
    ``crop`` px a side (0: whole images); images under 64 px are skipped."""
    sc = scan(folder, min_side=64, what="validation")
    out = []
    for s in sc.sources[:max_images or None]:
        x = im.from_uint8(s.decode())
        if crop:
            H, W = x.shape[-2:]
            h, w = min(H, crop), min(W, crop)
            t, left = (H - h) // 2, (W - w) // 2
            x = x[..., t:t + h, left:left + w].contiguous()
        out.append((s.label, x))
    return out, sc
