"""Compile-only report of the Bi-WKV4 kernels: no GPU needed.

    python -m kernels_triton.aot [--archs 80,86,89,90] [--dtypes fp32,bf16,fp16,fp64]
                                 [--shapes 4k,b16] [--all-configs] [--fallbacks] [--dump DIR]

Compiles each kernel variant the way Triton's JIT would at a launch on HPCM's shapes: the
JIT's own argument binder specialises the arguments of a launch at "4k" (B = 1, T = 34560,
C = 640: B == 1 becomes a constant) or "b16" (B = 16, T = 4096, C = 640), with 16-byte
aligned pointers (divisibility 16 on every pointer and on C), and the result is compiled with
``triton.compile`` for ``GPUTarget("cuda", arch, 32)``. Variants: every kernel with its
constexpr flags (forward with and without the residuals, forward and backward carries) at
the unit length HPCM's w gives (S = BT); ``--fallbacks`` adds the shorter units that large
|w| selects (S = 1, S = BT / 2). The fixed config of each kernel is compiled, or every
autotune config with ``--all-configs``.

Per variant it prints registers, stack frame and local memory (cuobjdump
--dump-resource-usage), shared memory, whether the PTX has ``cp.async`` (asynchronous copies
into shared memory, which the pipelined tile loops use) or TMA bulk copies
(``cp.async.bulk``), and the number of float64 SASS instructions (cuobjdump -sass: D*
arithmetic and F2F/I2F/F2I/MUFU with an .F64 operand). ``--dump DIR`` writes each variant's
PTX and SASS to DIR.

Spills: ptxas puts register spills in the stack frame, which cuobjdump reports as STACK; its
LOCAL stays 0 for them (``ptxas -v`` on such a kernel: "88 bytes stack frame, 120 bytes
spill stores" with STACK 88, LOCAL 0). A variant counts as spilling when STACK or LOCAL is
above 0.

Exit status 1 on a compile failure, a spill in any variant, a float64 instruction in a
variant whose inputs are not float64, or a tile kernel (fwd_sum, fwd, bwd_sum, bwd) without
asynchronous copies. Reported without failing: fixed configs above 128 registers per thread.

TRITON_INTERPRET must not be set for compilation: ``main`` removes it from its own process's
environment before it imports the kernels, and refuses to run in a process that has already
imported them under the interpreter (run it as ``python -m kernels_triton.aot``). Importing
this module changes nothing (the tests import ``fp64_count`` next to interpreted kernels).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
SHAPES = {"4k": (1, 34560, 640), "b16": (16, 4096, 640)}
TILE_KERNELS = ("fwd_sum", "fwd", "bwd_sum", "bwd")
MAX_REGS = 128
# float64 SASS: D-prefixed arithmetic (DADD, DMUL, DFMA, DSETP, DMNMX, DMMA) and conversions
# or MUFU operations with a 64-bit float operand
_FP64 = re.compile(r"^\s*(?:@!?U?P\w+\s+)?(D(?:ADD|MUL|FMA|SETP|MNMX|MMA)\b|\S*\.F64\b|MUFU\.\w+64H)")


def _tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found at {path}")
    return path


def _launches(dtype, shape, fallbacks):
    """(kernel, variant label, positional args, constexpr kwargs) of every launch
    kernels_triton.ops makes on ``shape``; pointers are MockTensors (16-byte aligned)."""
    from triton.runtime.jit import MockTensor

    from . import ops

    B, T, C = shape
    acc = ops._acc(dtype)
    ACC = ops._tl_acc(dtype)
    BT, DBF, BTB, DBB = ops.tile_sizes(dtype)
    P, A = MockTensor(dtype), MockTensor(acc)
    TB = ops._t_bucket(T)
    NT, NTB = ops._cdiv(T, BT), ops._cdiv(T, BTB)
    TPP, TPPB = ops._tiles_per_program(NT), ops._tiles_per_program(NTB)
    out = []
    for fb in ([False, True] if fallbacks else [False]):
        # the unit lengths HPCM's w gives (the whole tile), or one token and half a tile
        # where half a tile is still a unit ops.unit_rows can choose (16 tokens or more)
        for S, bt, db, kind in ((BT, BT, DBF, "fwd"), (BTB, BTB, DBB, "bwd")) if not fb else \
                [(1, BT, DBF, "fwd"), (1, BTB, DBB, "bwd")] + \
                [(h, b if kind == "fwd" else ops.backward_tile_rows(h, b), min(d, h), kind)
                 for h, b, d, kind in ((BT // 2, BT, DBF, "fwd"), (BTB // 2, BTB, DBB, "bwd"))
                 if h >= 16]:
            NU = ops._cdiv(T, S)
            tag = f"S={S}"
            if kind == "fwd":
                if S > 1:
                    out.append(("fwd_sum", tag, (P, P, P, A, B, T, C, NT, NU, TPP, TB),
                                dict(S=S, BT=bt, DB=db, ACC=ACC)))
                # carry: (summaries, the inputs one-token units read, K_t, w, carries, scratch)
                out.append(("carry", f"{tag},BWD=0", (A if S > 1 else P, P, P, P, A, P, A, A,
                                                      B, T, C, NT, NU, TB),
                            dict(S=S, BT=bt, BWD=False, ACC=ACC)))
                flags = [(False, False), (True, True)]
                if acc == dtype:
                    flags.insert(1, (True, False))      # residuals with y shared (fp32/fp64)
                for store_z, store_ya in flags:
                    out.append(("fwd", f"{tag},Z={int(store_z)},YA={int(store_ya)}",
                                (P, P, P, P, A, P, A if store_z else P, A if store_ya else P, A,
                                 B, T, C, NT, NU, TPP, TB),
                                dict(S=S, BT=bt, DB=db, STORE_Z=store_z, STORE_YA=store_ya,
                                     ACC=ACC, PREC=ops.dot_precision(dtype, False))))
            else:
                if S > 1:
                    out.append(("bwd_sum", tag, (A, P, A, P, A, B, T, C, NTB, NU, TPPB, TB),
                                dict(S=S, BT=bt, DB=db, ACC=ACC)))
                out.append(("carry", f"{tag},BWD=1", (A, A, P, A, A, P, A, A, B, T, C, NT, NU, TB),
                            dict(S=S, BT=BT, BWD=True, ACC=ACC)))
                out.append(("bwd", tag, (P, P, A, A, P, A, P, P, A, P, P, A, A,
                                         B, T, C, NTB, NT, NU, TPPB, TB),
                            dict(S=S, BT=bt, KG=BT, DB=db, ACC=ACC,
                                 PREC=ops.dot_precision(dtype, True))))
    return out


def _compile(fn, args, kwargs, cfg, arch):
    """Compile ``fn`` for sm_<arch> with the specialisation the JIT binder derives from
    ``args`` (as triton.runtime.jit.JITFunction.run does before compiling)."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = {**kwargs, **cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.maxnreg is not None:
        kw["maxnreg"] = cfg.maxnreg
    bound, spec, options = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, options)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                    attrs=attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def _resource_usage(cubin: bytes) -> tuple[dict, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        name = f.name
    try:
        res_txt = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", name],
                                 capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(name)
    res = {}
    for key, pat in (("REG", r"REG:(\d+)"), ("SHARED", r"SHARED:(\d+)"),
                     ("LOCAL", r"LOCAL:(\d+)"), ("STACK", r"STACK:(\d+)")):
        m = re.search(pat, res_txt)
        res[key] = int(m.group(1)) if m else None
    return res, sass


def fp64_count(sass: str) -> int:
    """Number of float64 instructions in a cuobjdump -sass listing."""
    n = 0
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?);", line)
        if m and _FP64.match(m.group(1)):
            n += 1
    return n


def main(argv=None) -> int:
    if "kernels_triton._kernels" not in sys.modules:
        os.environ.pop("TRITON_INTERPRET", None)   # read once, when the kernels are defined
    from . import _kernels as K
    if K.INTERPRET:
        raise SystemExit("kernels_triton.aot: the kernels were imported under TRITON_INTERPRET=1 "
                         "in this process; run `python -m kernels_triton.aot` on its own")

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="80,86,89,90", help="comma-separated SM versions")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16,fp64", help="input dtypes")
    ap.add_argument("--shapes", default="4k", help="comma-separated: " + ",".join(SHAPES))
    ap.add_argument("--kernels", default=",".join(K.KERNELS), help="subset of kernels")
    ap.add_argument("--all-configs", action="store_true", help="every autotune config")
    ap.add_argument("--fallbacks", action="store_true", help="also the units of large |w|")
    ap.add_argument("--dump", default=None, help="write PTX and SASS of each variant here")
    args = ap.parse_args(argv)

    archs = [int(a) for a in args.archs.split(",") if a]
    wanted = set(args.kernels.split(","))
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
    print(f"triton {triton.__version__}; cuobjdump {_tool('cuobjdump')}")
    print("| kernel | variant | dtype | shape | sm | BLOCK_C | warps | stages | regs | stack B "
          "| local B | shared B | cp.async | TMA | fp64 SASS | s |")
    print("|" + "---|" * 16)
    problems, notes, n_ok = [], [], 0
    t_start = time.time()
    for dname in [d for d in args.dtypes.split(",") if d]:
        dtype = _DT[dname]
        for sname in [s for s in args.shapes.split(",") if s]:
            for name, variant, pos, const in _launches(dtype, SHAPES[sname], args.fallbacks):
                if name not in wanted:
                    continue
                fn = K.KERNELS[name].fn          # the JITFunction under the autotuner
                configs = K.CONFIGS[name] if args.all_configs else K.CONFIGS[name][:1]
                for ci, cfg in enumerate(configs):
                    label = f"{name}[{variant}] {dname} {sname} cfg{ci}"
                    cols = (f"{cfg.kwargs['BLOCK_C']} | {cfg.num_warps} | "
                            f"{cfg.kwargs.get('STAGES', cfg.num_stages)}")
                    for arch in archs:
                        t0 = time.time()
                        try:
                            ck = _compile(fn, pos, const, cfg, arch)
                            res, sass = _resource_usage(ck.asm["cubin"])
                        except Exception as e:  # report and keep going
                            problems.append(f"FAILED {label} sm_{arch}: {type(e).__name__}: {e}")
                            print(f"| {name} | {variant} | {dname} | {sname} | {arch} | {cols} "
                                  "| FAILED |" + " |" * 7)
                            continue
                        ptx = ck.asm["ptx"]
                        tma = "cp.async.bulk" in ptx
                        cpa = bool(re.search(r"cp\.async\.(ca|cg)", ptx))
                        n64 = fp64_count(sass)
                        if args.dump:
                            base = os.path.join(args.dump, f"{name}_{re.sub(r'[^A-Za-z0-9]+', '_', variant)}"
                                                f"_{dname}_{sname}_cfg{ci}_sm{arch}")
                            with open(base + ".ptx", "w") as f:
                                f.write(ptx)
                            with open(base + ".sass", "w") as f:
                                f.write(sass)
                        n_ok += 1
                        where = f"{label} sm_{arch}"
                        if any(res[key] is None or res[key] > 0 for key in ("STACK", "LOCAL")):
                            problems.append(f"SPILL {where}: STACK={res['STACK']} LOCAL={res['LOCAL']}")
                        if n64 and dtype != torch.float64:
                            problems.append(f"FP64 {where}: {n64} float64 SASS instructions")
                        if name in TILE_KERNELS and not (cpa or tma):
                            problems.append(f"NO ASYNC COPY {where}")
                        if ci == 0 and (res["REG"] or 0) > MAX_REGS:
                            notes.append(f"REGISTERS {where}: {res['REG']} > {MAX_REGS}")
                        print(f"| {name} | {variant} | {dname} | {sname} | {arch} | {cols} | "
                              f"{res['REG']} | {res['STACK']} | {res['LOCAL']} | {ck.metadata.shared} | "
                              f"{'yes' if cpa else 'no'} | {'yes' if tma else 'no'} | {n64} | "
                              f"{time.time() - t0:.1f} |", flush=True)
    print(f"\ncompiled {n_ok} kernel variants in {time.time() - t_start:.0f} s; "
          f"{len(problems)} problems, {len(notes)} notes")
    for p in problems:
        print(p)
    for n in notes:
        print("note:", n)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
