"""Pure-PyTorch reference implementations."""
from .biwkv4 import biwkv4_naive, biwkv4_scan

__all__ = ["biwkv4_naive", "biwkv4_scan"]
