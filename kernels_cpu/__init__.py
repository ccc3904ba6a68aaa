"""Bi-WKV4 on the CPU as compiled C kernels (the models' CPU path; see kernels_cpu/ops.py).

``kernels_triton.biwkv4(..., backend="auto")`` uses these on CPU tensors when they are
available (a C compiler is needed at first use) and the pure-PyTorch scan
(``reference.biwkv4_scan``) otherwise.
"""
from .ops import BiWKV4CPUFunction, CPUKernelUnavailable, available, biwkv4_cpu, unavailable_reason

__all__ = ["biwkv4_cpu", "BiWKV4CPUFunction", "available", "unavailable_reason",
           "CPUKernelUnavailable"]
