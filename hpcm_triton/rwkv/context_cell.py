"""RWKV context cells: window-free drop-ins for HPCM's ``CrossAttentionCell``, two designs.

``HPCMConfig.cells`` picks one per scale (hpcm_triton/models/config.py, ``CELLS``):

* ``"rwkv"``: :class:`RWKVContextCell` mixes across the streams, receptance from the current
  context x_t, keys and values from the previous state h_prev, like HPCM's cell (query from x_t,
  keys/values from h_prev, docs/architecture.md §3).
* ``"rwkv-fork"``: :class:`ConcatRWKVContextCell`, the public fork's design (yutendo0714/
  LIC-HPCM-LALIC, named in docs/architecture.md §5): both streams concatenated and projected by
  a conv1×1, then one single-stream RWKV block and an output conv1×1.

Both have the contract ``forward(x_t, h_prev) -> h_t`` with equal shapes, any H×W.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .blocks import RWKVFusionBlock
from .mix import ChannelMix, SpatialMix, maybe_checkpoint, to_map, to_tokens

__all__ = ["RWKVContextCell", "ConcatRWKVContextCell"]


def _check_streams(x_t: Tensor, h_prev: Tensor) -> None:
    if x_t.shape != h_prev.shape:
        raise ValueError(f"x_t {tuple(x_t.shape)} and h_prev {tuple(h_prev.shape)} differ")


class RWKVContextCell(nn.Module):
    """Cross-stream RWKV cell, ``forward(x_t, h_prev) -> h_t``.

    HPCM's ``CrossAttentionCell(640, 640, window, kernel 1)`` computes windowed softmax
    attention with q = conv(x_t), k, v = conv(h_prev) and returns
    ``attention + conv_out(x_t)``. This cell keeps that contract and that residual structure and
    replaces windowed attention by global Bi-WKV4 (no windows, so any H×W)::

        a   = SpatialMix_cross(q = LN_q(x_t), kv = LN_kv(h_prev))
              # r from x_t, k and v from h_prev, each stream with its own OmniShift,
              # y = Bi-WKV4(decay/T, boost/T, k, v), a = W_o(σ(r) ⊙ y)
        h   = conv_out(x_t) + γ1 ⊙ a                    # HPCM's "attention + conv_out(x_t)"
        h_t = h + γ2 ⊙ ChannelMix(LN2(h))               # RWKV FFN, width hidden_rate·C

    Choices and where they come from:

    * The query/key-value split follows HPCM's cell (docs/architecture.md §3), not the public fork
      (yutendo0714/LIC-HPCM-LALIC). The fork concatenates ``[x_t, h_prev]``, mixes them with a
      conv1×1(2C→C), runs one single-stream post-norm RWKV block and a conv1×1 output
      projection; there, x_t and h_prev play symmetric roles and the "cross" structure of the
      original cell is lost.
    * Taken from the fork: the constructor ``(dim, hidden_rate=4, use_checkpoint=False)``, the
      per-scale rates (s1: 2, s2: 3, s3: 4 at dim 640), γ initialised to 1, LayerNorm before the
      RWKV mixers, a ChannelMix FFN so that ``hidden_rate`` has a meaning.
    * The LayerNorms (absent in HPCM's cell) keep Bi-WKV4's exp-domain scores in range: x_t is
      a raw spatial-prior output (scales | means) of arbitrary magnitude.
    * With γ = 1 at init, h is exactly HPCM's "mix + conv_out(x_t)" before the FFN.

    Args:
        dim: channels C of x_t, h_prev and h_t (640 in HPCM).
        hidden_rate: ChannelMix expansion (2/3/4 for attn_s1/s2/s3 in Phase 2+).
        use_checkpoint: gradient-checkpoint the whole cell in training (same gradients).
        backend: Bi-WKV4 backend.

    Shapes: x_t, h_prev ``(B, C, H, W)`` → h_t ``(B, C, H, W)``; any B, H, W ≥ 1.

    Parameters: (2h + 6)·C² + 116·C + 12 for integer hidden width h·C.
    """

    def __init__(self, dim: int, hidden_rate: float = 4, use_checkpoint: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.hidden_rate = hidden_rate
        self.use_checkpoint = use_checkpoint
        self.ln_q = nn.LayerNorm(dim)
        self.ln_kv = nn.LayerNorm(dim)
        self.spatial_mix = SpatialMix(dim, cross=True, backend=backend)
        self.conv_out = nn.Conv2d(dim, dim, 1)
        self.gamma1 = nn.Parameter(torch.ones(dim))
        self.ln2 = nn.LayerNorm(dim)
        self.channel_mix = ChannelMix(dim, hidden_rate)
        self.gamma2 = nn.Parameter(torch.ones(dim))

    def _forward(self, x_t: Tensor, h_prev: Tensor) -> Tensor:
        H, W = x_t.shape[-2:]
        q = self.ln_q(to_tokens(x_t))
        kv = self.ln_kv(to_tokens(h_prev))
        a = self.spatial_mix.forward_tokens(q, H, W, kv=kv)
        h = to_tokens(self.conv_out(x_t)) + self.gamma1 * a
        h = h + self.gamma2 * self.channel_mix.forward_tokens(self.ln2(h), H, W)
        return to_map(h, H, W)

    def forward(self, x_t: Tensor, h_prev: Tensor) -> Tensor:
        _check_streams(x_t, h_prev)
        return maybe_checkpoint(self.use_checkpoint, self, self._forward, x_t, h_prev)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_rate={self.hidden_rate}"


class ConcatRWKVContextCell(nn.Module):
    """The public fork's context cell design, built from this project's modules,
    ``forward(x_t, h_prev) -> h_t``::

        x   = conv_in([x_t, h_prev])          # conv1×1(2C → C, bias): both streams mixed first
        x   = RWKVFusionBlock(C, hidden_rate)(x)
              # x = x + γ1 ⊙ SpatialMix(LN1(x)); x = x + γ2 ⊙ ChannelMix(LN2(x))
        h_t = conv_out(x)                     # conv1×1(C → C, bias)

    x_t and h_prev play symmetric roles: the only thing that tells them apart is which half of
    conv_in's input channels they occupy. Bi-WKV4 mixes one stream (receptance, keys and
    values all from x), where :class:`RWKVContextCell` takes receptance from x_t and keys/values
    from h_prev.

    Differences from the fork's code, where this project's modules differ from it: the block is
    :class:`~hpcm_triton.rwkv.blocks.RWKVFusionBlock`, pre-norm as docs/architecture.md §5
    describes it (the fork computes ``x + γ·(Mix(x) − LN(x))``, see that class's note), and
    SpatialMix, ChannelMix and OmniShift carry this project's initialisation
    (hpcm_triton/rwkv/mix.py, omnishift.py).

    Args:
        dim: channels C of x_t, h_prev and h_t (640 in HPCM).
        hidden_rate: ChannelMix expansion of the block (2/3/4 for attn_s1/s2/s3 in Phase 2+).
        use_checkpoint: gradient-checkpoint the RWKV block in training (same gradients).
        backend: Bi-WKV4 backend.

    Shapes: x_t, h_prev ``(B, C, H, W)`` → h_t ``(B, C, H, W)``; any B, H, W ≥ 1.

    Parameters: (2h + 8)·C² + 80·C + 8 for integer hidden width h·C.
    """

    def __init__(self, dim: int, hidden_rate: float = 4, use_checkpoint: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.hidden_rate = hidden_rate
        self.conv_in = nn.Conv2d(2 * dim, dim, 1)
        self.block = RWKVFusionBlock(dim, hidden_rate, use_checkpoint, backend)
        self.conv_out = nn.Conv2d(dim, dim, 1)

    @property
    def use_checkpoint(self) -> bool:
        return self.block.use_checkpoint

    @use_checkpoint.setter
    def use_checkpoint(self, flag: bool) -> None:
        self.block.use_checkpoint = flag

    def forward(self, x_t: Tensor, h_prev: Tensor) -> Tensor:
        _check_streams(x_t, h_prev)
        return self.conv_out(self.block(self.conv_in(torch.cat((x_t, h_prev), dim=1))))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_rate={self.hidden_rate}"
