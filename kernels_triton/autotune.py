"""Sweep Bi-WKV4 strategies and kernel configs over HPCM shapes; write a JSON the dispatcher loads.

    python -m kernels_triton.autotune [--C 640,960] [--T 16,64,...] [--B 1,8]
                                      [--dtype fp32] [--chunks 64,128,256,512,1024]
                                      [--json ~/.cache/hpcm_triton/biwkv4_autotune.json]

On a GPU: for every (C, T, B, dtype) times forward and forward+backward of the "sequential"
strategy and of the "chunked" strategy at each chunk length (< T); the BT / BLOCK_C / warps /
stages config of each kernel is picked by triton.autotune (keyed on C, the dtypes and the
constexpr flags, never T or B) and reported. Prints a markdown table (shape, strategy, chunk, chosen fwd/bwd configs, times,
achieved GB/s against the bytes that must move: k, v read and y written for the forward, plus
gy read and gk, gv written for the backward) and writes the fastest strategy/chunk per shape
to the JSON, which kernels_triton.ops.choose_strategy reads (nearest B, T entry of the same
device, C and dtype).

Without a GPU: says so, checks the kernels under Triton's interpreter at small shapes against
the float64 reference, and exits 0 (1 if a check fails).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # must precede the (lazy) import of the kernel module
    os.environ.setdefault("TRITON_INTERPRET", "1")

from reference import biwkv4_naive  # noqa: E402

from .ops import DEFAULT_TUNE_PATH, biwkv4, device_name  # noqa: E402

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def _bytes(B, T, C, dtype, backward):
    n = B * T * C * torch.empty((), dtype=dtype).element_size()
    return n * (3 + (5 if backward else 0))


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
    print("| B | T | C | dtype | strategy | chunk | max rel err y | max rel err grads | ok |")
    print("|---|---|---|---|---|---|---|---|---|")
    bad = 0
    for (B, T, C, dtype, strategy, chunk) in [
        (2, 16, 8, torch.float32, "sequential", None), (1, 33, 5, torch.float32, "chunked", 8),
        (1, 20, 3, torch.float64, "chunked", 4), (2, 9, 70, torch.bfloat16, "sequential", None)]:
        ins = [x.requires_grad_() for x in _inputs(B, T, C, dtype, "cpu", seed=T)]
        gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1)).to(dtype)
        y = biwkv4(*ins, backend="triton", strategy=strategy, chunk=chunk)
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
        print(f"| {B} | {T} | {C} | {str(dtype)[6:]} | {strategy} | {chunk or T} | {ey:.2e} | "
              f"{eg:.2e} | {'yes' if ok else 'NO'} |")
    print("all checks passed" if not bad else f"{bad} checks FAILED")
    return 1 if bad else 0


def _write_json(path, entries, triton_version):
    """Merge entries into the JSON (replacing same device/C/T/B/dtype) and write it."""
    out = Path(os.path.expanduser(path))
    out.parent.mkdir(parents=True, exist_ok=True)
    old = {}
    if out.exists():
        try:
            old = json.loads(out.read_text())
        except ValueError:
            old = {}
    new_keys = {(e["device"], e["C"], e["T"], e["B"], e["dtype"]) for e in entries}
    keep = [e for e in old.get("entries", [])
            if (e.get("device"), e.get("C"), e.get("T"), e.get("B"), e.get("dtype")) not in new_keys]
    out.write_text(json.dumps({"version": 1, "written": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "torch": torch.__version__, "triton": triton_version,
                               "entries": keep + entries}, indent=1))
    return out


def _best_config(kernel):
    cfg = getattr(kernel, "best_config", None)
    if cfg is None:
        return "-"
    return ("/".join(f"{k}{v}" for k, v in cfg.kwargs.items())
            + f"/w{cfg.num_warps}/s{cfg.num_stages}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--C", default="640,960")
    ap.add_argument("--T", default="16,64,256,1024,2160,8640,34560")
    ap.add_argument("--B", default="1,8")
    ap.add_argument("--dtype", default="fp32", help="comma-separated: fp32,bf16,fp16,fp64")
    ap.add_argument("--chunks", default="64,128,256,512,1024")
    ap.add_argument("--json", default=str(DEFAULT_TUNE_PATH))
    ap.add_argument("--rep", type=int, default=20, help="do_bench rep (ms)")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        return _cpu_check()

    import triton
    import triton.testing
    from . import _kernels as K

    dev = torch.device("cuda")
    name = device_name(dev)
    print(f"GPU: {name}; torch {torch.__version__}; triton {triton.__version__}")
    print("| C | T | B | dtype | strategy | chunk | fwd cfg | bwd cfg | fwd ms | fwd GB/s | "
          "fwd+bwd ms | fwd+bwd GB/s | best |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    entries = []
    out = Path(os.path.expanduser(args.json))
    for dname in args.dtype.split(","):
        dtype = _DT[dname]
        for C in _ints(args.C):
            for T in _ints(args.T):
                for B in _ints(args.B):
                    ins = _inputs(B, T, C, dtype, dev)
                    gy = torch.randn(B, T, C, device=dev, dtype=dtype)
                    cands = [("sequential", T)] + [("chunked", c) for c in _ints(args.chunks) if c < T]
                    rows = []
                    for strategy, chunk in cands:
                        try:
                            params = [x.clone().requires_grad_() for x in ins]

                            # loop values bound as defaults (the closures outlive the iteration)
                            def run(params=params, strategy=strategy, chunk=chunk):
                                return biwkv4(*params, backend="triton", strategy=strategy,
                                              chunk=chunk)

                            def fwd(run=run):
                                with torch.no_grad():
                                    run()

                            def fb(run=run, params=params, gy=gy):
                                torch.autograd.grad(run(), params, gy)
                            fb()  # triggers triton.autotune for every kernel
                            t_f = triton.testing.do_bench(fwd, warmup=5, rep=args.rep)
                            t_fb = triton.testing.do_bench(fb, warmup=5, rep=args.rep)
                        except torch.cuda.OutOfMemoryError:
                            torch.cuda.empty_cache()
                            print(f"| {C} | {T} | {B} | {dname} | {strategy} | {chunk} | OOM |||||||")
                            continue
                        cf = _best_config(K.biwkv4_fwd_kernel)
                        cb = _best_config(K.biwkv4_bwd_kernel)
                        rows.append((t_fb, strategy, chunk, cf, cb, t_f))
                    if not rows:
                        continue
                    best = min(rows)
                    for (t_fb, strategy, chunk, cf, cb, t_f) in rows:
                        gbf = _bytes(B, T, C, dtype, False) / t_f / 1e6
                        gbb = _bytes(B, T, C, dtype, True) / t_fb / 1e6
                        mark = "**best**" if (strategy, chunk) == best[1:3] else ""
                        print(f"| {C} | {T} | {B} | {dname} | {strategy} | {chunk} | {cf} | {cb} | "
                              f"{t_f:.3f} | {gbf:.0f} | {t_fb:.3f} | {gbb:.0f} | {mark} |", flush=True)
                    entries.append({"device": name, "C": C, "T": T, "B": B, "dtype": str(dtype),
                                    "strategy": best[1], "chunk": best[2], "fwd_config": best[3],
                                    "bwd_config": best[4], "fwd_ms": best[5], "fwdbwd_ms": best[0]})
                    out = _write_json(args.json, entries, triton.__version__)  # after every shape
                    del ins, gy
                    torch.cuda.empty_cache()
    print(f"\nwrote {len(entries)} entries to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
