"""The zero-mean generalized-Gaussian entropy model of HPCM (docs/architecture.md §4).

p(q) = F((q + ½)/s) − F((q − ½)/s) with F the CDF of a generalized Gaussian of shape β = 1.5,
scales bounded below by 0.12 and likelihoods by 1e-9. The 16-bit CDF tables for rANS are
built exactly as the official release builds them: the bitstreams depend on every step.
"""
from __future__ import annotations

import math

import scipy.stats
import torch
from compressai.ops import LowerBound
from torch import nn

TAIL_MASS = 1e-6
CDF_PRECISION = 16


def default_scale_table(lo: float = 0.12, hi: float = 64.0, levels: int = 60) -> torch.Tensor:
    """exp(linspace(ln lo, ln hi, levels)): the official 60-entry scale table."""
    return torch.exp(torch.linspace(math.log(lo), math.log(hi), levels))


class _GenNormCDF(torch.autograd.Function):
    """Generalized-Gaussian CDF, ½(1 + sign(y)·P(1/β, |y|^β)), with its analytic density as gradient."""

    @staticmethod
    def forward(ctx, beta, y):
        abs_pow = torch.pow(torch.abs(y), beta)
        ctx.save_for_backward(abs_pow, beta)
        return (1 + torch.sign(y) * torch.special.gammainc(1 / beta, abs_pow)) / 2

    @staticmethod
    def backward(ctx, grad_output):
        abs_pow, beta = ctx.saved_tensors
        density = torch.exp(-abs_pow - torch.special.gammaln(1 / beta)) * beta / 2
        return None, grad_output * density


class GeneralizedGaussian(nn.Module):
    """Likelihoods and quantized CDFs of a zero-mean generalized Gaussian (buffers as in HPCM's ``GGM``)."""

    def __init__(self, beta: float = 1.5, scale_bound: float = 0.12, likelihood_bound: float = 1e-9):
        super().__init__()
        self.scale_lower_bound = LowerBound(scale_bound)
        self.likelihood_lower_bound = LowerBound(likelihood_bound)
        self.register_buffer("beta", torch.tensor([float(beta)]))

    def cdf(self, values: torch.Tensor) -> torch.Tensor:
        return _GenNormCDF.apply(self.beta.to(values.dtype), values)

    def forward(self, inputs: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Likelihood of the integer-valued (or noisy) residual ``inputs`` under scales ``scales``."""
        scales = self.scale_lower_bound(scales)
        likelihood = self.cdf((inputs + 0.5) / scales) - self.cdf((inputs - 0.5) / scales)
        return self.likelihood_lower_bound(likelihood)

    @torch.no_grad()
    def quantized_cdfs(self, scales: torch.Tensor):
        """16-bit CDF tables, one per scale, in compressai's rANS layout.

        Returns ``(cdf (S, Lmax+2) int32, cdf_length (S,) int32, offset (S,) int32)``.
        Every numeric step mirrors the official ``GGM.get_quantized_cdf``: the table
        length comes from the float64 product of the float32 scale with the tail quantile,
        the pmf is evaluated in float32, and the tail mass is folded into one escape symbol.
        """
        from .coder import compressai_ext

        pmf_to_quantized_cdf = compressai_ext("_CXX").pmf_to_quantized_cdf
        scales = self.scale_lower_bound(scales.detach().float().cpu().reshape(-1))
        multiplier = -float(scipy.stats.gennorm.ppf(TAIL_MASS / 2, float(self.beta)))
        pmf_center = torch.ceil(scales.double() * multiplier).int()
        pmf_length = 2 * pmf_center + 1
        max_length = int(pmf_length.max())
        samples = (torch.arange(max_length).int() - pmf_center[:, None]).float()
        upper = self.cdf((samples + 0.5) / scales[:, None])
        lower = self.cdf((samples - 0.5) / scales[:, None])
        pmf = upper - lower
        tail_mass = lower[:, :1] + (1 - upper[:, -1:])
        cdf = torch.zeros((len(pmf_length), max_length + 2), dtype=torch.int32)
        for i, p in enumerate(pmf):
            prob = torch.cat((p[: pmf_length[i]], tail_mass[i]), dim=0)
            q = pmf_to_quantized_cdf(prob.tolist(), CDF_PRECISION)
            cdf[i, : len(q)] = torch.tensor(q, dtype=torch.int32)
        return cdf, (pmf_length + 2).int(), (-pmf_center).int()
