"""Deterministic weights by parameter name, the rule the golden files were made with
(docs/architecture.md §6).

Useful beyond the golden test: any two processes build the same untrained model from the
parameter names alone, so the demo and the command line can code files without a checkpoint.
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from .config import size_overrides
from .zoo import get_model


@torch.no_grad()
def seeded_init_(model: nn.Module) -> nn.Module:
    """Fill every parameter from a generator seeded with crc32 of its name."""
    for name, p in sorted(model.named_parameters()):
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        n = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("bias"):
            v = 0.01 * n
        elif name == "means_hyper":
            v = 0.1 * n
        elif name == "scales_hyper":
            v = 1 + 0.1 * n.abs()
        elif name.startswith("adaptive_params_list."):
            v = 1 + 0.1 * n
        else:
            v = n * 0.8 / math.sqrt(p[0].numel())
        p.copy_(v.to(p.dtype))
    return model


def checksum(model: nn.Module) -> tuple[float, float]:
    """(Σ, Σ²) of all parameters in float64."""
    s = s2 = 0.0
    for p in model.parameters():
        d = p.detach().double()
        s += float(d.sum())
        s2 += float((d * d).sum())
    return s, s2


def seeded_model(name: str, size: str = "tiny", **overrides) -> nn.Module:
    """An untrained variant with :func:`seeded_init_` weights, eval mode, CDF tables built:
    the model of the demo and of files written without ``--checkpoint``. A test and demo
    fixture; training starts from the modules' designed initialisation instead."""
    model = seeded_init_(get_model(name, **{**size_overrides(size), **overrides}))
    model.eval()
    model.update(force=True)
    return model
