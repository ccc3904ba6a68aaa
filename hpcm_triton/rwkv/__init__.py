"""RWKV building blocks for the HPCM Phase 1–4 hybrids (docs/architecture.md §5).

All modules take and return feature maps ``(B, C, H, W)``; inside, tokens are ``(B, H·W, C)`` in
raster order, the layout of ``kernels_triton.biwkv4`` (Bi-WKV4, docs/biwkv4.md).

* :class:`OmniShift` — depthwise 1×1/3×3/5×5 + identity shift, fused to one 5×5 in eval mode.
* :class:`SpatialMix` — OmniShift → k, v, r → Bi-WKV4(decay/T, boost/T, k, v) → σ(r)⊙y → out.
* :class:`ChannelMix` — OmniShift → σ(W_r x) ⊙ W_v(relu(W_k x)²).
* :class:`RWKVFusionBlock` / :class:`RWKVFusionNet` — pre-norm RWKV block; Phase-3 context_net.
* :class:`RWKVContextCell` — Phase 1/2 replacement for CrossAttentionCell (cross-stream).
* :class:`ConcatRWKVContextCell` — the public fork's cell design (concatenate, one RWKV block).
* :class:`RWKVSpatialPrior` — Phase-4 replacement for the DWConvRB spatial priors.
"""

from .blocks import RWKVFusionBlock, RWKVFusionNet
from .context_cell import ConcatRWKVContextCell, RWKVContextCell
from .mix import ChannelMix, SpatialMix
from .omnishift import OmniShift
from .spatial_prior import RWKVSpatialPrior

__all__ = [
    "OmniShift",
    "SpatialMix",
    "ChannelMix",
    "RWKVFusionBlock",
    "RWKVFusionNet",
    "RWKVContextCell",
    "ConcatRWKVContextCell",
    "RWKVSpatialPrior",
]
