"""Phase-4 RWKV spatial prior: HPCM's ``y_spatial_prior_*`` with RWKV blocks for DWConvRBs."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .blocks import RWKVFusionBlock

__all__ = ["RWKVSpatialPrior"]


class RWKVSpatialPrior(nn.Module):
    """``forward(x, quant_step) = branch_2(branch_1(x) · quant_step)``, HPCM's prior contract.

    HPCM's ``y_spatial_prior_s1_s2`` is branch_1 = 2×DWConvRB(3M), branch_2 = DWConvRB(3M) +
    conv1×1(3M→2M); ``y_spatial_prior_s3`` is 3 + 2 DWConvRBs. Here every DWConvRB(3M) becomes
    an :class:`RWKVFusionBlock` (3M channels), the layout the public fork uses for its
    ``RWKVSpatialPrior_S1_S2`` (``num_blocks=2``) and ``RWKVSpatialPrior_S3`` (``num_blocks=3``,
    2 blocks in branch_2), both with ``hidden_rate=4``::

        branch_1 = num_blocks × RWKVFusionBlock(3M, hidden_rate)
        branch_2 = num_post_blocks × RWKVFusionBlock(3M, hidden_rate), conv1×1(3M → 2M, bias)

    Phase 4 as docs/architecture.md §5 specifies it uses ``RWKVSpatialPrior(M)`` (2 + 1 blocks) for both priors;
    the fork's s3 layout (3 + 2) is selectable through ``HPCMConfig.rwkv_prior_s3_blocks``
    (``hpcm_triton.models.config.FORK_PHASE4``). The submodule names ``branch_1``/``branch_2``
    mirror the official ones.

    Args:
        M: latent channels (320 in HPCM); the prior runs at 3M and outputs 2M.
        num_blocks: RWKV blocks before the quant_step modulation.
        num_post_blocks: RWKV blocks after it (before the output conv).
        hidden_rate: ChannelMix expansion of every block.
        use_checkpoint: checkpoint each block in training.
        backend: Bi-WKV4 backend.

    Shapes:
        x ``(B, 3M, H, W)`` (output of a 1×1 adaptor conv), quant_step broadcastable to it,
        normally ``(1, 3M, 1, 1)`` → ``(B, 2M, H, W)`` = ``[scales | means]`` along channels.

    Parameters: (num_blocks + num_post_blocks)·((2h + 5)·(3M)² + 78·3M + 8) + 6M² + 2M.
    """

    def __init__(self, M: int, num_blocks: int = 2, num_post_blocks: int = 1,
                 hidden_rate: float = 4, use_checkpoint: bool = False, backend: str = "auto"):
        super().__init__()
        self.M = M
        dim = 3 * M
        self.branch_1 = nn.Sequential(
            *(RWKVFusionBlock(dim, hidden_rate, use_checkpoint, backend) for _ in range(num_blocks))
        )
        self.branch_2 = nn.Sequential(
            *(RWKVFusionBlock(dim, hidden_rate, use_checkpoint, backend)
              for _ in range(num_post_blocks)),
            nn.Conv2d(dim, 2 * M, 1),
        )

    @property
    def use_checkpoint(self) -> bool:
        blocks = [m for m in self.modules() if isinstance(m, RWKVFusionBlock)]
        return all(b.use_checkpoint for b in blocks)

    @use_checkpoint.setter
    def use_checkpoint(self, flag: bool) -> None:
        for m in self.modules():
            if isinstance(m, RWKVFusionBlock):
                m.use_checkpoint = flag

    def forward(self, x: Tensor, quant_step: Tensor) -> Tensor:
        return self.branch_2(self.branch_1(x) * quant_step)
