"""Pre-norm RWKV block and the RWKV fusion net (Phase 3+ ``context_net`` replacement)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .mix import ChannelMix, SpatialMix, maybe_checkpoint, to_map, to_tokens

__all__ = ["RWKVFusionBlock", "RWKVFusionNet"]


class RWKVFusionBlock(nn.Module):
    """One RWKV block (LALIC's ``RwkvBlock_BiV4`` structure, pre-norm)::

        x = x + γ1 ⊙ SpatialMix(LN1(x))
        x = x + γ2 ⊙ ChannelMix(LN2(x))

    LN is ``nn.LayerNorm(C)`` over channels, per token. γ1, γ2 ∈ R^C are learnable and start at
    1 (as in LALIC and the public fork). The residual stream stays in token layout; only the
    OmniShifts see maps.

    Note: the public fork (yutendo0714/LIC-HPCM-LALIC) instead computes
    ``x + γ·(LN(Mix(x)) − x)`` (norm after the mixer, γ=1 replaces x); this module follows the
    pre-norm form of docs/architecture.md §5 and of LALIC.

    Args:
        dim: channels C.
        hidden_rate: ChannelMix expansion.
        use_checkpoint: gradient-checkpoint the whole block in training (same gradients,
            activations of the block are recomputed in backward).
        backend: Bi-WKV4 backend (``"auto"``).

    Shapes: ``forward(x)``: ``(B, C, H, W)`` → ``(B, C, H, W)``.

    Parameters: (2h + 5)·C² + 78·C + 8 for integer hidden width h·C.
    """

    def __init__(self, dim: int, hidden_rate: float = 4, use_checkpoint: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.use_checkpoint = use_checkpoint
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.spatial_mix = SpatialMix(dim, backend=backend)
        self.channel_mix = ChannelMix(dim, hidden_rate)
        self.gamma1 = nn.Parameter(torch.ones(dim))
        self.gamma2 = nn.Parameter(torch.ones(dim))

    def _forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        t = to_tokens(x)
        t = t + self.gamma1 * self.spatial_mix.forward_tokens(self.ln1(t), H, W)
        t = t + self.gamma2 * self.channel_mix.forward_tokens(self.ln2(t), H, W)
        return to_map(t, H, W)

    def forward(self, x: Tensor) -> Tensor:
        return maybe_checkpoint(self.use_checkpoint, self, self._forward, x)


class RWKVFusionNet(nn.Module):
    """RWKV fusion net: ``num_blocks`` × :class:`RWKVFusionBlock`, then a 1×1 conv with bias.

    Drop-in for HPCM's ``context_net[i] = conv1x1(2M, 2M)`` (Phase 3+: dim = 2M = 640,
    1 block, rate 4).

    Args:
        dim: channels C (in = out).
        num_blocks: number of RWKV blocks.
        hidden_rate: ChannelMix expansion of every block.
        use_checkpoint: checkpoint each block (see :class:`RWKVFusionBlock`).
        backend: Bi-WKV4 backend.

    Shapes: ``forward(x)``: ``(B, C, H, W)`` → ``(B, C, H, W)``.

    Parameters: num_blocks·((2h + 5)·C² + 78·C + 8) + C² + C.
    """

    def __init__(self, dim: int, num_blocks: int = 1, hidden_rate: float = 4,
                 use_checkpoint: bool = False, backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.blocks = nn.ModuleList(
            RWKVFusionBlock(dim, hidden_rate, use_checkpoint, backend) for _ in range(num_blocks)
        )
        self.out_proj = nn.Conv2d(dim, dim, 1)

    @property
    def use_checkpoint(self) -> bool:
        return all(b.use_checkpoint for b in self.blocks)

    @use_checkpoint.setter
    def use_checkpoint(self, flag: bool) -> None:
        for b in self.blocks:
            b.use_checkpoint = flag

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out_proj(x)
