"""Deterministic weights by parameter name: the rule the golden files were made with
(docs/architecture.md §6), and a portable rule for the demo and untrained models.

Useful beyond the golden test: any two processes build the same untrained model from the
parameter names alone, so the demo and the command line can code files without a checkpoint.

* :func:`seeded_init_` (the golden rule) draws ``n`` with ``torch.randn``, whose vectorised
  Box–Muller kernel rounds differently per instruction set (AVX2/AVX-512 vs the scalar
  ``ATEN_CPU_CAPABILITY=default``): the same name gives other weights on another CPU. The
  golden files need it exactly as it is.
* :func:`portable_init_` (the demo rule, ``.hpcm`` format 3 on) draws ``n`` from integers only
  and turns them into floats with single IEEE operations, so every machine gets the same bits.
  Files of formats 1 and 2 were written with the golden rule (docs/bitstream.md §3).
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from .config import size_overrides
from .zoo import get_model


RULES = ("portable", "golden")

# A triangular variate from one draw r in [0, 2³⁰): two 15-bit halves h1 + h2 − (2¹⁵ − 1), which
# has mean 0 and variance (2³⁰ − 1)/6; scaled to unit variance.
_HALF = (1 << 15) - 1
_TRIANGULAR_SCALE = 1 / math.sqrt(((1 << 30) - 1) / 6)


def _scaled(name: str, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The golden rule's map from a unit variate ``n`` to parameter ``name``'s values."""
    if name.endswith("bias"):
        return 0.01 * n
    if name == "means_hyper":
        return 0.1 * n
    if name == "scales_hyper":
        return 1 + 0.1 * n.abs()
    if name.startswith("adaptive_params_list."):
        return 1 + 0.1 * n
    return n * 0.8 / math.sqrt(p[0].numel())


@torch.no_grad()
def seeded_init_(model: nn.Module) -> nn.Module:
    """Fill every parameter from a generator seeded with crc32 of its name (the golden rule)."""
    for name, p in sorted(model.named_parameters()):
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        n = torch.randn(p.shape, generator=g, dtype=torch.float32)
        p.copy_(_scaled(name, p, n).to(p.dtype))
    return model


@torch.no_grad()
def portable_init_(model: nn.Module) -> nn.Module:
    """The golden rule's scaling with ``n`` a unit-variance triangular variate from one integer
    draw (``torch.randint``, the same crc32-seeded generator): integer arithmetic, an exact
    conversion to float32 and single float32 operations after it, each correctly rounded, so
    the weights are the same on every machine."""
    for name, p in sorted(model.named_parameters()):
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        r = torch.randint(0, 1 << 30, p.shape, generator=g, dtype=torch.int32)
        n = ((r >> 15) + (r & _HALF) - _HALF).float().mul_(_TRIANGULAR_SCALE)
        p.copy_(_scaled(name, p, n).to(p.dtype))
    return model


def checksum(model: nn.Module) -> tuple[float, float]:
    """(Σ, Σ²) of all parameters in float64."""
    s = s2 = 0.0
    for p in model.parameters():
        d = p.detach().double()
        s += float(d.sum())
        s2 += float((d * d).sum())
    return s, s2


def reseed_(model: nn.Module, rule: str) -> nn.Module:
    """Give ``model`` the seeded weights of ``rule`` ("portable" or "golden") and rebuild its
    CDF tables; ``model.seeded_rule`` records the rule."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    (portable_init_ if rule == "portable" else seeded_init_)(model)
    model.update(force=True)
    model.seeded_rule = rule
    return model


def seeded_model(name: str, size: str = "tiny", rule: str = "portable", **overrides) -> nn.Module:
    """An untrained variant with seeded weights (``rule``: :func:`portable_init_`, or the
    golden :func:`seeded_init_`), eval mode, CDF tables built: the model of the demo and of
    files written without ``--checkpoint``. A test and demo fixture; training starts from the
    modules' designed initialisation instead."""
    model = get_model(name, **{**size_overrides(size), **overrides})
    model.eval()
    return reseed_(model, rule)
