"""Benchmark Bi-WKV4: Triton kernels vs the PyTorch scan vs the naive O(T^2) reference.

    python bench/bench_biwkv4.py [--C 640,960] [--dtype fp32] [--quick]

HPCM shapes: C = 640 (2M) and 960 (3M); T = 16, 64, 256 (a 256^2 image, B = 1 and 8) and the
4K-frame sizes T = 2160, 8640, 34560 with B = 1. Times the forward and forward+backward;
achieved GB/s is against the bytes that must move: k, v read and y written (forward), plus
gy read and gk, gv written (backward). The naive reference only where T <= 4096.
On a machine without a GPU only the CPU paths (torch scan, naive) are timed, at sizes two
cores can do; the Triton kernels are timed only on a GPU. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels_triton import biwkv4  # noqa: E402
from reference import biwkv4_naive, biwkv4_scan  # noqa: E402

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def nbytes(B, T, C, dtype, backward):
    n = B * T * C * torch.empty((), dtype=dtype).element_size()
    return n * (3 + (5 if backward else 0))


def timeit(fn, device, min_reps=3, budget_s=1.0):
    """Median wall time in ms (CUDA: triton.testing.do_bench)."""
    if device.type == "cuda":
        import triton
        import triton.testing
        return triton.testing.do_bench(fn, warmup=5, rep=int(budget_s * 100))
    fn()  # warm-up
    ts = []
    t_end = time.perf_counter() + budget_s
    while len(ts) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        if len(ts) >= 50:
            break
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--C", default="640,960")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default); 1 is steadier on a shared box")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    dtype = _DT[args.dtype]
    Cs = [int(c) for c in args.C.split(",")]
    if gpu:
        shapes = [(1, 16), (8, 16), (1, 64), (8, 64), (1, 256), (8, 256), (1, 2160), (1, 8640),
                  (1, 34560)]
        if args.quick:
            shapes = [(8, 256), (1, 2160), (1, 34560)]
        methods = ["triton", "torch-scan", "naive"]
        naive_max_T = 4096
    else:
        shapes = [(1, 16), (1, 64), (1, 256), (1, 2160)]
        if args.quick:
            shapes = [(1, 64), (1, 256)]
        methods = ["torch-scan", "naive"]
        naive_max_T = 256
    if args.threads:
        torch.set_num_threads(args.threads)
    name = (torch.cuda.get_device_name() if gpu else
            f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    print(f"# Bi-WKV4 benchmark on {name}; torch {torch.__version__}; dtype {args.dtype}")
    if not gpu:
        print("No GPU: only the CPU paths (torch scan, naive) are timed; the Triton kernels are "
              "timed only on a GPU (run bench/gpu_check.sh there).")
    print()
    print("| method | C | B | T | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for C in Cs:
        for B, T in shapes:
            g = torch.Generator().manual_seed(0)
            w = ((torch.rand(C, generator=g) * 2 - 1) * 5.0 / T).to(dev, dtype)
            u = (torch.randn(C, generator=g) / T).to(dev, dtype)
            k = torch.randn(B, T, C, generator=g).to(dev, dtype)
            v = torch.randn(B, T, C, generator=g).to(dev, dtype)
            gy = torch.randn(B, T, C, generator=g).to(dev, dtype)
            for m in methods:
                if m == "naive" and T > naive_max_T:
                    continue
                f = {"triton": lambda *a: biwkv4(*a, backend="triton"),
                     "torch-scan": biwkv4_scan, "naive": biwkv4_naive}[m]
                params = [x.clone().requires_grad_() for x in (w, u, k, v)]

                def fwd():
                    with torch.no_grad():
                        return f(*params)

                def fb():
                    y = f(*params)
                    torch.autograd.grad(y, params, gy)
                # naive fwd+bwd keeps B*T*T*C logits alive: skip it past 2^31 elements
                skip_bwd = m == "naive" and B * T * T * C > 2**31
                try:
                    t_f = timeit(fwd, dev)
                    t_fb = float("nan") if skip_bwd else timeit(fb, dev)
                except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                    if "out of memory" not in str(e).lower():
                        raise
                    torch.cuda.empty_cache()
                    print(f"| {m} | {C} | {B} | {T} | OOM | | | |")
                    continue
                print(f"| {m} | {C} | {B} | {T} | {t_f:.3f} | "
                      f"{nbytes(B, T, C, dtype, False) / t_f / 1e6:.2f} | {t_fb:.3f} | "
                      f"{nbytes(B, T, C, dtype, True) / t_fb / 1e6:.2f} |", flush=True)
            if gpu:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
