"""The encoder's environment, recorded in a ``.hpcm`` header as information.

A learned codec's decoder recomputes the encoder's entropy parameters (hyper-synthesis,
context cells, spatial priors) from the symbols decoded so far, and their floats depend on

* the CPU thread count (oneDNN and MKL split reductions by thread);
* the Bi-WKV4 backend: on CPU the compiled C kernels (``kernels_cpu``, built for this machine's
  instruction set or ``HPCM_TRITON_CPU_MARCH``) and the pure-PyTorch scan round differently,
  and "auto" falls back to the latter where no C compiler is found;
* the device kind and model (CPU instruction set, GPU) and the torch / oneDNN build.

None of these has to match for a version-3 file to decode: each coding step's CDF indexes are
checked and the few that flip are repaired (docs/bitstream.md §4). They are recorded so that
``hpcm-triton info`` can say where a file was written, and named in the error when a decoder's
floats differ by more than the repairs cover (or, for a version-2 file, differ at all).
"""
from __future__ import annotations
# The environment facts a file's header records (in this order) and a decoder compares.
RECORDED = ("device", "cpu", "gpu", "biwkv4", "torch", "compressai")


def biwkv4_backends(model, device) -> str | None:
    """The Bi-WKV4 backend(s) ``model``'s RWKV modules run on ``device`` ("cpu", "torch",
    "triton"; several joined by "+"), or None for a model without them (HPCM-Base/Large)."""
    from .rwkv.mix import SpatialMix

    wanted = sorted({m.backend for m in model.modules() if isinstance(m, SpatialMix)})
    if not wanted:
        return None
    from kernels_triton import resolve_backend

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
