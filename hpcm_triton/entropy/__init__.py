"""Entropy model (generalized Gaussian) and safe rANS coding."""
from .coder import BitstreamError, CdfTables, DecodeSession, encode
from .ggm import GeneralizedGaussian, LowerBound, default_scale_table

__all__ = ["BitstreamError", "CdfTables", "DecodeSession", "encode", "GeneralizedGaussian", "LowerBound",
           "default_scale_table"]
