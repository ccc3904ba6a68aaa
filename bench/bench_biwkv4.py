"""Benchmark Bi-WKV4: the Triton kernels against the memory system, plus the CPU paths.

    python bench/bench_biwkv4.py [--C 640,960] [--dtype fp32] [--quick] [--rep 50]

Shapes (docs/biwkv4.md §5): C = 640 (2M) and 960 (3M, Phase-4 priors); a 256² image gives
T = 16, 64, 256 (B = 1, 8, 16), a 4K frame T = 2160, 8640, 34560 with B = 1; plus B = 16,
T = 4096.

On a GPU, per shape, forward and forward+backward: bytes moved per (b, t, c) element as
counted from the kernels' loads and stores (``kernels_triton.ops.traffic``), kernel launches
per call, time, achieved GB/s (those bytes over the time) and the fraction of the device's
copy bandwidth, measured in the same run as ``torch.empty_like(x).copy_(x)`` on a 1 GiB
buffer. Also "floor %": the time the floors of 12 B (forward) and 32 B (forward+backward) per
fp32 element would take at the measured copy bandwidth, over the measured time. Nothing
asserts time. (bench/gpu_check.sh is the short, prepared version of this.)

Without a GPU: the traffic model (bytes, launches) and the CPU time of the two CPU backends
(the C kernels "cpu" and the PyTorch scan "torch") at sizes two cores can do;
bench/bench_biwkv4_cpu.py compares them with a floor measured in the same run. Prints markdown
tables.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels_triton import biwkv4  # noqa: E402
from kernels_triton.autotune import timed_calls  # noqa: E402
from kernels_triton.ops import traffic  # noqa: E402

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLOOR_FWD, FLOOR_FB = 12, 32      # fp32 bytes per element: k, v, y / + gy, gk, gv, y, (k, v)


def shapes(quick: bool):
    s = [(1, 16), (8, 16), (16, 16), (1, 64), (8, 64), (16, 64), (1, 256), (8, 256), (16, 256),
         (1, 2160), (1, 8640), (1, 34560), (16, 4096)]
    if quick:
        s = [(16, 256), (1, 34560), (16, 4096)]
    return s


def timeit(fn, device, rep_ms=50):
    """Median wall time in ms (CUDA: triton.testing.do_bench)."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=5, rep=rep_ms)
    fn()
    ts = []
    t_end = time.perf_counter() + rep_ms / 1000
    while len(ts) < 3 or (time.perf_counter() < t_end and len(ts) < 50):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def copy_bandwidth(device, rep_ms=100):
    """GB/s of torch.empty_like(x).copy_(x) (read + write) on a 1 GiB fp32 buffer."""
    x = torch.empty(1 << 28, dtype=torch.float32, device=device).uniform_()
    t = timeit(lambda x=x: torch.empty_like(x).copy_(x), device, rep_ms)
    del x
    return 2 * (1 << 30) / t / 1e6


def inputs(B, T, C, dtype, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.linspace(0, 8, C) / T).to(dev, dtype)              # HPCM-like decay ramp
    u = (torch.randn(C, generator=g) / T).to(dev, dtype)
    k = (torch.randn(B, T, C, generator=g) * 2).to(dev, dtype)
    v = torch.randn(B, T, C, generator=g).to(dev, dtype)
    gy = torch.randn(B, T, C, generator=g).to(dev, dtype)
    return w, u, k, v, gy


def gpu_main(args, dtype):
    dev = torch.device("cuda")
    import triton
    bw = copy_bandwidth(dev)
    print(f"# Bi-WKV4 on {torch.cuda.get_device_name()}; torch {torch.__version__}; "
          f"triton {triton.__version__}; dtype {args.dtype}")
    print(f"measured copy bandwidth (torch.empty_like(x).copy_(x), 1 GiB): {bw:.0f} GB/s\n")
    print("| C | B | T | fwd B/el | fwd launches | fwd ms | fwd GB/s | fwd % copy "
          "| fwd floor % | f+b B/el | f+b launches | f+b ms | f+b GB/s | f+b % copy | f+b floor % |")
    print("|" + "---|" * 15)
    for C in [int(c) for c in args.C.split(",")]:
        for B, T in shapes(args.quick):
            w, u, k, v, gy = inputs(B, T, C, dtype, dev)
            n = B * T * C
            params = [x.clone().requires_grad_() for x in (w, u, k, v)]
            fwd, fb = timed_calls(params, gy)
            try:
                fb()
                t_f = timeit(fwd, dev, args.rep)
                t_fb = timeit(fb, dev, args.rep)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"| {C} | {B} | {T} | OOM |" + " |" * 11)
                continue
            tr = traffic(B, T, C, dtype, backward=True)
            bf, bb = tr["fwd_bytes_per_elem"], tr["fwdbwd_bytes_per_elem"]
            gf, gb = bf * n / t_f / 1e6, bb * n / t_fb / 1e6
            ff = FLOOR_FWD * n / bw / 1e6 / t_f * 100
            fbf = FLOOR_FB * n / bw / 1e6 / t_fb * 100
            print(f"| {C} | {B} | {T} | {bf:.1f} | {tr['fwd_launches']} | {t_f:.3f} | {gf:.0f} | "
                  f"{100 * gf / bw:.0f} | {ff:.0f} | {bb:.1f} | {tr['fwdbwd_launches']} | "
                  f"{t_fb:.3f} | {gb:.0f} | {100 * gb / bw:.0f} | {fbf:.0f} |", flush=True)
            del w, u, k, v, gy, params
            torch.cuda.empty_cache()


def cpu_main(args, dtype):
    print(f"# Bi-WKV4 on CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads); "
          f"torch {torch.__version__}; dtype {args.dtype}")
    print("No GPU: the Triton kernels are timed only on a GPU (bench/gpu_check.sh). Their traffic "
          "model (bytes per element from the kernels' loads and stores, units of a tile as "
          "HPCM's w gives; scratch: the carry kernel's segment rows):\n")
    print("| C | B | T | fwd B/el | fwd scratch | fwd launches | f+b B/el | f+b scratch | f+b launches |")
    print("|---|---|---|---|---|---|---|---|---|")
    cpu = torch.device("cpu")
    for C in [int(c) for c in args.C.split(",")]:
        for B, T in shapes(args.quick):
            tr = traffic(B, T, C, dtype, backward=True)
            print(f"| {C} | {B} | {T} | {tr['fwd_bytes_per_elem']:.1f} | "
                  f"{tr['fwd_scratch_per_elem']:.2f} | {tr['fwd_launches']} | "
                  f"{tr['fwdbwd_bytes_per_elem']:.1f} | {tr['fwdbwd_scratch_per_elem']:.2f} | "
                  f"{tr['fwdbwd_launches']} |")
    print(f"\nCPU backends ({torch.get_num_threads()} threads; cpu: C kernels, torch: PyTorch scan):\n")
    print("| backend | C | B | T | fwd ms | fwd+bwd ms |")
    print("|---|---|---|---|---|---|")
    for C in [int(c) for c in args.C.split(",")]:
        for B, T in [(1, 64), (1, 256), (1, 2160)][: 2 if args.quick else 3]:
            w, u, k, v, gy = inputs(B, T, C, dtype, cpu)
            params = [x.clone().requires_grad_() for x in (w, u, k, v)]
            for backend in ("cpu", "torch"):
                fwd, fb = timed_calls(params, gy, backend)
                print(f"| {backend} | {C} | {B} | {T} | {timeit(fwd, cpu, args.rep):.2f} | "
                      f"{timeit(fb, cpu, args.rep):.2f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--C", default="640,960")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--rep", type=int, default=50, help="timing budget per measurement (ms)")
    args = ap.parse_args(argv)
    dtype = _DT[args.dtype]
    if torch.cuda.is_available():
        gpu_main(args, dtype)
    else:
        cpu_main(args, dtype)


if __name__ == "__main__":
    main()
