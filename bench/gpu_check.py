"""One prepared GPU check of the Bi-WKV4 kernels (run by bench/gpu_check.sh; at most ~5 min).

    python bench/gpu_check.py [--rep 50]

Fixed kernel configs (HPCM_BIWKV4_AUTOTUNE=0), no pytest, no model code (it imports only
kernels_triton and reference, so neither compressai nor the hpcm_triton models are needed).
In one run it measures:

* copy bandwidth: ``torch.empty_like(x).copy_(x)`` on 1 GiB (read + write);
* an ideal 12 B/element Triton kernel (read k, v; write y = k * v) on the grid and tiles of
  the forward output kernel (one program per (b, 16 channels, tiles-per-program tiles));
* the Bi-WKV4 kernels, forward and forward+backward, at B=1/T=34560/C=640 (a 4K frame),
  B=16/T=4096/C=640 and B=1/T=256/C=640, with one float64 check per shape (relative RMS of
  y and of the four gradients against reference.biwkv4_scan in float64 on the same inputs);

and prints one markdown table: time, the fraction of the copy bandwidth the operator reaches
when counted at the floors of 12 B (forward: k, v, y) and 32 B (forward+backward) per fp32
element, and the bytes the kernels move per element (kernels_triton.ops.traffic). Nothing
here asserts a time.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

os.environ.setdefault("HPCM_BIWKV4_AUTOTUNE", "0")     # fixed configs, before the kernels load
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton.testing  # noqa: E402

from kernels_triton import biwkv4  # noqa: E402
from kernels_triton import ops  # noqa: E402
from reference import biwkv4_scan  # noqa: E402

SHAPES = [(1, 34560, 640), (16, 4096, 640), (1, 256, 640)]
FLOOR_FWD, FLOOR_FB = 12, 32
TOL = {"y": 1e-5, "gw": 1e-4, "gu": 1e-5, "gk": 1e-5, "gv": 1e-5}


@triton.jit
def ideal_kernel(k_ptr, v_ptr, y_ptr, T, C, TPP, BT: tl.constexpr, BLOCK_C: tl.constexpr,
                 STAGES: tl.constexpr):
    """y = k * v over (b, channel block, TPP tiles of BT tokens): 12 B per fp32 element."""
    pid_b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    for i in tl.range(0, TPP, num_stages=STAGES):
        t = (tl.program_id(2) * TPP + i) * BT + tl.arange(0, BT)[:, None]
        m = (t < T) & cmask[None, :]
        off = (pid_b * T + t) * C + cols[None, :]
        k = tl.load(k_ptr + off, mask=m, other=0.0)
        v = tl.load(v_ptr + off, mask=m, other=0.0)
        tl.store(y_ptr + off, k * v, mask=m)


def ideal(k, v, y):
    B, T, C = k.shape
    BT = ops.tile_sizes(k.dtype)[0]
    NT = -(-T // BT)
    TPP = ops._tiles_per_program(NT)
    grid = (B, -(-C // 16), -(-NT // TPP))
    ideal_kernel[grid](k, v, y, T, C, TPP, BT=BT, BLOCK_C=16, STAGES=2, num_warps=4,
                       num_stages=2)


def inputs(B, T, C, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.linspace(0, 8, C, dtype=torch.float64) / T)           # HPCM-like decay ramp
    u = torch.randn(C, generator=g, dtype=torch.float64) / T
    k = torch.randn(B, T, C, generator=g, dtype=torch.float64) * 2
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    gy = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    return [x.to(dev) for x in (w, u, k, v, gy)]


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-300)).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rep", type=int, default=50, help="do_bench rep per measurement (ms)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("No GPU: nothing measured (this check needs CUDA).")
        return 2
    dev = torch.device("cuda")
    t_start = time.time()
    x = torch.empty(1 << 28, dtype=torch.float32, device=dev).uniform_()
    t_copy = triton.testing.do_bench(lambda: torch.empty_like(x).copy_(x), warmup=10, rep=200)
    copy_bw = 2 * x.numel() * 4 / t_copy / 1e6          # GB/s
    del x
    torch.cuda.empty_cache()
    print(f"# Bi-WKV4 GPU check, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"GPU: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}; "
          f"triton {triton.__version__}; fixed configs; fp32")
    print(f"copy bandwidth (torch copy_, 1 GiB, read + write): {copy_bw:.0f} GB/s\n")
    print("| B | T | C | ideal 12 B ms | ideal % copy | fwd ms | fwd % copy @12 B | fwd B/el "
          "| fwd+bwd ms | f+b % copy @32 B | f+b B/el | fp64 check (rel RMS y, gw, gu, gk, gv) |")
    print("|" + "---|" * 12)
    bad = 0
    for B, T, C in SHAPES:
        w64, u64, k64, v64, gy64 = inputs(B, T, C, dev)
        n = B * T * C
        w, u, k, v, gy = (t.float() for t in (w64, u64, k64, v64, gy64))
        y_ideal = torch.empty_like(k)
        t_ideal = triton.testing.do_bench(lambda: ideal(k, v, y_ideal), warmup=5, rep=args.rep)
        params = [t.clone().requires_grad_() for t in (w, u, k, v)]

        def fwd():
            with torch.no_grad():
                biwkv4(*params, backend="triton")

        def fb():
            torch.autograd.grad(biwkv4(*params, backend="triton"), params, gy)
        fb()
        t_f = triton.testing.do_bench(fwd, warmup=5, rep=args.rep)
        t_fb = triton.testing.do_bench(fb, warmup=5, rep=args.rep)
        # one float64 check: the fp32 kernels against the float64 scan on the same inputs
        y = biwkv4(*params, backend="triton")
        grads = torch.autograd.grad(y, params, gy)
        ref = [t.double().requires_grad_() for t in (w, u, k, v)]
        y_r = biwkv4_scan(*ref)
        g_r = torch.autograd.grad(y_r, ref, gy.double())
        errs = {"y": rel_rms(y, y_r)}
        errs.update({n_: rel_rms(a, b) for n_, a, b in zip(("gw", "gu", "gk", "gv"), grads, g_r)})
        ok = all(errs[key] <= TOL[key] for key in TOL)
        bad += not ok
        tr = ops.traffic(B, T, C, torch.float32, backward=True)
        pct = lambda nbytes, ms: 100 * nbytes * n / ms / 1e6 / copy_bw     # noqa: E731
        print(f"| {B} | {T} | {C} | {t_ideal:.3f} | {pct(12, t_ideal):.0f} | {t_f:.3f} | "
              f"{pct(FLOOR_FWD, t_f):.0f} | {tr['fwd_bytes_per_elem']:.1f} | {t_fb:.3f} | "
              f"{pct(FLOOR_FB, t_fb):.0f} | {tr['fwdbwd_bytes_per_elem']:.1f} | "
              + ", ".join(f"{errs[key]:.1e}" for key in ("y", "gw", "gu", "gk", "gv"))
              + f" {'ok' if ok else 'ABOVE TARGET'} |", flush=True)
        del w64, u64, k64, v64, gy64, w, u, k, v, gy, params, y, grads, ref, y_r, g_r, y_ideal
        torch.cuda.empty_cache()
    print(f"\nfp64 targets: relative RMS <= 1e-5 (y, gu, gk, gv), <= 1e-4 (gw); "
          f"{'all met' if not bad else f'{bad} shape(s) above'}; wall {time.time() - t_start:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
