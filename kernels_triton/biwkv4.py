"""Bi-WKV4 (step-1 stub: torch backend only; the Triton backend lands in the next commit)."""
from __future__ import annotations

import torch

from reference.biwkv4 import biwkv4_scan as biwkv4_reference

BiWKV4Function = None


def biwkv4(w, u, k, v, *, backend: str = "auto", strategy=None):
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "triton" or (backend == "auto" and k.is_cuda):
        raise NotImplementedError("the Triton backend is not implemented yet")
    return biwkv4_reference(w, u, k, v)
