"""Bi-WKV4 (Vision-RWKV Eq. 5) on the CPU as compiled C kernels, with an analytic backward.

Per batch b and channel c, tokens t = 0..T-1::

    l(t, i) = k_i - (|t - i| - 1) * w     (i != t)
    l(t, t) = u + k_t
    y_t     = sum_i softmax_i(l(t, .)) * v_i

Kernels (csrc/biwkv4.c): one task per (batch row, 16 adjacent channels) walks the T tokens in
chunks with exponentials anchored per chunk, float64 carries between chunks (the float32
error does not grow with T), right-hand sums as their own scans (no subtraction), and no EPS.
Forward: two passes over the tokens (carries, then y). Backward: two passes (carries of
q = gy/D and r = gy*y/D, then gk, gv and the gw/gu sums, including the distance-weighted sums
gw needs). Tasks run on ``torch.get_num_threads()`` threads; the results are bitwise the same
for any thread count (no reduction crosses tasks but gw/gu over the batch, in a fixed order).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from reference.biwkv4 import _check

from ._build import CPUKernelUnavailable, available, load, unavailable_reason

__all__ = ["biwkv4_cpu", "BiWKV4CPUFunction", "available", "unavailable_reason",
           "CPUKernelUnavailable"]

_CB = 16                  # channels per task (csrc/biwkv4.c)
_MIN_WORK = 1 << 15       # elements per thread below which extra threads cost more than they give


def _ptr(x):
    return None if x is None else x.data_ptr()


def _threads(B: int, T: int, C: int) -> int:
    tasks = B * -(-C // _CB)
    return max(1, min(torch.get_num_threads(), tasks, (B * T * C) // _MIN_WORK or 1))


def _fn(name: str, dtype: torch.dtype):
    """The C entry point ``biwkv4_<name>_<f32|f64>`` for the compute dtype."""
    return getattr(load(), f"biwkv4_{name}_{'f64' if dtype == torch.float64 else 'f32'}")


def _run(name: str, dtype: torch.dtype, *args) -> None:
    """Calls a C kernel entry point on tensors (passed as pointers) and sizes."""
    if _fn(name, dtype)(*(_ptr(a) if a is None or isinstance(a, torch.Tensor) else a for a in args)):
        raise MemoryError("biwkv4_cpu: could not allocate the kernels' scratch memory")


def _forward(w, u, k, v, need_grad: bool):
    B, T, C = k.shape
    L = int(_fn("chunk_len", k.dtype)(float(w.abs().max()), T))
    y = torch.empty_like(k)
    den = torch.empty_like(k) if need_grad else None
    unit = k.new_empty(B, -(-T // L), C) if need_grad else None
    _run("fwd", k.dtype, w, u, k, v, y, den, unit, B, T, C, L, _threads(B, T, C))
    return y, den, unit, L


def _backward(w, u, k, v, y, den, unit, gy, L):
    B, T, C = k.shape
    gk = torch.empty_like(k)
    gv = torch.empty_like(k)
    gw = torch.empty(C, dtype=torch.float64)
    gu = torch.empty(C, dtype=torch.float64)
    part = torch.empty(2, B, C, dtype=torch.float64)   # per-batch-row gw, gu before the sum
    _run("bwd", k.dtype, w, u, k, v, y, den, unit, gy, gk, gv, gw, gu, part[0], part[1],
         B, T, C, L, _threads(B, T, C))
    return gw, gu, gk, gv


class BiWKV4CPUFunction(torch.autograd.Function):
    """Autograd Function of the C Bi-WKV4: computes in float64 when an input is float64, else
    float32; returns k's dtype; gradients in each input's dtype."""

    @staticmethod
    def forward(ctx, w, u, k, v, need_grad=True):
        cdt = torch.float64 if torch.float64 in (w.dtype, u.dtype, k.dtype, v.dtype) else torch.float32
        wc, uc, kc, vc = (x.detach().to(cdt).contiguous() for x in (w, u, k, v))
        need = bool(need_grad) and any(ctx.needs_input_grad[:4])
        y, den, unit, L = _forward(wc, uc, kc, vc, need)
        ctx.meta = (L, w.dtype, u.dtype, k.dtype, v.dtype)
        if need:
            ctx.save_for_backward(wc, uc, kc, vc, y, den, unit)
        return y.to(k.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        wc, uc, kc, vc, y, den, unit = ctx.saved_tensors
        L, wdt, udt, kdt, vdt = ctx.meta
        gw, gu, gk, gv = _backward(wc, uc, kc, vc, y, den, unit, gy.to(kc.dtype).contiguous(), L)
        return gw.to(wdt), gu.to(udt), gk.to(kdt), gv.to(vdt), None


def biwkv4_cpu(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bi-WKV4 on CPU tensors with the compiled C kernels.

    Args:
        w, u: (C,) decay and bonus, any sign (LALIC passes decay/T and boost/T).
        k, v: (B, T, C), any float dtype, contiguous or strided.
    Returns:
        y: (B, T, C) in k's dtype. Computes in float64 when an input is float64, else float32
        (float16/bfloat16 in float32). Differentiable in w, u, k, v with the exact gradient
        (not twice). Bitwise deterministic, also across thread counts.
    Raises:
        ValueError: wrong shapes; CUDA tensors.
        CPUKernelUnavailable: the kernels could not be compiled or loaded (the reason says why).
    """
    _check(w, u, k, v)
    if any(x.is_cuda for x in (w, u, k, v)):
        raise ValueError("biwkv4_cpu takes CPU tensors")
    if k.numel() == 0:
        return torch.empty_like(k)
    need_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (w, u, k, v))
    return BiWKV4CPUFunction.apply(w, u, k, v, need_grad)
