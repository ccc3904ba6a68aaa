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

What the backward needs (:func:`forward` with ``need_grad``, :func:`residual_specs`): the
denominator of every token in its chunk's unit (B, T, C), the units of the N chunks (B, N, C),
and y in the compute dtype when k's dtype is another. The chunk length L depends on max|w|
(csrc/biwkv4_impl.h, ``biwkv4_chunk_len``: the longest power of two <= 64 and <= T with
L |w| within the kernels' budget), but the residuals' shapes may depend only on the input
shapes and dtypes (a fake tensor has no values). So the units are stored for the chunk length
at w = 0, P(T) (:func:`unit_rows`: R = ceil(T / P(T)) rows), which is L whenever |w| leaves
the longest chunks (HPCM's w = decay / T with |decay| <= 16 always does). When |w| forces
shorter chunks (N > R), the forward stores zeros and the backward runs the forward again for
den and the units: the same kernels on the same inputs, bitwise the same values, so the
gradients do not depend on which case ran.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from reference.biwkv4 import _check

from ._build import CPUKernelUnavailable, available, load, unavailable_reason

__all__ = ["biwkv4_cpu", "BiWKV4CPUFunction", "available", "unavailable_reason",
           "CPUKernelUnavailable", "forward", "backward", "residual_specs", "compute_dtype",
           "unit_rows"]

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


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64, else float32 (float16/bfloat16 compute in float32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def unit_rows(T: int) -> int:
    """Rows R of the stored units, from T alone: the number of chunks at the longest chunk
    length T allows, P(T) = the kernels' chunk length at w = 0 (a power of two <= 64, <= T).
    The actual chunk length is never longer, so N >= R, with N = R unless |w| shortens it."""
    return -(-T // int(_fn("chunk_len", torch.float32)(0.0, int(T))))


def _chunk_len(wc: torch.Tensor, T: int) -> int:
    return int(_fn("chunk_len", wc.dtype)(float(wc.abs().max()), T))


def residual_specs(B, T, C, dtypes) -> list:
    """[(shape, dtype)] of the residuals :func:`forward` returns with ``need_grad``, from the
    sizes and the dtypes of (w, u, k, v) alone: den (B, T, C), the units (B, R, C) (R:
    :func:`unit_rows`), and y in the compute dtype when k's dtype is another."""
    cdt = compute_dtype(*dtypes)
    specs = [((B, T, C), cdt), ((B, unit_rows(T), C), cdt)]
    if dtypes[2] != cdt:
        specs.append(((B, T, C), cdt))
    return specs


def _converted(w, u, k, v):
    """The inputs in the compute dtype, contiguous (the kernels read only their memory)."""
    cdt = compute_dtype(w.dtype, u.dtype, k.dtype, v.dtype)
    return [x if x.dtype == cdt and x.is_contiguous() else x.detach().to(cdt).contiguous()
            for x in (w, u, k, v)]


def forward(w, u, k, v, need_grad: bool):
    """y in k's dtype and, with ``need_grad``, the residuals of :func:`residual_specs` (fresh
    tensors, none of them y or an input); else ``()``."""
    wc, uc, kc, vc = _converted(w, u, k, v)
    B, T, C = kc.shape
    L = _chunk_len(wc, T)
    N = -(-T // L)
    y = torch.empty_like(kc)
    if not need_grad:
        _run("fwd", kc.dtype, wc, uc, kc, vc, y, None, None, B, T, C, L, _threads(B, T, C))
        return y.to(k.dtype), ()
    den = torch.empty_like(kc)
    unit = kc.new_empty(B, unit_rows(T), C)
    if N == unit.shape[1]:
        _run("fwd", kc.dtype, wc, uc, kc, vc, y, den, unit, B, T, C, L, _threads(B, T, C))
    else:   # shorter chunks than the stored units allow: backward() recomputes den and units
        _run("fwd", kc.dtype, wc, uc, kc, vc, y, None, None, B, T, C, L, _threads(B, T, C))
        den.zero_()
        unit.zero_()
    extra = (y,) if k.dtype != kc.dtype else ()
    return y.to(k.dtype), (den, unit) + extra


def backward(w, u, k, v, y, residuals, gy):
    """(gw, gu, gk, gv) in the dtypes of w, u, k, v, from the forward's inputs, its output y
    and its ``residuals``; ``gy`` is the gradient of y."""
    wc, uc, kc, vc = _converted(w, u, k, v)
    B, T, C = kc.shape
    den, unit = residuals[0], residuals[1]
    yc = residuals[2] if len(residuals) > 2 else y
    L = _chunk_len(wc, T)
    N = -(-T // L)
    if N != unit.shape[1]:   # see forward(): the units did not fit, run the forward again
        yc, den, unit = torch.empty_like(kc), torch.empty_like(kc), kc.new_empty(B, N, C)
        _run("fwd", kc.dtype, wc, uc, kc, vc, yc, den, unit, B, T, C, L, _threads(B, T, C))
    gyc = gy.to(kc.dtype).contiguous()
    gk = torch.empty_like(kc)
    gv = torch.empty_like(kc)
    gw = torch.empty(C, dtype=torch.float64)
    gu = torch.empty(C, dtype=torch.float64)
    part = torch.empty(2, B, C, dtype=torch.float64)   # per-batch-row gw, gu before the sum
    _run("bwd", kc.dtype, wc, uc, kc, vc, yc.contiguous(), den.contiguous(), unit, gyc, gk, gv,
         gw, gu, part[0], part[1], B, T, C, L, _threads(B, T, C))
    return gw.to(w.dtype), gu.to(u.dtype), gk.to(k.dtype), gv.to(v.dtype)


class BiWKV4CPUFunction(torch.autograd.Function):
    """Autograd Function of the C Bi-WKV4: computes in float64 when an input is float64, else
    float32; returns k's dtype; gradients in each input's dtype."""

    @staticmethod
    def forward(ctx, w, u, k, v, need_grad=True):
        need = bool(need_grad) and any(ctx.needs_input_grad[:4])
        y, res = forward(w, u, k, v, need)
        if need:
            ctx.save_for_backward(w, u, k, v, y, *res)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        w, u, k, v, y, *res = ctx.saved_tensors
        return (*backward(w, u, k, v, y, res, gy), None)


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
