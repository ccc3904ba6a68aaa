"""Triton kernels for HPCM-RWKV: the Bi-WKV4 operator with exact autograd.

Public API::

    biwkv4(w, u, k, v, *, backend="auto", strategy=None, chunk=None) -> y

The implementation lives in :mod:`kernels_triton.ops` (formerly ``kernels_triton.biwkv4``,
renamed so the function ``kernels_triton.biwkv4`` no longer shadows a submodule of the same
name); see :func:`kernels_triton.ops.biwkv4` for the formula, shapes and dtypes. It runs the
registered operator ``torch.ops.hpcm.biwkv4`` (:mod:`kernels_triton.custom_op`).
"""
from .ops import BiWKV4Function, biwkv4, biwkv4_reference, resolve_backend, shape_only_selection
from .custom_op import biwkv4_backward_op, biwkv4_op  # registers torch.ops.hpcm.biwkv4

__all__ = ["BiWKV4Function", "biwkv4", "biwkv4_op", "biwkv4_backward_op", "biwkv4_reference",
           "resolve_backend", "shape_only_selection"]
