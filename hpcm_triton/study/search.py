"""The largest image that fits: a doubling search, then a bisection, over square sides.

Torch-free and pure: ``fits(side)`` is the caller's (the study runs each probe in its own
process, so that running out of memory ends the probe, not the study).
"""
from __future__ import annotations

from typing import Callable


def largest_fitting(fits: Callable[[int], bool], *, start: int, step: int, limit: int) -> dict:
    """The largest side s, a multiple of ``step`` with step ≤ s ≤ ``limit``, for which ``fits(s)``,
    assuming ``fits`` is monotone (true up to some side, false beyond it).

    From ``start`` the side doubles while probes fit (capped at ``limit``); the first failure
    (or ``start`` itself failing, then the range below it) is bisected down to ``step``.
    Returns ``{"largest": side or None, "capped": True where ``limit`` itself fit (the true
    largest may be larger), "probes": [[side, fits], ...] in the order run}``.
    """
    if step < 1 or start < step or limit < step:
        raise ValueError(f"need 1 ≤ step ≤ start and step ≤ limit, got step={step}, start={start}, limit={limit}")
    snap = lambda s: max(step, s // step * step)  # noqa: E731
    limit = snap(limit)
    probes = []

    def probe(s: int) -> bool:
        ok = bool(fits(s))
        probes.append([s, ok])
        return ok

    good, bad = 0, None  # largest side known to fit (0: none), smallest known to fail
    s = snap(min(start, limit))
    while True:
        if probe(s):
            good = s
            if s >= limit:
                break
            s = snap(min(2 * s, limit))
        else:
            bad = s
            break
    if bad is not None:
        while bad - good > step:
            mid = snap((good + bad) // 2)
            if mid <= good:
                mid = good + step
            if probe(mid):
                good = mid
            else:
                bad = mid
    return {"largest": good or None, "capped": bad is None, "probes": probes}
