"""Compile-only report of the Bi-WKV4 kernels: no GPU needed.

    python -m kernels_triton.aot [--archs 80,90] [--dtypes fp32,bf16,fp16,fp64] [--max-configs N]

Compiles every kernel for every autotune config, input dtype and target (sm_80, sm_90 by
default) with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, runs the
bundled ``cuobjdump --dump-resource-usage`` on each cubin and prints, per config (BT or NB,
BLOCK_C, warps, stages), registers, shared memory, stack frame and LOCAL bytes. Exits 1 if any
compile fails or any kernel spills.

Spills: ptxas puts register spills in the stack frame, which cuobjdump reports as STACK; its
LOCAL stays 0 for them (measured: bwd, fp32, sm_90, BT16/BLOCK_C16, 2 warps: STACK 88, LOCAL 0,
``ptxas -v``: "88 bytes stack frame, 120 bytes spill stores"). A kernel counts as spilling when
STACK or LOCAL is above 0 (either way it uses local memory).

TRITON_INTERPRET must not be set for compilation; this module removes it from its own
environment before importing the kernels (run it as its own process).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

_DT = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp64": "fp64"}


def _cuobjdump() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path}")
    return path


def _signatures(in_dt: str):
    """(kernel name, signature, extra constexprs) for every kernel and variant."""
    import triton.language as tl

    acc = "fp64" if in_dt == "fp64" else "fp32"
    ACC = tl.float64 if in_dt == "fp64" else tl.float32
    p_in, p_acc, p64 = f"*{in_dt}", f"*{acc}", "*fp64"
    p_y = p_acc if in_dt in ("bf16", "fp16") else p_in   # y as the backward reads it
    ints = {"B": "i32", "T": "i32", "C": "i32", "NT": "i32", "CHUNK": "i32"}
    tile = {"ACC": "constexpr", "BT": "constexpr", "BLOCK_C": "constexpr"}
    out = []
    out.append(("fwd_summary", {"k_ptr": p_in, "v_ptr": p_in, "w_ptr": p_in, "s_ptr": p64,
                                **ints, **tile}, {"ACC": ACC}))
    out.append(("fwd_carry", {"w_ptr": p_in, "s_ptr": p64, "c_ptr": p64, **ints,
                              "NB": "constexpr", "BLOCK_C": "constexpr"}, {}))
    for carry in (False, True):
        for store_ld in (False, True):
            store_ya = store_ld and in_dt in ("bf16", "fp16")
            out.append(("fwd", {"k_ptr": p_in, "v_ptr": p_in, "w_ptr": p_in, "u_ptr": p_in,
                                "y_ptr": p_in, "logd_ptr": p_acc, "ya_ptr": p_acc if store_ya else p_in,
                                "c_ptr": p64, "sc_ptr": p64, **ints, "SPC": "i32",
                                "HAS_CARRY": "constexpr", "STORE_LD": "constexpr",
                                "STORE_YA": "constexpr", **tile},
                        {"HAS_CARRY": carry, "STORE_LD": store_ld, "STORE_YA": store_ya, "ACC": ACC}))
    out.append(("bwd_summary", {"k_ptr": p_in, "v_ptr": p_in, "w_ptr": p_in, "u_ptr": p_in,
                                "y_ptr": p_y, "logd_ptr": p_acc, "gy_ptr": p_in, "s_ptr": p64,
                                **ints, **tile}, {"ACC": ACC}))
    out.append(("bwd_carry", {"w_ptr": p_in, "s_ptr": p64, "c_ptr": p64, **ints,
                              "NB": "constexpr", "BLOCK_C": "constexpr"}, {}))
    for carry in (False, True):
        out.append(("bwd", {"k_ptr": p_in, "v_ptr": p_in, "w_ptr": p_in, "u_ptr": p_in,
                            "y_ptr": p_y, "logd_ptr": p_acc, "gy_ptr": p_in, "gk_ptr": p_in,
                            "gv_ptr": p_in, "gwp_ptr": p64, "gup_ptr": p64, "c_ptr": p64,
                            "sc_ptr": p64, **ints, "SPC": "i32", "HAS_CARRY": "constexpr", **tile},
                    {"HAS_CARRY": carry, "ACC": ACC}))
    return out


def _resource_usage(cubin: bytes, tool: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        name = f.name
    try:
        txt = subprocess.run([tool, "--dump-resource-usage", name], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(name)
    res = {}
    for key, pat in (("REG", r"REG:(\d+)"), ("SHARED", r"SHARED:(\d+)"),
                     ("LOCAL", r"LOCAL:(\d+)"), ("STACK", r"STACK:(\d+)")):
        m = re.search(pat, txt)
        res[key] = int(m.group(1)) if m else None
    return res


def main(argv=None) -> int:
    from . import _kernels as K

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="80,90", help="comma-separated SM versions")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16,fp64", help="input dtypes")
    ap.add_argument("--kernels", default=",".join(K.KERNELS), help="subset of kernels")
    ap.add_argument("--max-configs", type=int, default=0, help="compile only the first N configs (0: all)")
    args = ap.parse_args(argv)

    tool = _cuobjdump()
    archs = [int(a) for a in args.archs.split(",") if a]
    dtypes = [d for d in args.dtypes.split(",") if d]
    wanted = set(args.kernels.split(","))
    print(f"triton {triton.__version__}; cuobjdump {tool}")
    print("| kernel | variant | dtype | sm | BT/NB | BLOCK_C | warps | stages | regs | shared B "
          "| stack B | local B | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    failures, spills, ok = [], [], []
    t_start = time.time()
    for dt in dtypes:
        for name, sig, extra in _signatures(_DT[dt]):
            if name not in wanted:
                continue
            fn = K.KERNELS[name].fn  # the JITFunction under the Autotuner
            variant = ",".join(f"{k}={int(v)}" for k, v in extra.items() if k != "ACC") or "-"
            configs = K.CONFIGS[name][: args.max_configs] if args.max_configs else K.CONFIGS[name]
            for cfg in configs:
                kw = cfg.kwargs
                cols = (f"{kw.get('BT', kw.get('NB'))} | {kw['BLOCK_C']} | {cfg.num_warps} | "
                        f"{cfg.num_stages}")
                for arch in archs:
                    const = {**extra, **cfg.kwargs}
                    t0 = time.time()
                    try:
                        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const)
                        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                            options={"num_warps": cfg.num_warps,
                                                     "num_stages": cfg.num_stages})
                        res = _resource_usage(ck.asm["cubin"], tool)
                    except Exception as e:  # report and keep going
                        failures.append(f"{name}[{variant}] {dt} sm_{arch} {cfg}: {type(e).__name__}: {e}")
                        print(f"| {name} | {variant} | {dt} | {arch} | {cols} | FAILED | | | | |")
                        continue
                    ok.append(res)
                    if any(res[key] is None or res[key] > 0 for key in ("STACK", "LOCAL")):
                        spills.append(f"{name}[{variant}] {dt} sm_{arch} {cfg}: "
                                      f"STACK={res['STACK']} LOCAL={res['LOCAL']}")
                    print(f"| {name} | {variant} | {dt} | {arch} | {cols} | {res['REG']} | "
                          f"{res['SHARED']} | {res['STACK']} | {res['LOCAL']} | "
                          f"{time.time() - t0:.1f} |", flush=True)
    print(f"\ncompiled {len(ok)} kernel variants, {len(failures)} failures, {len(spills)} with spills")
    if ok:
        def rng(key):
            vals = [r[key] for r in ok if r[key] is not None]
            return f"{min(vals)}-{max(vals)}" if vals else "?"
        print(f"registers {rng('REG')}, shared {rng('SHARED')} B, stack {rng('STACK')} B, "
              f"local {rng('LOCAL')} B; {time.time() - t_start:.0f} s")
    for f in failures:
        print("FAILED:", f)
    for s in spills:
        print("SPILL:", s)
    return 1 if failures or spills else 0


if __name__ == "__main__":
    sys.exit(main())
