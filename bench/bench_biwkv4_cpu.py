"""CPU benchmark of the Bi-WKV4 CPU paths against a floor measured in the same run: the
compiled C kernels (kernels_cpu.biwkv4_cpu, backend "cpu", the models' CPU path) and the
pure-PyTorch scan (reference.biwkv4_scan, backend "torch", the fallback).

    python bench/bench_biwkv4_cpu.py [--threads 2] [--shapes 1x4096x640,1x2160x640] [--repeats 7]
        [--method cpu,torch]

The floor is one fused pass that reads k and v and writes y: ``torch.addcmul(k, k, v, out=y)``
into a preallocated tensor (the least any operator of this shape must move). Each repeat
times the floor, the forward and the forward+backward back to back (each the best of a few
calls, so a repeat is one sample of the machine's current load), and reports the ratios to
that repeat's floor; the table gives the medians over repeats. On a shared machine read the
ratios, not the milliseconds; ``--clock cpu`` times CPU seconds instead of wall seconds.
``--method old`` times the previous float64 autograd scan if a
copy of it is importable as ``bench_old_scan`` (kept out of the package). The C kernels are
compiled before timing (the first use on a machine builds them).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels_cpu import biwkv4_cpu  # noqa: E402
from reference import biwkv4_scan  # noqa: E402

_DT = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


CLOCK = time.perf_counter


def best_of(fn, n):
    ts = []
    for _ in range(n):
        t0 = CLOCK()
        fn()
        ts.append(CLOCK() - t0)
    return min(ts)


def inputs(B, T, C, dtype, seed=0):
    """HPCM-like: w = decay/T with decay in 0..8, u = boost/T, k ~ N(0, 3), v ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(C, generator=g) * 8 / T
    u = torch.randn(C, generator=g) / T
    k = torch.randn(B, T, C, generator=g) * 3
    v = torch.randn(B, T, C, generator=g)
    return [x.to(dtype) for x in (w, u, k, v)]


def bench_shape(fn, B, T, C, dtype, repeats, inner):
    w, u, k, v = inputs(B, T, C, dtype)
    y = torch.empty_like(k)
    ins = [x.clone().requires_grad_() for x in (w, u, k, v)]
    gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1)).to(dtype)

    def floor():
        torch.addcmul(k, k, v, out=y)

    def fwd():
        with torch.no_grad():
            fn(w, u, k, v)

    def fwdbwd():
        out = fn(*ins)
        torch.autograd.grad(out, ins, gy)

    floor(), fwd(), fwdbwd()   # warm-up
    rows = []
    for _ in range(repeats):
        tf = best_of(floor, inner * 3)
        t1 = best_of(fwd, inner)
        t2 = best_of(fwdbwd, inner)
        rows.append((tf, t1, t2))
    med = lambda xs: statistics.median(xs)  # noqa: E731
    return {
        "floor_ms": med([r[0] for r in rows]) * 1e3,
        "fwd_ms": med([r[1] for r in rows]) * 1e3,
        "fwdbwd_ms": med([r[2] for r in rows]) * 1e3,
        "fwd_x": med([r[1] / r[0] for r in rows]),
        "fwdbwd_x": med([r[2] / r[0] for r in rows]),
        "fwd_x_spread": (min(r[1] / r[0] for r in rows), max(r[1] / r[0] for r in rows)),
        "fwdbwd_x_spread": (min(r[2] / r[0] for r in rows), max(r[2] / r[0] for r in rows)),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="1x4096x640", help="comma-separated BxTxC")
    ap.add_argument("--dtype", default="fp32", choices=sorted(_DT))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3, help="calls per sample (best of)")
    ap.add_argument("--method", default="cpu,torch",
                    help="comma-separated: cpu (C kernels), torch (PyTorch scan), old")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall: perf_counter; cpu: process CPU time (all threads summed), which "
                         "other processes' load barely disturbs")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    fns = {}
    for m in args.method.split(","):
        if m == "old":
            from bench_old_scan import biwkv4_scan as fn  # a copy of the previous implementation
        elif m in ("cpu", "torch"):
            fn = biwkv4_cpu if m == "cpu" else biwkv4_scan
        else:
            ap.error(f"unknown method {m!r}")
        fns[m] = fn
    dtype = _DT[args.dtype]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"method {args.method}; dtype {args.dtype}; {args.clock} clock; median of {args.repeats} repeats, "
          f"each the best of {args.inner} calls\n")
    print("| method | B | T | C | floor ms | fwd ms | fwd / floor | fwd+bwd ms | fwd+bwd / floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    for (B, T, C), (method, fn) in ((shape, m) for shape in shapes for m in fns.items()):
        r = bench_shape(fn, B, T, C, dtype, args.repeats, args.inner)
        print(f"| {method} | {B} | {T} | {C} | {r['floor_ms']:.2f} | {r['fwd_ms']:.2f} | "
              f"{r['fwd_x']:.1f} ({r['fwd_x_spread'][0]:.1f}–{r['fwd_x_spread'][1]:.1f}) | "
              f"{r['fwdbwd_ms']:.2f} | {r['fwdbwd_x']:.1f} "
              f"({r['fwdbwd_x_spread'][0]:.1f}–{r['fwdbwd_x_spread'][1]:.1f}) |", flush=True)


if __name__ == "__main__":
    main()
