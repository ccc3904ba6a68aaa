"""Running compress/decompress so that an encoder and a decoder compute the same floats.

A learned codec's decoder recomputes the encoder's entropy parameters from the symbols decoded
so far; the rANS tables it picks are right only if those floats equal the encoder's. Two things
that would change them are fixed on the coding path:

* the CPU thread count: oneDNN and MKL split reductions by the number of threads (measured: a
  1×1 convolution of 16→64 channels rounds differently with 1, 2 and 3 threads), so the coding
  path runs with one recorded count;
* GPU kernel choices: by shape alone (``kernels_triton.shape_only_selection``), never by timing.

What a decoder cannot change (device, instruction set, library builds) is recorded in the
``.hpcm`` header by :mod:`hpcm_triton.coding_env`.
"""
from __future__ import annotations

import contextlib
import functools

MAX_THREADS = 256  # a file asking for more is refused (a header must not make us start 10⁵ threads)


@contextlib.contextmanager
def coding_threads(n: int | None):
    """Run the block with ``n`` intra-op CPU threads (None: unchanged), then restore."""
    import torch

    if n is None:
        yield
        return
    n = int(n)
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"thread count {n} outside 1..{MAX_THREADS}")
    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def _kernel_selection():
    from kernels_triton import shape_only_selection

    return shape_only_selection()


def coding_path(fn):
    """Decorator for ``compress``/``decompress``: kernels chosen by shape alone, and a fixed
    thread count — ``threads=`` if given, else the one a ``compress`` output dict records,
    else the current one. ``compress``'s output records the count it ran with (``"threads"``)."""

    @functools.wraps(fn)
    def wrapper(self, *args, threads: int | None = None, **kwargs):
        import torch

        if threads is None and args and isinstance(args[0], dict):
            threads = args[0].get("threads")
        with coding_threads(threads), _kernel_selection():
            n = torch.get_num_threads()
            out = fn(self, *args, **kwargs)
        if isinstance(out, dict) and "strings" in out:
            out["threads"] = n
        return out

    return wrapper
