"""Triton kernels for HPCM-RWKV: the Bi-WKV4 operator (docs/biwkv4.md) with exact autograd.

Public API::

    biwkv4(w, u, k, v, *, backend="auto") -> y

The implementation lives in :mod:`kernels_triton.ops` (see :func:`kernels_triton.ops.biwkv4`
for the formula, shapes and dtypes); the kernels' design is in docs/kernels.md. It runs the
registered operator ``torch.ops.hpcm.biwkv4`` (:mod:`kernels_triton.custom_op`).
"""
from .ops import BiWKV4Function, biwkv4, biwkv4_reference, resolve_backend, shape_only_selection
from .custom_op import biwkv4_backward_op, biwkv4_op  # registers torch.ops.hpcm.biwkv4

__all__ = ["BiWKV4Function", "biwkv4", "biwkv4_op", "biwkv4_backward_op", "biwkv4_reference",
           "resolve_backend", "shape_only_selection"]
