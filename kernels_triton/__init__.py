"""Triton kernels for HPCM-RWKV: the Bi-WKV4 operator with exact autograd.

Public API::

    biwkv4(w, u, k, v, *, backend="auto", strategy=None) -> y

See :func:`kernels_triton.biwkv4.biwkv4` for the formula, shapes and dtypes.
"""
from .biwkv4 import biwkv4, BiWKV4Function, biwkv4_reference, shape_only_selection

__all__ = ["biwkv4", "BiWKV4Function", "biwkv4_reference", "shape_only_selection"]
