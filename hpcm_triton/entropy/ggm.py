"""The zero-mean generalized-Gaussian entropy model of HPCM (docs/architecture.md §4).

p(q) = F((q + ½)/s) − F((q − ½)/s) with F the CDF of a generalized Gaussian of shape β = 1.5,
scales bounded below by 0.12 and likelihoods by 1e-9. The 16-bit CDF tables for rANS are
built exactly as the official release builds them: the bitstreams depend on every step.

Tables that do not depend on the machine (docs/bitstream.md §3): the float steps of that
build are not the same on every CPU (``torch.exp`` of the scale table and ``torch.pow`` in the
CDF are vectorised differently per instruction set, ``gammainc`` is compiled with and without
FMA contraction), so the constants are stored instead of recomputed: the scale table as its
float32 bit patterns (:data:`SCALE_TABLE_BITS`) and y's CDF tables, which depend on nothing
else, in ``hpcm_triton/data/y_cdf_tables.npz`` (checked against :data:`Y_TABLES_SHA256`).
Both are what the official arithmetic gives on an AVX2 or AVX-512 CPU.
"""
from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

TAIL_MASS = 1e-6
CDF_PRECISION = 16
# -gennorm.ppf(TAIL_MASS / 2, 1.5) (scipy), the half-width of a table in units of its scale.
TAIL_MULTIPLIER = 5.42691097558631

# exp(linspace(ln 0.12, ln 64, 60)) in float32 as torch computes it with its AVX2/AVX-512
# kernels (and as the official tables were built); its scalar kernel rounds 10 entries otherwise.
SCALE_TABLE_BITS = (
    1039516303, 1040756173, 1041762051, 1042880884, 1044125358, 1045509581, 1047049247, 1048668906,
    1049621344, 1050680737, 1051859097, 1053169781, 1054627650, 1056249231, 1057508758, 1058511870,
    1059627627, 1060868679, 1062249096, 1063784528, 1065422799, 1066372619, 1067429100, 1068604219,
    1069911299, 1071365159, 1072982280, 1074261411, 1075261765, 1076374454, 1077612091, 1078988712,
    1080519922, 1082176756, 1083123965, 1084177539, 1085349427, 1086652913, 1088102775, 1089715451,
    1091014132, 1092011734, 1093121364, 1094355600, 1095728433, 1097255433, 1098930778, 1099875381,
    1100926060, 1102094725, 1103394627, 1104840503, 1106448744, 1107766920, 1108761777, 1109868355,
    1111099198, 1112468259, 1113991059, 1115684864,
)
Y_TABLES_PATH = Path(__file__).resolve().parents[1] / "data" / "y_cdf_tables.npz"
# sha256 of (cdf, cdf_length, offset) as little-endian int32, in that order.
Y_TABLES_SHA256 = "a48b48aadf632a04fe8cb7f409430ea2b54c2c2c7c9194b4965a3a1d397a14b9"


def computed_scale_table(lo: float = 0.12, hi: float = 64.0, levels: int = 60) -> torch.Tensor:
    """exp(linspace(ln lo, ln hi, levels)) with this machine's torch kernels."""
    return torch.exp(torch.linspace(math.log(lo), math.log(hi), levels))


def default_scale_table() -> torch.Tensor:
    """The official 60-entry scale table, the same float32 values on every machine."""
    return torch.tensor(SCALE_TABLE_BITS, dtype=torch.int32).view(torch.float32)


def tables_digest(cdf, cdf_length, offset) -> str:
    h = hashlib.sha256()
    for t in (cdf, cdf_length, offset):
        h.update(np.ascontiguousarray(np.asarray(t), dtype="<i4").tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _stored_y_tables():
    with np.load(Y_TABLES_PATH) as f:
        arrays = f["cdf"], f["length"], f["offset"]
    if tables_digest(*arrays) != Y_TABLES_SHA256:
        raise RuntimeError(f"{Y_TABLES_PATH} is damaged (its tables do not match the recorded sha256)")
    return arrays


def stored_y_tables():
    """y's CDF tables for :func:`default_scale_table` as (cdf, cdf_length, offset) int32 tensors."""
    return tuple(torch.from_numpy(a.copy()) for a in _stored_y_tables())


def is_default_scale_table(scale_table: torch.Tensor) -> bool:
    """Whether ``scale_table`` holds exactly the float32 values of :func:`default_scale_table`."""
    t = scale_table.detach().float().cpu().reshape(-1)
    return t.numel() == len(SCALE_TABLE_BITS) and t.view(torch.int32).tolist() == list(SCALE_TABLE_BITS)


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
        # compressai is imported here, not with this module: importing it registers the model
        # variants (hpcm_triton/__init__.py), which import this module.
        from compressai.ops import LowerBound

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
        This is the official arithmetic, so its float steps round per machine (module docstring).
        """
        from .coder import compressai_ext

        if float(self.beta) != 1.5:
            raise ValueError("quantized_cdfs is built for β = 1.5 (TAIL_MULTIPLIER)")
        pmf_to_quantized_cdf = compressai_ext("_CXX").pmf_to_quantized_cdf
        scales = self.scale_lower_bound(scales.detach().float().cpu().reshape(-1))
        pmf_center = torch.ceil(scales.double() * TAIL_MULTIPLIER).int()
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
