"""Compile-only report of the Bi-WKV4 kernels (python -m kernels_triton.aot): no GPU needed."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TILE_KERNELS = {"fwd_sum", "fwd", "bwd_sum", "bwd"}


def _has_nvidia_backend():
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "cuobjdump"))


def _aot(*args):
    """Run the compile-only report; return its table rows as lists of cells and the stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HPCM_BIWKV4_AUTOTUNE")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "kernels_triton.aot", *args],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in r.stdout.splitlines()
            if ln.startswith("| ") and not ln.startswith("| kernel")]
    for cells in rows:
        regs, stack, local = (int(c) for c in cells[8:11])
        # spills live in the stack frame (see kernels_triton/aot.py); no float64 instruction
        # in a float32/bf16/fp16 variant; the tile loops copy asynchronously
        assert 0 < regs <= 255 and stack == 0 and local == 0, cells
        if cells[2] != "fp64":
            assert int(cells[14]) == 0, cells
        if cells[0] in TILE_KERNELS:
            assert cells[12] == "yes", cells
    return rows, r.stdout


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton wheel without the NVIDIA backend")
def test_aot_fixed_configs_hpcm_shapes(tmp_path):
    # reduced set to keep CI short: the fixed config of every kernel and variant, fp32 and
    # bf16, sm_90, both HPCM shapes (the full report: python -m kernels_triton.aot)
    rows, out = _aot("--dtypes", "fp32,bf16", "--archs", "90", "--shapes", "4k,b16",
                     "--dump", str(tmp_path))
    # per dtype and shape: fwd_sum, 2 carries, fwd (3 variants fp32, 2 bf16), bwd_sum, bwd
    assert len(rows) == 2 * (8 + 7), out
    assert {cells[0] for cells in rows} == {"fwd_sum", "carry", "fwd", "bwd_sum", "bwd"}
    assert re.search(r"compiled 30 kernel variants in \d+ s; 0 problems", out)
    dumped = os.listdir(tmp_path)
    assert len([f for f in dumped if f.endswith(".ptx")]) == 30
    assert len([f for f in dumped if f.endswith(".sass")]) == 30
    sass = open(os.path.join(tmp_path, sorted(f for f in dumped if f.endswith(".sass"))[0])).read()
    assert "Function" in sass


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton wheel without the NVIDIA backend")
def test_aot_fallback_units_sm80():
    # the shorter units large |w| selects (one token, half a tile), fp32, sm_80
    rows, out = _aot("--dtypes", "fp32", "--archs", "80", "--fallbacks", "--kernels",
                     "fwd,bwd,carry")
    variants = {(c[0], c[1]) for c in rows}
    assert ("fwd", "S=1,Z=1,YA=0") in variants and ("bwd", "S=1") in variants
    assert ("bwd", "S=16") in variants and ("carry", "S=1,BWD=1") in variants


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton wheel without the NVIDIA backend")
def test_aot_backward_without_spills():
    # the backward at every unit length, sm_80 and sm_90: float64 (whose DMMA dots spilled
    # 168-176 B before it multiplied on the FMA units) and float32 (whose two 16-token units
    # per tile spilled 8 B on sm_90 before units shorter than a tile got tiles of one unit)
    rows, out = _aot("--dtypes", "fp32,fp64", "--archs", "80,90", "--fallbacks", "--kernels", "bwd")
    assert re.search(r"compiled 10 kernel variants in \d+ s; 0 problems", out), out
    assert {(c[1], c[2]) for c in rows} == {("S=16", "fp64"), ("S=1", "fp64"), ("S=32", "fp32"),
                                            ("S=16", "fp32"), ("S=1", "fp32")}
    assert all(int(c[14]) > 0 for c in rows if c[2] == "fp64"), out


def test_fp64_count():
    sys.path.insert(0, ROOT)
    from kernels_triton.aot import fp64_count

    sass = "\n".join([
        "        /*0070*/                   DFMA R4, R2, R4, R6 ;",
        "        /*0080*/                   FFMA R4, R2, R4, R6 ;",
        "        /*0090*/               @P0 DADD R4, R2, R4 ;",
        "        /*00a0*/                   F2F.F64.F32 R2, R0 ;",
        "        /*00b0*/                   MUFU.RCP64H R3, R5 ;",
        "        /*00c0*/                   DSETP.GT.AND P0, PT, R2, R4, PT ;",
        "        /*00d0*/                   MUFU.EX2 R3, R5 ;",
        "        /*00e0*/                   HMMA.1688.F32.TF32 R4, R8, R12, R4 ;",
    ])
    assert fp64_count(sass) == 5


def test_autotune_cli():
    """Without a GPU it checks the kernels under the interpreter and exits 0; with one it
    runs triton.autotune on a single small shape and reports the chosen configs."""
    import torch

    env = {k: v for k, v in os.environ.items() if k != "HPCM_BIWKV4_AUTOTUNE"}  # all configs
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "kernels_triton.autotune", "--C", "640", "--T", "512",
                        "--B", "1", "--rep", "5"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if torch.cuda.is_available():
        assert "| 640 | 512 | 1 | fp32 |" in r.stdout
    else:
        assert "No GPU found" in r.stdout and "all checks passed" in r.stdout
        assert r.stdout.count("| yes |") == 4
