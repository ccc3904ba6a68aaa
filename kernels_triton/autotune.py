"""Run triton.autotune for the Bi-WKV4 kernels on HPCM's shapes and report what it chose.

    python -m kernels_triton.autotune [--C 640,960] [--T 16,64,...] [--B 1,8] [--dtype fp32]

On a GPU: for every (C, T, B, dtype) one forward+backward makes each kernel's
``triton.autotune`` time its configs (the key is C, a power-of-two bucket of T and the unit
length); then forward and forward+backward are timed with the chosen configs, and a markdown
table prints the config each kernel chose, the times and the bytes per element the kernels
move (:func:`kernels_triton.ops.traffic`). The choice lives in the process (Triton's
autotuner cache); nothing is written.

Without a GPU: says so, checks the kernels under Triton's interpreter at small shapes against
the float64 reference, and exits 0 (1 if a check fails).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from reference import biwkv4_naive

from .ops import biwkv4, tile_config, traffic

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def _inputs(B, T, C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g) * 2 - 1) * 5.0 / T
    u = torch.randn(C, generator=g) / T
    k = torch.randn(B, T, C, generator=g)
    v = torch.randn(B, T, C, generator=g)
    return [x.to(device=device, dtype=dtype) for x in (w, u, k, v)]


def _cpu_check() -> int:
    print("No GPU found: checking the Triton kernels under the interpreter at small shapes "
          "against the float64 reference (timings need a GPU).")
    print("| B | T | C | dtype | tiles | max rel err y | max rel err grads | ok |")
    print("|---|---|---|---|---|---|---|---|")
    bad = 0
    for (B, T, C, dtype, tiles) in [
            (2, 16, 8, torch.float32, {}), (1, 33, 5, torch.float32, {"BT": 16}),
            (1, 20, 3, torch.float64, {"S": 1}), (2, 9, 70, torch.bfloat16, {})]:
        ins = [x.requires_grad_() for x in _inputs(B, T, C, dtype, "cpu", seed=T)]
        gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1)).to(dtype)
        with tile_config(**tiles):
            y = biwkv4(*ins, backend="triton")
            g = torch.autograd.grad(y, ins, gy)
        r = [x.detach().double().requires_grad_() for x in ins]
        yr = biwkv4_naive(*r)
        gr = torch.autograd.grad(yr, r, gy.double())
        rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        ey = rel(y, yr)
        eg = max(rel(a, b) for a, b in zip(g, gr))
        tol = {torch.float64: 1e-10, torch.float32: 1e-3, torch.bfloat16: 5e-2}[dtype]
        ok = ey < tol and eg < 10 * tol
        bad += not ok
        name = ",".join(f"{k}={v}" for k, v in tiles.items()) or "default"
        print(f"| {B} | {T} | {C} | {str(dtype)[6:]} | {name} | {ey:.2e} | {eg:.2e} | "
              f"{'yes' if ok else 'NO'} |")
    print("all checks passed" if not bad else f"{bad} checks FAILED")
    return 1 if bad else 0


def timed_calls(params, gy, backend="triton"):
    """The forward (no grad) and forward+backward calls the benchmarks time."""
    def fwd():
        with torch.no_grad():
            biwkv4(*params, backend=backend)

    def fb():
        torch.autograd.grad(biwkv4(*params, backend=backend), params, gy)
    return fwd, fb


def _best_config(kernel):
    cfg = getattr(kernel, "best_config", None)
    if cfg is None:
        return "-"
    return ("/".join(f"{k}{v}" for k, v in cfg.kwargs.items())
            + f"/w{cfg.num_warps}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--C", default="640,960")
    ap.add_argument("--T", default="16,64,256,1024,2160,8640,34560")
    ap.add_argument("--B", default="1,8")
    ap.add_argument("--dtype", default="fp32", help="comma-separated: fp32,bf16,fp16,fp64")
    ap.add_argument("--rep", type=int, default=20, help="do_bench rep (ms)")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        # before the first kernel call, which imports the kernel module
        os.environ.setdefault("TRITON_INTERPRET", "1")
        return _cpu_check()

    import triton
    import triton.testing
    from . import _kernels as K

    dev = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}; "
          f"triton {triton.__version__}")
    names = list(K.KERNELS)
    print("| C | T | B | dtype | " + " | ".join(names) + " | fwd ms | fwd+bwd ms | fwd B/el "
          "| fwd+bwd B/el |")
    print("|" + "---|" * (len(names) + 8))
    for dname in args.dtype.split(","):
        dtype = _DT[dname]
        for C in _ints(args.C):
            for T in _ints(args.T):
                for B in _ints(args.B):
                    ins = _inputs(B, T, C, dtype, dev)
                    gy = torch.randn(B, T, C, device=dev, dtype=dtype)
                    params = [x.clone().requires_grad_() for x in ins]
                    fwd, fb = timed_calls(params, gy)
                    try:
                        fb()  # triggers triton.autotune for every kernel
                        t_f = triton.testing.do_bench(fwd, warmup=5, rep=args.rep)
                        t_fb = triton.testing.do_bench(fb, warmup=5, rep=args.rep)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        print(f"| {C} | {T} | {B} | {dname} | OOM |")
                        continue
                    tr = traffic(B, T, C, dtype, backward=True)
                    cfgs = " | ".join(_best_config(K.KERNELS[n]) for n in names)
                    print(f"| {C} | {T} | {B} | {dname} | {cfgs} | {t_f:.3f} | {t_fb:.3f} | "
                          f"{tr['fwd_bytes_per_elem']:.1f} | {tr['fwdbwd_bytes_per_elem']:.1f} |",
                          flush=True)
                    del ins, gy, params
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
