"""Convolutional building blocks of HPCM (docs/architecture.md §2).

Module and attribute names follow the official release so that its state_dicts load
without key surgery (``branch.0.pconv.weight`` and so on).
"""
from __future__ import annotations

import torch
from torch import nn


def conv1x1(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=1)


def conv2x2_down(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=2, stride=2)


def deconv2x2_up(in_ch: int, out_ch: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)


def conv4x4_down(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1)


def deconv4x4_up(in_ch: int, out_ch: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1)


def dwconv3x3(ch: int) -> nn.Conv2d:
    return nn.Conv2d(ch, ch, kernel_size=3, stride=1, padding=1, groups=ch)


class PartialConv3x3(nn.Module):
    """3×3 conv on the first ``n_conv`` channels; the others pass through unchanged."""

    def __init__(self, channels: int, n_conv: int):
        super().__init__()
        self.N, self.N1 = channels, n_conv
        self.pconv = nn.Conv2d(n_conv, n_conv, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(x, [self.N1, self.N - self.N1], dim=1)
        return torch.cat((self.pconv(x1), x2), dim=1)


class PConvRB(nn.Module):
    """x + conv1×1(rN→N)(LeakyReLU(conv1×1(N→rN)(pconv3×3(x)))), pconv on N/partial_ratio channels."""

    def __init__(self, channels: int, partial_ratio: int = 4, mlp_ratio: int = 4):
        super().__init__()
        hidden = channels * mlp_ratio
        self.branch = nn.Sequential(
            PartialConv3x3(channels, channels // partial_ratio),
            conv1x1(channels, hidden),
            nn.LeakyReLU(),
            conv1x1(hidden, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class DWConvRB(nn.Module):
    """x + conv1×1(2N→N)(LeakyReLU(conv1×1(N→2N)(dwconv3×3(x))))."""

    def __init__(self, channels: int, mlp_ratio: int = 2):
        super().__init__()
        hidden = channels * mlp_ratio
        self.branch = nn.Sequential(
            dwconv3x3(channels),
            conv1x1(channels, hidden),
            nn.LeakyReLU(),
            conv1x1(hidden, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)
