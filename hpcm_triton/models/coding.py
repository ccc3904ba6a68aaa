"""Running compress/decompress, and a hook that disturbs the decoder's entropy parameters.

A learned codec's decoder recomputes the encoder's entropy parameters from the symbols decoded
so far. Their floats depend on the machine: the CPU thread count (oneDNN and MKL split
reductions by the number of threads: a 1×1 convolution of 16→64 channels already rounds
differently with 1, 2 and 3 threads), the instruction set, the Bi-WKV4 backend, the device.
The symbols do not: each coding step's CDF indexes are checked against the encoder's and the
few that flip are repaired (docs/bitstream.md §4), so no setting needs to be pinned for a file
to decode. What the coding path still fixes:

* GPU kernel choices: by shape alone (``kernels_triton.shape_only_selection``), never by timing;
* the CPU thread count only when asked (``threads=``, or the count a ``compress`` output dict
  records when it is passed back to ``decompress``): then the decoder also reproduces the
  encoder's own reconstruction bit for bit, not only within one level.

What a decoder cannot change (device, instruction set, library builds) is recorded in the
``.hpcm`` header by :mod:`hpcm_triton.coding_env`, as information.
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
    """Decorator for ``compress``/``decompress``: kernels chosen by shape alone, and the thread
    count ``threads=`` if given, else the one a ``compress`` output dict records, else the
    current one. ``compress``'s output records the count it ran with (``"threads"``)."""

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


@contextlib.contextmanager
def perturbed_decoding(model, eps: float, seed: int = 0):
    """Within the block, ``model.decompress`` multiplies every entropy-parameter tensor it
    computes (each y coding step's scales and means) by (1 + eps·N(0, 1)), from a generator
    seeded with ``seed`` at entry: a stand-in for a machine whose floats differ by ~eps.
    ``eps=0`` installs nothing."""
    import torch

    if not eps:
        yield
        return
    g = torch.Generator().manual_seed(int(seed))

    def hook(_scale, scales, means):
        def noisy(t):
            n = torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.device, t.dtype)
            return t * (1 + eps * n)

        return noisy(scales), noisy(means)

    old = model.decoder_param_hook
    model.decoder_param_hook = hook
    try:
        yield
    finally:
        model.decoder_param_hook = old
