"""Bi-WKV4 as a registered PyTorch operator: ``torch.ops.hpcm.biwkv4`` and its backward.

The operator is Eq. 5 of Vision-RWKV as docs/biwkv4.md §1 states it: per batch row b and
channel c, ``y_t = sum_i softmax_i(l(t, .)) v_i`` with ``l(t, i) = k_i - (|t - i| - 1) w``
(i != t) and ``l(t, t) = u + k_t``. :func:`kernels_triton.biwkv4` validates its inputs and
calls it; models call that function. Registering it makes it one opaque node for
``torch.compile`` (no graph break, no tracing into ctypes or Triton launches), for
``torch.library.opcheck`` and for ``torch.utils.flop_counter``.

Schemas::

    hpcm::biwkv4(Tensor w, Tensor u, Tensor k, Tensor v, str backend, bool need_grad)
        -> (Tensor y, Tensor[] residuals)
    hpcm::biwkv4_backward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor y,
                          Tensor[] residuals, Tensor gy, str backend)
        -> (Tensor gw, Tensor gu, Tensor gk, Tensor gv)

``w, u: (C,)``, ``k, v: (B, T, C)``; y has k's shape and dtype; gw, gu, gk, gv the dtypes of
w, u, k, v. ``residuals`` is what the backward needs: empty unless ``need_grad``
(:func:`kernels_triton.biwkv4` passes ``torch.is_grad_enabled()`` and whether an input
requires grad, so inference stores nothing). The outputs are fresh tensors; the residuals are
not differentiable. ``register_autograd`` saves w, u, k, v, y and the residuals and calls
``hpcm::biwkv4_backward``, which is not differentiable again (no double backward).

Backends (``backend``; "auto" is resolved inside the op by
:func:`kernels_triton.ops.resolve_backend`, so the compiled graph holds no Python check of
whether the C kernels built):

* CPU tensors: "cpu" runs the compiled C kernels (``kernels_cpu.ops.forward``,
  ``backward``), "torch" the PyTorch scan (:func:`reference.biwkv4_scan`), "triton" the Triton
  kernels through Triton's interpreter (``TRITON_INTERPRET=1``), "auto" is "cpu" where the C
  kernels load, else "torch".
* CUDA tensors: "triton" (or "auto") runs the Triton kernels through
  ``kernels_triton.ops.triton_forward`` / ``triton_backward``; other backends are refused.
* The "torch" backend stores no residuals (its own are sized by a chunk length that depends on
  w, docs/biwkv4.md §2): its backward runs the scan's forward again, then its analytic
  backward, which gives bitwise the gradients of ``biwkv4_scan``'s autograd Function at the
  cost of one more forward.

Why ``torch.library.custom_op`` with a CUDA kernel, not ``triton_op`` / ``wrap_triton``: a
``triton_op`` body is traced with fake tensors, so every launch must go through
``wrap_triton`` and no host code may read tensor values. The Triton path's host side does
both: it picks the unit length from max|w| (w's values), picks the launch
configs from the autotune file and the selection settings of ``kernels_triton.ops``
(``shape_only_selection``, ``fixed_configs``), and ``triton_forward``/``triton_backward``
launch their kernels themselves. An opaque custom op keeps all of that host logic as it is;
inductor then cannot fuse into the kernels, which it could not do across anchored scans anyway.

Fake implementation: y is ``empty_like(k)``; the residuals are empty tensors with the shapes and
dtypes of ``kernels_cpu.ops.residual_specs`` ("cpu": den (B, T, C), the chunk units
(B, ceil(T / P(T)), C) with P(T) the chunk length at w = 0, and y in the compute dtype for
16-bit k) or ``kernels_triton.ops.triton_residual_specs`` ("triton"), and none for "torch".
They depend only on the input shapes and dtypes, never on values (a fake tensor has none).

Flop formula (``torch.utils.flop_counter``; each exp, add, multiply and divide counts one,
per (b, t, c) element, from the recurrences of docs/biwkv4.md §2–3; the per-channel constants
e^{-w}, e^{u} and the final gw, gu scaling, O(C), are left out):

* forward, :data:`FWD_FLOPS_PER_ELEMENT` = 17: e^{k_t} (1) and e^{k_t} v_t (1); the four
  scans A, C (numerators) and B, D (denominators), each e^{-w}·S + x (2): 8; the diagonal terms
  e^{u}·e^{k_t} v_t and e^{u}·e^{k_t} (2); the sums A + C + · and B + D + · (4); the
  division (1). 1 + 1 + 8 + 2 + 4 + 1 = 17.
* backward, :data:`BWD_FLOPS_PER_ELEMENT` = 39: q_t = gy_t / D_t and r_t = q_t y_t (2); the
  left and right scans of q and r (G, H: 4 scans × 2 = 8); their distance-weighted scans for
  gw, D <- e^{-w}(D + E) (4 × 2 = 8); left + right for G, H and both weighted sums (4);
  e^{k_i} (1); F_q = G + e^{u} q, F_r = H + e^{u} r (4); gv = e^{k} F_q (1);
  gk = e^{k}(v F_q - F_r) (3); the gu sum, += e^{k}(v q - r) (4); the gw sum,
  += e^{k}(v D_q - D_r) (4). 2 + 8 + 8 + 4 + 1 + 4 + 1 + 3 + 4 + 4 = 39.

So ``hpcm.biwkv4`` counts 17·B·T·C and ``hpcm.biwkv4_backward`` 39·B·T·C, whatever the
backend (the kernels' anchoring and chunk carries are not counted: the count is the
operator's, as for a matmul).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

import kernels_cpu.ops as _cpu

from . import ops as _ops

__all__ = ["biwkv4_op", "biwkv4_backward_op", "residual_specs", "FWD_FLOPS_PER_ELEMENT",
           "BWD_FLOPS_PER_ELEMENT"]

FWD_FLOPS_PER_ELEMENT = 17
BWD_FLOPS_PER_ELEMENT = 39


def _dtypes(w, u, k, v):
    return (w.dtype, u.dtype, k.dtype, v.dtype)


def residual_specs(w, u, k, v, backend: str) -> list:
    """[(shape, dtype)] of the residuals ``hpcm::biwkv4`` returns with ``need_grad`` (see the
    module docstring); reads only shapes and dtypes."""
    backend = _ops.resolve_backend(k.device, backend)
    B, T, C = k.shape
    if backend == "cpu":
        return _cpu.residual_specs(B, T, C, _dtypes(w, u, k, v))
    if backend == "triton":
        return _ops.triton_residual_specs(B, T, C, k.dtype)
    return []


def _fresh(res, *others):
    """The residuals, each copied if it shares memory with y or an input (an op's outputs may
    not alias each other or its inputs)."""
    taken = {t.untyped_storage().data_ptr() for t in others}
    return [r.clone() if r.untyped_storage().data_ptr() in taken else r for r in res]


def _triton_forward(w, u, k, v, need_grad):
    ins = [x.contiguous() for x in (w, u, k, v)]
    y, res = _ops.triton_forward(*ins, need_grad)
    return y, (_fresh(res, y, w, u, k, v) if need_grad else [])


def _triton_backward(w, u, k, v, residuals, gy):
    ins = [x.contiguous() for x in (w, u, k, v)]
    gw, gu, gk, gv = _ops.triton_backward(*ins, tuple(residuals), gy.contiguous())
    return gw.to(w.dtype), gu.to(u.dtype), gk.to(k.dtype), gv.to(v.dtype)


def _scan_compute(w, u, k, v):
    """The PyTorch scan's inputs in its compute dtype (as its autograd Function converts them)."""
    cdt = torch.float64 if torch.float64 in _dtypes(w, u, k, v) else torch.float32
    return [x.detach().to(cdt) for x in (w, u, k, v)]


@torch.library.custom_op("hpcm::biwkv4", mutates_args=(), device_types="cpu")
def biwkv4_op(w: Tensor, u: Tensor, k: Tensor, v: Tensor, backend: str,
              need_grad: bool) -> tuple[Tensor, list[Tensor]]:
    """Bi-WKV4 forward on CPU tensors: (y, residuals); see the module docstring."""
    backend = _ops.resolve_backend(k.device, backend)
    if backend == "cpu":
        y, res = _cpu.forward(w, u, k, v, need_grad)
        return y, list(res)
    if backend == "torch":
        from reference.biwkv4 import biwkv4_scan

        with torch.no_grad():
            return biwkv4_scan(*(x.detach() for x in (w, u, k, v))), []
    if backend == "triton":
        return _triton_forward(w, u, k, v, need_grad)
    raise ValueError(f"backend must be one of {_ops._BACKENDS}, got {backend!r}")


@biwkv4_op.register_kernel("cuda")
def _biwkv4_cuda(w, u, k, v, backend, need_grad):
    if _ops.resolve_backend(k.device, backend) != "triton":
        raise ValueError(f"hpcm::biwkv4 on CUDA tensors runs backend 'triton', got {backend!r}")
    return _triton_forward(w, u, k, v, need_grad)


@biwkv4_op.register_fake
def _biwkv4_fake(w, u, k, v, backend, need_grad):
    y = torch.empty_like(k, memory_format=torch.contiguous_format)
    if not need_grad:
        return y, []
    return y, [k.new_empty(shape, dtype=dt) for shape, dt in residual_specs(w, u, k, v, backend)]


@torch.library.custom_op("hpcm::biwkv4_backward", mutates_args=(), device_types="cpu")
def biwkv4_backward_op(w: Tensor, u: Tensor, k: Tensor, v: Tensor, y: Tensor,
                       residuals: list[Tensor], gy: Tensor,
                       backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bi-WKV4 backward on CPU tensors: (gw, gu, gk, gv) from the forward's inputs, its y and
    residuals, and the gradient gy of y."""
    backend = _ops.resolve_backend(k.device, backend)
    if backend == "cpu":
        return _cpu.backward(w, u, k, v, y, residuals, gy)
    if backend == "torch":
        from reference.biwkv4 import _scan_backward, _scan_forward

        wc, uc, kc, vc = _scan_compute(w, u, k, v)
        _, saved = _scan_forward(wc, uc, kc, vc)
        gw, gu, gk, gv = _scan_backward(wc, uc, gy, saved)
        return gw.to(w.dtype), gu.to(u.dtype), gk.to(k.dtype), gv.to(v.dtype)
    if backend == "triton":
        return _triton_backward(w, u, k, v, residuals, gy)
    raise ValueError(f"backend must be one of {_ops._BACKENDS}, got {backend!r}")


@biwkv4_backward_op.register_kernel("cuda")
def _biwkv4_backward_cuda(w, u, k, v, y, residuals, gy, backend):
    if _ops.resolve_backend(k.device, backend) != "triton":
        raise ValueError(f"hpcm::biwkv4_backward on CUDA tensors runs backend 'triton', got {backend!r}")
    return _triton_backward(w, u, k, v, residuals, gy)


@biwkv4_backward_op.register_fake
def _biwkv4_backward_fake(w, u, k, v, y, residuals, gy, backend):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (w, u, k, v))


def _setup_context(ctx, inputs, output):
    w, u, k, v, backend, need_grad = inputs
    y, res = output
    ctx.backend, ctx.need_grad = backend, need_grad
    ctx.mark_non_differentiable(*res)
    ctx.set_materialize_grads(False)   # no zero tensors for the residuals' (absent) gradients
    if need_grad:
        ctx.save_for_backward(w, u, k, v, y, *res)


def _backward(ctx, gy, _gres):
    if not ctx.need_grad:
        raise RuntimeError("hpcm::biwkv4 ran with need_grad=False and kept nothing for the "
                           "backward; call it with need_grad=True (kernels_triton.biwkv4 sets it "
                           "from the grad mode and the inputs' requires_grad)")
    if gy is None:
        return None, None, None, None, None, None
    w, u, k, v, y, *res = ctx.saved_tensors
    gw, gu, gk, gv = biwkv4_backward_op(w, u, k, v, y, res, gy, ctx.backend)
    return gw, gu, gk, gv, None, None


biwkv4_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.hpcm.biwkv4)
def _biwkv4_flops(w_shape, u_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    B, T, C = k_shape
    return FWD_FLOPS_PER_ELEMENT * B * T * C


@register_flop_formula(torch.ops.hpcm.biwkv4_backward)
def _biwkv4_backward_flops(w_shape, u_shape, k_shape, v_shape, *args, out_shape=None,
                           **kwargs) -> int:
    B, T, C = k_shape
    return BWD_FLOPS_PER_ELEMENT * B * T * C
