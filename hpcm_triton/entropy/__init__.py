"""Entropy model (generalized Gaussian) and safe rANS coding.

The coder (numpy only) loads eagerly; the entropy model (torch, scipy) on first use, so a
.hpcm header can be read and refused without importing torch.
"""
import importlib

from .coder import BitstreamError, CdfTables, DecodeSession, encode

__all__ = ["BitstreamError", "CdfTables", "DecodeSession", "encode", "GeneralizedGaussian", "default_scale_table"]


def __getattr__(name):
    if name in ("GeneralizedGaussian", "default_scale_table", "ggm"):
        mod = importlib.import_module(".ggm", __name__)
        return mod if name == "ggm" else getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
