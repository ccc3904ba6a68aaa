"""Per-step checks of CDF indexes, and the bounded search that repairs flipped indexes.

A decoder recomputes the encoder's entropy parameters; on another CPU, thread count or Bi-WKV4
backend they differ in the last bits, and a scale that lies within that distance of a boundary
of the scale table gets the neighbouring CDF index. The encoder therefore records a check of
each coding step's indexes, and a decoder whose indexes miss it looks for the few positions
whose index flipped before it decodes the step (docs/bitstream.md §4 has the design and the
false-match probability):

* the check (:func:`index_check`) is a pair of weighted sums, Σ idx[p]·w_j(step, p) mod q_j for
  the primes q_1 = 2³¹ − 1 and q_2 = 2³¹ − 19, with weights from splitmix64 of (step, position):
  linear in the indexes, so the effect of flipping any set of positions is a sum of per-position
  terms and a candidate set costs a few additions to test;
* the candidates (:func:`flip_candidates`) are the :data:`CANDIDATES` positions whose scale lies
  nearest (in log scale) to a table boundary, each with the index on the boundary's other side;
* the search (:func:`search_flips`) tries every set of 1, then 2, … up to :data:`MAX_FLIPS` of
  them (meet in the middle: sums of up to three candidates are sorted and matched against the
  target), and accepts a set only if it is the unique one of the smallest size that matches.

Version-2 ``.hpcm`` files carry the low 16 bits of a CRC32 of each step's indexes instead
(:func:`index_crc`); those are compared, never searched.
"""
from __future__ import annotations

import functools
import itertools
import math
import zlib

import numpy as np

# The two prime moduli of the check; a check is (h1 << 32) | h2, 62 significant bits.
Q1, Q2 = (1 << 31) - 1, (1 << 31) - 19
# The search: up to MAX_FLIPS flipped positions among the CANDIDATES nearest a boundary.
CANDIDATES = 64
MAX_FLIPS = 6
# Positions summed per np.dot call: index < 2¹¹ times weight < 2³¹, 2²⁰ terms, stays below 2⁶³.
_CHUNK = 1 << 20
_MAX_INDEX = 1 << 11

# Check kinds a CodedStream can carry.
CRC16 = "crc32-low16"   # version-2 files: compared only
WSUM62 = "wsum62"       # version 3 and in memory: compared, and searched on a mismatch


def search_size(candidates: int = CANDIDATES, max_flips: int = MAX_FLIPS) -> int:
    """How many index vectors the search compares with a step's check, at most."""
    return sum(math.comb(candidates, k) for k in range(1, max_flips + 1))


def false_match_bound(candidates: int = CANDIDATES, max_flips: int = MAX_FLIPS) -> float:
    """Upper bound on the probability that a search accepts a wrong set of flips (per searched
    step), with the check's weights modelled as uniform: each wrong vector matches with
    probability 1/(Q1·Q2), and the search compares at most :func:`search_size` of them."""
    return search_size(candidates, max_flips) / (Q1 * Q2)


def index_crc(indexes: np.ndarray) -> int:
    """CRC32 of a chunk's CDF indexes (int32 little-endian), the check of version-2 files."""
    return zlib.crc32(np.ascontiguousarray(indexes, dtype="<i4").reshape(-1).tobytes())


_M64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def check_weights(step: int, positions: np.ndarray) -> np.ndarray:
    """(2, len(positions)) int64: the weights of ``positions`` in step ``step``'s check."""
    key = np.asarray(positions, dtype=np.uint64) + np.uint64((int(step) << 40) & _M64)
    with np.errstate(over="ignore"):
        z = _splitmix64(key)
    return np.stack(((z >> np.uint64(33)) % np.uint64(Q1), (z & np.uint64(0x7FFFFFFF)) % np.uint64(Q2))
                    ).astype(np.int64)


def index_check(indexes: np.ndarray, step: int) -> int:
    """The check of one coding step's CDF indexes (flattened): (h1 << 32) | h2."""
    idx = np.asarray(indexes).reshape(-1).astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= _MAX_INDEX):
        raise ValueError(f"CDF indexes must lie in [0, {_MAX_INDEX}) to be checked")
    h1 = h2 = 0
    for lo in range(0, idx.size, _CHUNK):
        part = idx[lo:lo + _CHUNK]
        w = check_weights(step, np.arange(lo, lo + part.size))
        h1 = (h1 + int(np.dot(part, w[0]))) % Q1
        h2 = (h2 + int(np.dot(part, w[1]))) % Q2
    return (h1 << 32) | h2


def flip_candidates(scales: np.ndarray, boundaries: np.ndarray, indexes: np.ndarray, k: int = CANDIDATES):
    """The ``k`` positions whose scale lies nearest (in log scale) to one of ``boundaries``, and
    the index each would have on that boundary's other side, nearest first.

    The rule is the models' (``HPCM._y_indexes``): a scale's index is the number of boundaries
    below it. Non-finite and non-positive scales are never candidates.
    """
    s = np.asarray(scales, dtype=np.float64).reshape(-1)
    idx = np.asarray(indexes).reshape(-1).astype(np.int64)
    lb = np.log(np.asarray(boundaries, dtype=np.float64).reshape(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.log(s)
    j = np.clip(np.searchsorted(lb, ls), 1, len(lb) - 1)  # nearest boundary is j - 1 or j
    below, above = ls - lb[j - 1], lb[j] - ls
    nearest = np.where(np.abs(below) <= np.abs(above), j - 1, j)
    dist = np.abs(ls - lb[nearest])
    dist[~np.isfinite(dist)] = np.inf
    k = min(k, int(np.isfinite(dist).sum()))
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pos = np.argpartition(dist, k - 1)[:k] if k < dist.size else np.arange(dist.size)
    pos = pos[np.argsort(dist[pos], kind="stable")]
    m = nearest[pos]
    return pos.astype(np.int64), np.where(idx[pos] > m, m, m + 1).astype(np.int64)


@functools.lru_cache(maxsize=16)
def _combos(n: int, r: int) -> np.ndarray:
    return np.array(list(itertools.combinations(range(n), r)), dtype=np.int64).reshape(-1, r)


def search_flips(indexes: np.ndarray, step: int, expected: int, positions: np.ndarray,
                 alternatives: np.ndarray, max_flips: int = MAX_FLIPS):
    """The smallest set of flips (``indexes[positions[i]] = alternatives[i]``) that makes the
    step's check equal ``expected``, as an array of i, or None if no set of up to ``max_flips``
    does, or if two sets of the same size do (ambiguous: not trusted)."""
    idx = np.asarray(indexes).reshape(-1).astype(np.int64)
    positions, alternatives = np.asarray(positions, np.int64), np.asarray(alternatives, np.int64)
    n = len(positions)
    if n == 0:
        return None
    got = index_check(idx, step)
    target = np.array([((expected >> 32) - (got >> 32)) % Q1, ((expected & 0xFFFFFFFF) - (got & 0xFFFFFFFF)) % Q2],
                      dtype=np.int64)
    q = np.array([[Q1], [Q2]], dtype=np.int64)
    delta = ((alternatives - idx[positions])[None, :] * check_weights(step, positions)) % q  # (2, n)

    def sums(r):
        c = _combos(n, r)
        return c, delta[:, c].sum(-1) % q  # (C, r), (2, C)

    def key(s):
        return s[0] * Q2 + s[1]

    for w in range(1, min(max_flips, n) + 1):
        a, b = (w + 1) // 2, w // 2
        ca, sa = sums(a)
        if b == 0:
            found = {tuple(c) for c in ca[key(sa) == key(target[:, None])]}
        else:
            cb, sb = sums(b)
            need = key((target[:, None] - sb) % q)
            ka = key(sa)
            order = np.argsort(ka, kind="stable")
            ka_sorted = ka[order]
            lo, hi = np.searchsorted(ka_sorted, need, "left"), np.searchsorted(ka_sorted, need, "right")
            found = set()
            for ib in np.nonzero(hi > lo)[0]:
                for ia in order[lo[ib]:hi[ib]]:
                    s = set(ca[ia]) | set(cb[ib])
                    if len(s) == w:
                        found.add(tuple(sorted(s)))
        if len(found) == 1:
            (sel,) = found
            sel = np.array(sel, dtype=np.int64)
            fixed = idx.copy()
            fixed[positions[sel]] = alternatives[sel]
            if index_check(fixed, step) == expected:
                return sel
            return None
        if len(found) > 1:
            return None
    return None
