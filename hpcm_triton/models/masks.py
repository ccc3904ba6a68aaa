"""Position masks and gathers of HPCM's 11-step progressive schedule (docs/architecture.md §3).

y (B, C, H, W) is coded in three scales: s1 = a quarter-resolution sub-lattice (2 steps),
s2 = half resolution (3 more steps), s3 = full resolution (6 more). Each channel group
(C/2, C/4 or C/8 channels) sees its own rotation of the position patterns, so every step
codes a mix of positions across the groups. The patterns and the gather orders are part of
the bitstream format of the official release and are reproduced here exactly.
"""
from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict

import torch

# The 8 position patterns of a 4×4 cell used by the s2 and s3 schedules.
_PATTERNS_4x4 = (
    ((1, 0, 0, 0), (0, 0, 0, 0), (0, 0, 1, 0), (0, 0, 0, 0)),
    ((0, 0, 1, 0), (0, 0, 0, 0), (1, 0, 0, 0), (0, 0, 0, 0)),
    ((0, 0, 0, 0), (0, 1, 0, 0), (0, 0, 0, 0), (0, 0, 0, 1)),
    ((0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 0), (0, 1, 0, 0)),
    ((0, 1, 0, 0), (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 0)),
    ((0, 0, 0, 1), (0, 0, 0, 0), (0, 1, 0, 0), (0, 0, 0, 0)),
    ((0, 0, 0, 0), (1, 0, 0, 0), (0, 0, 0, 0), (0, 0, 1, 0)),
    ((0, 0, 0, 0), (0, 0, 1, 0), (0, 0, 0, 0), (1, 0, 0, 0)),
)
# Channel-group rotations of the 8 patterns for the s3 steps (row k: mask of step k).
_EIGHT_PART_ORDER = (
    (0, 2, 4, 6, 1, 3, 5, 7), (1, 3, 5, 7, 0, 2, 4, 6), (2, 4, 6, 0, 3, 5, 7, 1), (3, 5, 7, 1, 2, 4, 6, 0),
    (4, 6, 0, 2, 5, 7, 1, 3), (5, 7, 1, 3, 4, 6, 0, 2), (6, 0, 2, 4, 7, 1, 3, 5), (7, 1, 3, 5, 6, 0, 2, 4),
)
_GROUP_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


# ---------------------------------------------------------------- a cache bounded by bytes
# The masks are full (B, C, H, W) tensors on the model's device: ~475 MB for one 4K frame at
# M = 320. They are kept across calls (same image size, same masks) in one LRU cache whose
# total size is bounded; a set of masks larger than the bound is built on the fly, uncached.
CACHE_LIMIT_BYTES = int(float(os.environ.get("HPCM_MASK_CACHE_MB", "256")) * 2 ** 20)
_cache: "OrderedDict[tuple, tuple[object, int]]" = OrderedDict()
_cache_lock = threading.Lock()


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(v) for v in value)


def cache_bytes() -> int:
    """Bytes held by the mask cache now (all devices)."""
    with _cache_lock:
        return sum(n for _, n in _cache.values())


def cache_clear() -> None:
    with _cache_lock:
        _cache.clear()


def _cached(fn):
    """Memoize ``fn`` in the shared LRU cache, evicting least recently used entries while the
    total exceeds ``CACHE_LIMIT_BYTES`` (read at each call, so it can be changed at run time)."""

    @functools.wraps(fn)
    def wrapper(*args):
        if torch.compiler.is_compiling():   # a compiled graph builds them from the patterns
            return fn(*args)
        key = (fn.__name__, *args)
        with _cache_lock:
            hit = _cache.get(key)
            if hit is not None:
                _cache.move_to_end(key)
                return hit[0]
        value = fn(*args)
        n = _nbytes(value)
        limit = CACHE_LIMIT_BYTES
        with _cache_lock:
            if n <= limit:
                _cache[key] = (value, n)
                _cache.move_to_end(key)
                total = sum(v[1] for v in _cache.values())
                while total > limit:
                    _, (_, old) = _cache.popitem(last=False)
                    total -= old
        return value

    return wrapper


def _tile(pattern, height: int, width: int, dtype, device) -> torch.Tensor:
    """Repeat a small 2-D pattern over (height, width); returns (1, 1, height, width)."""
    p = torch.tensor(pattern, dtype=dtype, device=device)
    ph, pw = p.shape
    reps = ((height + 1) // ph, (width + 1) // pw)
    m = p.repeat(*reps)[:height, :width]
    if m.shape != (height, width):
        raise ValueError(f"a {height}×{width} latent does not fit HPCM's {ph}×{pw} coding pattern")
    return m[None, None]


def _groups(masks, batch: int, channels: int, n_groups: int) -> torch.Tensor:
    """Concatenate one (1,1,H,W) pattern per channel group into (batch, channels, H, W)."""
    per = channels // n_groups
    return torch.cat([m.expand(batch, per, -1, -1) for m in masks], dim=1).contiguous()


def _check_groups(channels: int, n: int):
    if channels % n:
        raise ValueError(f"HPCM needs the latent's channels divisible by {n}, got {channels}")


@_cached
def two_part(batch, channels, height, width, dtype, device):
    """The two s1 steps: a checkerboard, swapped between the two channel halves."""
    _check_groups(channels, 2)
    m0 = _tile(((1, 0), (0, 1)), height, width, dtype, device)
    m1 = 1 - m0
    return [_groups([m0, m1], batch, channels, 2), _groups([m1, m0], batch, channels, 2)]


def _quad(height, width, dtype, device):
    return [_tile(p, height, width, dtype, device)
            for p in (((1, 0), (0, 0)), ((0, 1), (0, 0)), ((0, 0), (1, 0)), ((0, 0), (0, 1)))]


@_cached
def four_part(batch, channels, height, width, dtype, device):
    """The four quarter-lattices of s2, rotated across four channel groups."""
    _check_groups(channels, 4)
    q = _quad(height, width, dtype, device)
    orders = ((0, 1, 2, 3), (3, 2, 1, 0), (2, 3, 0, 1), (1, 0, 3, 2))
    return [_groups([q[i] for i in o], batch, channels, 4) for o in orders]


@_cached
def eight_part(batch, channels, height, width, dtype, device):
    """The eight s3 steps: 4×4-cell patterns (tiled to 8×8) rotated across eight channel groups."""
    _check_groups(channels, 8)
    pats = []
    for p in _PATTERNS_4x4:
        cell = [list(row) * 2 for row in p] * 2
        pats.append(_tile(cell, height, width, dtype, device))
    return [_groups([pats[j] for j in order], batch, channels, 8) for order in _EIGHT_PART_ORDER]


@_cached
def rec_s2(batch, channels, height, width, dtype, device):
    """Per quarter of the channels, the sub-lattice that forms s1 inside s2 (list of 4 masks of C/4 channels)."""
    _check_groups(channels, 4)
    return [m.expand(batch, channels // 4, -1, -1).contiguous() for m in _quad(height, width, dtype, device)]


@_cached
def s2_in_full(batch, channels, height, width, dtype, device):
    """Per eighth of the channels, the positions of the full-resolution map that form s2 (list of 8)."""
    _check_groups(channels, 8)
    pats = [_tile(p, height, width, dtype, device) for p in _PATTERNS_4x4]
    other = (1, 3, 5, 7, 0, 2, 4, 6)
    return [(pats[a] + pats[b]).expand(batch, channels // 8, -1, -1).contiguous()
            for a, b in zip(_GROUP_ORDER, other)]


@_cached
def s1_in_full(batch, channels, height, width, dtype, device):
    """Per eighth of the channels, the positions of the full-resolution map that form s1 (list of 8)."""
    _check_groups(channels, 8)
    # The s1 patterns are the s2 ones restricted to the top half of the 4×4 cell.
    pats = [_tile(p[:2] + ((0, 0, 0, 0),) * 2, height, width, dtype, device) for p in _PATTERNS_4x4]
    return [pats[i].expand(batch, channels // 8, -1, -1).contiguous() for i in _GROUP_ORDER]


def _positions(mask: torch.Tensor, n: int) -> torch.Tensor:
    """The n flat raster positions of the nonzeros of a channel group's mask (B, c, H, W), whose
    planes are all the same: the order of masked_select and boolean indexing. A stable argsort
    of a fixed size, so that torch.compile sees no shape that depends on values."""
    return torch.argsort(mask[0, 0].flatten() == 0, stable=True)[:n]


def subsample(y: torch.Tensor, mask_list, height: int, width: int) -> torch.Tensor:
    """Pick each channel group's masked positions into a (B, C, height, width) map."""
    b, c = y.shape[:2]
    groups = y.chunk(len(mask_list), dim=1)
    n = height * width
    return torch.cat([g.flatten(2)[:, :, _positions(m, n)].view(b, c // len(mask_list), height, width)
                      for g, m in zip(groups, mask_list)], dim=1)


def scale_views(t: torch.Tensor):
    """((s1, s2), full_s2, rec) of a full-resolution map t (B, C, H, W): its s1 (H/4) and s2 (H/2)
    sub-maps, and the masks that made them (positions of s2 in t, of s1 in s2)."""
    b, c, h, w = t.shape
    full_s2 = s2_in_full(b, c, h, w, t.dtype, t.device)
    rec = rec_s2(b, c, h // 2, w // 2, t.dtype, t.device)
    t_s2 = subsample(t, full_s2, h // 2, w // 2)
    return (subsample(t_s2, rec, h // 4, w // 4), t_s2), full_s2, rec


def upsample(y: torch.Tensor, mask_list, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`subsample`: scatter into a zero map of (B, C, height, width)."""
    b, c = y.shape[:2]
    n, per = y.shape[2] * y.shape[3], c // len(mask_list)
    out = torch.zeros((b, c, height * width), dtype=y.dtype, device=y.device)
    for i, m in enumerate(mask_list):
        out[:, i * per:(i + 1) * per, _positions(m, n)] = y[:, i * per:(i + 1) * per].reshape(b, per, n)
    return out.view(b, c, height, width)


def s2_hyper(params: torch.Tensor, full_s1, full_s2, rec, height: int, width: int) -> torch.Tensor:
    """Hyperprior parameters for the s2 positions that s1 did not code.

    Official quirk, kept on purpose (docs/architecture.md §4 b): the values are gathered in raster order of the
    full-resolution map and scattered in raster order of the half-resolution map, so for channel
    groups 2–7 they come from other positions than the ones they describe. Training, compress
    and decompress all use this same function, so released checkpoints depend on it.
    """
    b, c = params.shape[:2]
    # every plane has as many s2-not-s1 positions in the full map as positions outside s1 in
    # the half map (s1 is its (height/2, width/2) sub-lattice), so plane i's values go to plane i
    n = height * width - (height // 2) * (width // 2)
    src = torch.cat([_positions(s2 - s1, n).expand(s2.shape[1], n) for s1, s2 in zip(full_s1, full_s2)])
    dst = torch.cat([_positions(r == 0, n).expand(r.shape[1], n) for r in rec])
    vals = params.flatten(2).gather(2, src.expand(b, c, n))
    out = torch.zeros((b, c, height * width), dtype=params.dtype, device=params.device)
    return out.scatter(2, dst.expand(b, c, n), vals).view(b, c, height, width)


def s3_hyper(params: torch.Tensor, full_s2) -> torch.Tensor:
    """Hyperprior parameters at the full-resolution positions not coded in s1/s2."""
    keep = ~torch.cat(full_s2, dim=1).bool()
    return torch.where(keep, params, torch.zeros_like(params))


def combine_groups(x: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum the channel groups: each step codes one position per group, so this packs them densely."""
    return sum(x.chunk(n_groups, dim=1))
