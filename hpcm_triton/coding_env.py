"""What must match between an encoder and a decoder, and running the coding path so it does.

A learned codec's decoder recomputes the encoder's entropy parameters (hyper-synthesis,
context cells, spatial priors) from the symbols decoded so far; the rANS tables it picks are
only right if those floats are bit-identical to the encoder's. On one machine this holds when
both sides run

* the same weights and configuration (the file's fingerprints check these),
* the same kernels: on CPU, oneDNN and MKL split reductions by the number of threads
  (measured: a 1×1 convolution of 16→64 channels rounds differently with 1, 2 and 3 threads),
  so the coding path runs with the thread count the encoder used, recorded in the file;
  on GPU, kernels chosen by shape alone (``kernels_triton.shape_only_selection``), never by
  timing,
* the same Bi-WKV4 backend: on CPU the compiled C kernels (``kernels_cpu``) and the
  pure-PyTorch scan round differently, and "auto" falls back to the latter where no C compiler
  is found; the backend is recorded like the rest,
* the same device kind and model (CPU instruction set, GPU) and the same torch / oneDNN
  build: these cannot be changed by the decoder, so they are recorded in the file and named
  in the error when a decode meets a mismatch.
"""
from __future__ import annotations

import contextlib
import functools

MAX_THREADS = 256  # a file asking for more is refused (a header must not make us start 10⁵ threads)
# The environment facts a file's header records (in this order) and a decoder compares.
RECORDED = ("device", "cpu", "gpu", "biwkv4", "torch", "compressai")


def biwkv4_backends(model, device) -> str | None:
    """The Bi-WKV4 backend(s) ``model``'s RWKV modules run on ``device`` ("cpu", "torch",
    "triton"; several joined by "+"), or None for a model without them (HPCM-Base/Large)."""
    from .rwkv.mix import SpatialMix

    wanted = sorted({m.backend for m in model.modules() if isinstance(m, SpatialMix)})
    if not wanted:
        return None
    from kernels_triton.ops import resolve_backend  # imports triton: only for RWKV variants

    return "+".join(sorted({resolve_backend(device, b) for b in wanted}))


def environment(device=None, threads: int | None = None, model=None) -> dict:
    """The facts about this process that decide the coding path's float rounding (with
    ``model``: also the Bi-WKV4 backend its RWKV modules use)."""
    import torch

    dev = torch.device(device if device is not None else "cpu")
    env = {"threads": int(threads if threads is not None else torch.get_num_threads()), "device": dev.type,
           "torch": torch.__version__}
    try:
        env["cpu"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        env["cpu"] = "unknown"
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    if model is not None:
        scan = biwkv4_backends(model, dev)
        if scan:
            env["biwkv4"] = scan
    try:
        from importlib.metadata import version

        env["compressai"] = version("compressai")
    except Exception:
        env["compressai"] = "unknown"
    return env


def describe(env: dict) -> str:
    dev = env.get("gpu") or f"CPU ({env.get('cpu', '?')}, {env.get('threads', '?')} threads)"
    scan = f", Bi-WKV4 {env['biwkv4']}" if env.get("biwkv4") else ""
    return (f"{env.get('device', '?')} {dev}{scan}, torch {env.get('torch', '?')}, "
            f"compressai {env.get('compressai', '?')}")


def differences(file_env: dict, here: dict) -> list[str]:
    """The recorded facts that differ between the encoder (``file_env``) and this decoder."""
    return [f"{k}: file {file_env.get(k)!r}, here {here.get(k)!r}" for k in RECORDED
            if k in file_env and file_env.get(k) != here.get(k)]


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
    try:
        from kernels_triton import shape_only_selection
    except ImportError:  # the kernels package is optional for the HPCM-only variants
        return contextlib.nullcontext()
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
