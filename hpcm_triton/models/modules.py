"""HPCM's transforms, spatial priors and windowed cross-attention cell (docs/architecture.md §2–3).

Widths are parameters (the official code hard-codes them); attribute names and layer order
match the official release so its state_dicts load unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..layers import DWConvRB, PConvRB, conv1x1, conv2x2_down, conv4x4_down, deconv2x2_up, deconv4x4_up


class _Branch(nn.Module):
    """A module whose only child is ``branch`` (the official layout of g_a, g_s, h_a, h_s)."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.branch = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x)


def analysis_transform(M: int, widths=(96, 192, 384), blocks=(2, 2, 4)) -> _Branch:
    """g_a: 3 → M channels, 16× down: conv4×4/2 then conv2×2/2 ×3, PConvRBs in between."""
    c1, c2, c3 = widths
    n1, n2, n3 = blocks
    return _Branch(
        conv4x4_down(3, c1), *[PConvRB(c1) for _ in range(n1)],
        conv2x2_down(c1, c2), *[PConvRB(c2) for _ in range(n2)],
        conv2x2_down(c2, c3), *[PConvRB(c3) for _ in range(n3)],
        conv2x2_down(c3, M),
    )


def synthesis_transform(M: int, widths=(96, 192, 384), blocks=(4, 2, 2)) -> _Branch:
    """g_s: mirror of g_a, M → 3 channels; ``blocks`` from the deepest stage up."""
    c1, c2, c3 = widths
    n3, n2, n1 = blocks
    return _Branch(
        deconv2x2_up(M, c3), *[PConvRB(c3) for _ in range(n3)],
        deconv2x2_up(c3, c2), *[PConvRB(c2) for _ in range(n2)],
        deconv2x2_up(c2, c1), *[PConvRB(c1) for _ in range(n1)],
        deconv4x4_up(c1, 3),
    )


def hyper_analysis(M: int, N: int) -> _Branch:
    return _Branch(PConvRB(M), conv2x2_down(M, N), *[PConvRB(N) for _ in range(3)], conv2x2_down(N, N))


def hyper_synthesis(M: int, N: int) -> _Branch:
    """h_s: z → 2M channels, [scales | means] of the hyperprior."""
    return _Branch(deconv2x2_up(N, N), *[PConvRB(N) for _ in range(3)], deconv2x2_up(N, 2 * M), PConvRB(2 * M))


class DWConvSpatialPrior(nn.Module):
    """branch_2(branch_1(x) · quant_step): (B, 3M, H, W) → (B, 2M, H, W) = [scales | means]."""

    def __init__(self, M: int, blocks=(2, 1)):
        super().__init__()
        n1, n2 = blocks
        self.branch_1 = nn.Sequential(*[DWConvRB(3 * M) for _ in range(n1)])
        self.branch_2 = nn.Sequential(*[DWConvRB(3 * M) for _ in range(n2)], conv1x1(3 * M, 2 * M))

    def forward(self, x: torch.Tensor, quant_step: torch.Tensor) -> torch.Tensor:
        return self.branch_2(self.branch_1(x) * quant_step)


class CrossAttentionCell(nn.Module):
    """HPCM's context cell: windowed multi-head attention, queries from ``x_t``, keys and
    values from ``h_prev``, plus ``conv_out(x_t)``; no separate output projection.

    ``forward(x_t, h_prev) -> h_t``, all (B, dim, H, W) with H, W multiples of ``window_size``.
    """

    def __init__(self, input_dim: int, hidden_dim: int, window_size: int, kernel_size: int = 1, num_heads: int = 32):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}")
        self.hidden_dim, self.num_heads, self.head_dim = hidden_dim, num_heads, hidden_dim // num_heads
        self.window_size = window_size
        pad = kernel_size // 2
        self.conv_q = nn.Conv2d(input_dim, hidden_dim, kernel_size, padding=pad)
        self.conv_k = nn.Conv2d(hidden_dim, hidden_dim, kernel_size, padding=pad)
        self.conv_v = nn.Conv2d(hidden_dim, hidden_dim, kernel_size, padding=pad)
        self.conv_out = nn.Conv2d(hidden_dim, hidden_dim, kernel_size, padding=pad)

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.window_size
        if h % p or w % p:
            raise ValueError(f"CrossAttentionCell with window {p} needs H, W multiples of {p}, got {h}×{w}")
        return rearrange(x, "b c (nh p) (nw q) -> (b nh nw) c p q", p=p, q=p)

    def _unwindows(self, x: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        p = self.window_size
        return rearrange(x, "(b nh nw) c p q -> b c (nh p) (nw q)", b=b, nh=h // p, nw=w // p)

    def forward(self, x_t: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x_t.shape
        xw, hw = self._windows(x_t), self._windows(h_prev)
        n, t = xw.shape[0], self.window_size ** 2
        q = self.conv_q(xw).view(n, self.num_heads, self.head_dim, t).transpose(2, 3)
        k = self.conv_k(hw).view(n, self.num_heads, self.head_dim, t)
        v = self.conv_v(hw).view(n, self.num_heads, self.head_dim, t).transpose(2, 3)
        attn = F.softmax(torch.matmul(q, k) / math.sqrt(self.head_dim), dim=-1)
        out = torch.matmul(attn, v).transpose(2, 3).reshape(n, self.hidden_dim, self.window_size, self.window_size)
        return self._unwindows(out, b, h, w) + self.conv_out(x_t)
