"""The compiled CPU kernels (kernels_cpu): channel blocking, dispatch, building and fallback.
Numerics on awkward shapes, extremes, long T and thread counts are in test_biwkv4_reference.py
(every test there runs on both CPU paths)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels_cpu
from kernels_cpu import CPUKernelUnavailable, biwkv4_cpu
from kernels_triton import biwkv4, resolve_backend
from reference import biwkv4_naive, biwkv4_scan

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not kernels_cpu.available(),
                                reason=f"C kernels unavailable: {kernels_cpu.unavailable_reason()}")


def inputs(B, T, C, dtype=torch.float64, seed=0, w_scale=6.0, k_scale=8.0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g, dtype=torch.float64) * 2 - 1) * w_scale / T
    u = torch.randn(C, generator=g, dtype=torch.float64)
    k = (torch.rand(B, T, C, generator=g, dtype=torch.float64) * 2 - 1) * k_scale
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (w, u, k, v)]


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("C", [16, 17, 37, 48])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_full_and_partial_channel_blocks(C, dtype, tol):
    """Tasks are blocks of 16 channels: whole blocks, a partial last block, and both; forward
    and all four gradients against the float64 softmax form."""
    B, T = 3, 45
    ins = [x.requires_grad_() for x in inputs(B, T, C, dtype, seed=C)]
    gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = biwkv4_cpu(*ins)
    g = torch.autograd.grad(y, ins, gy.to(dtype))
    ref = [x.detach().double().requires_grad_() for x in ins]
    y_r = biwkv4_naive(*ref)
    g_r = torch.autograd.grad(y_r, ref, gy)
    assert y.dtype == dtype and rel(y, y_r) < tol
    for name, a, b in zip("wukv", g, g_r):
        assert a.dtype == dtype, name
        assert rel(a, b) < tol, (name, rel(a, b))


def test_no_grad_forward_equals_grad_forward():
    """Under no_grad the forward skips storing what the backward needs; y is bitwise the same."""
    w, u, k, v = inputs(2, 300, 40, torch.float32, seed=3)
    with torch.no_grad():
        y0 = biwkv4_cpu(w, u, k, v)
    y1 = biwkv4_cpu(w, u, k.requires_grad_(), v)
    assert torch.equal(y0, y1.detach())


def test_strided_and_half_inputs():
    w, u, k, v = inputs(2, 50, 24, torch.float32, seed=4)
    kt = k.transpose(0, 1).contiguous().transpose(0, 1)     # same values, other strides
    assert not kt.is_contiguous()
    assert torch.equal(biwkv4_cpu(w, u, kt, v[:, :, :]), biwkv4_cpu(w, u, k, v))
    ins = [x.to(torch.bfloat16).requires_grad_() for x in (w, u, k, v)]
    y = biwkv4_cpu(*ins)
    grads = torch.autograd.grad(y.float().sum(), ins)
    assert y.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert rel(y, biwkv4_naive(*[x.detach().double() for x in ins])) < 1e-2


def test_close_to_the_torch_scan_fp32():
    """Two independent float32 implementations of the same anchored scheme agree to float32
    rounding (they are not bitwise equal: different summation order inside a chunk)."""
    ins = inputs(1, 2000, 40, torch.float32, seed=5, w_scale=8.0, k_scale=5.0)
    a, b = biwkv4_cpu(*ins), biwkv4_scan(*ins)
    assert ((a - b).norm() / b.norm()).item() < 1e-6


def test_dispatch():
    w, u, k, v = inputs(1, 20, 5, torch.float32, seed=6)
    assert resolve_backend("cpu") == "cpu"
    assert resolve_backend("cpu", "torch") == "torch"
    assert torch.equal(biwkv4(w, u, k, v), biwkv4_cpu(w, u, k, v))             # auto on CPU
    assert torch.equal(biwkv4(w, u, k, v, backend="cpu"), biwkv4_cpu(w, u, k, v))
    assert torch.equal(biwkv4(w, u, k, v, backend="torch"), biwkv4_scan(w, u, k, v))
    with pytest.raises(ValueError, match="w must have shape"):
        biwkv4_cpu(w[:2], u, k, v)
    with pytest.raises(ValueError, match="backend must be one of"):
        biwkv4(w, u, k, v, backend="c")


def _run(code, **env):
    e = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                          timeout=900, cwd=ROOT)


def test_without_a_compiler_auto_falls_back_with_a_reason(tmp_path):
    """No C compiler (CC names a missing program, and the defaults are hidden from PATH):
    backend "auto" warns once with the reason and runs the pure-PyTorch scan; backend "cpu"
    raises CPUKernelUnavailable; HPCM_TRITON_CPU_KERNEL=0 disables the kernels the same way."""
    code = (
        "import warnings, torch, kernels_cpu\n"
        "from kernels_triton import biwkv4, resolve_backend\n"
        "from reference import biwkv4_scan\n"
        "x = torch.randn(1, 9, 3)\n"
        "with warnings.catch_warnings(record=True) as ws:\n"
        "    warnings.simplefilter('always')\n"
        "    y = biwkv4(torch.zeros(3), torch.zeros(3), x, x)\n"
        "    biwkv4(torch.zeros(3), torch.zeros(3), x, x)\n"
        "assert torch.equal(y, biwkv4_scan(torch.zeros(3), torch.zeros(3), x, x))\n"
        "msgs = [str(w.message) for w in ws if 'Bi-WKV4' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print(resolve_backend('cpu'), msgs[0])\n"
        "try:\n"
        "    biwkv4(torch.zeros(3), torch.zeros(3), x, x, backend='cpu')\n"
        "except kernels_cpu.CPUKernelUnavailable as e:\n"
        "    print('raised', type(e).__name__)\n")
    r = _run(code, CC=str(tmp_path / "no-such-cc"), PATH=str(tmp_path),
             HPCM_TRITON_CACHE=str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("torch ") and "no C compiler found" in r.stdout
    assert "raised CPUKernelUnavailable" in r.stdout
    r = _run(code, HPCM_TRITON_CPU_KERNEL="0")
    assert r.returncode == 0, r.stderr
    assert "disabled by HPCM_TRITON_CPU_KERNEL=0" in r.stdout


def test_concurrent_first_builds_make_one_library_and_a_broken_one_is_reported(tmp_path):
    """Two processes meeting an empty cache build once (a file lock) and both load it. A cache
    entry that is not a loadable library (here: overwritten) is rebuilt (test_hostile_env.py);
    when the rebuild fails too (here: a compiler that fails), it gives a reason, not a crash."""
    cache = tmp_path / "cache"
    code = "import kernels_cpu; assert kernels_cpu.available(), kernels_cpu.unavailable_reason(); print('ok')"
    e = {**os.environ, "PYTHONPATH": str(ROOT), "HPCM_TRITON_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=e, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    libs = list((cache / "cpu_kernels").glob("libbiwkv4-*.so"))
    assert len(libs) == 1 and not list((cache / "cpu_kernels").glob("*.tmp"))
    libs[0].write_bytes(b"not an ELF file")
    r = _run("from kernels_cpu import _build\n"
             "def fail(cc, flags, out): raise _build.CPUKernelUnavailable('the compiler failed')\n"
             "_build._compile = fail\n"
             "import kernels_cpu; print(kernels_cpu.available(), kernels_cpu.unavailable_reason())",
             HPCM_TRITON_CACHE=str(cache))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("False could not load the CPU kernel library")
    assert "rebuilding it failed: the compiler failed" in r.stdout


def test_error_type_is_exported():
    assert issubclass(CPUKernelUnavailable, RuntimeError)
