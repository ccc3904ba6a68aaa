"""Deterministic weights by parameter name, the rule the golden files were made with (SPEC §4).

Useful beyond the golden test: any two machines build bit-identical untrained models, so
bitstreams written by one decode on the other.
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn


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
