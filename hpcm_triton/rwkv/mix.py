"""RWKV token mixers for 2-D feature maps: SpatialMix (Bi-WKV4) and ChannelMix (gated FFN).

Layout convention for the whole ``hpcm_triton.rwkv`` package:

* every module's ``forward`` takes and returns feature maps ``(B, C, H, W)`` (HPCM's layout);
* internally tokens are ``(B, T, C)`` with ``T = H·W`` in raster order (token ``t = h·W + w``),
  the layout of the Bi-WKV4 operator. ``forward_tokens(x, H, W)`` methods expose that layout so
  that blocks can keep their residual stream in tokens and convert only around the convolutions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .omnishift import OmniShift

__all__ = ["SpatialMix", "ChannelMix", "to_tokens", "to_map"]


def to_tokens(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` → ``(B, H·W, C)``, raster order."""
    return rearrange(x, "b c h w -> b (h w) c")


def to_map(x: Tensor, H: int, W: int) -> Tensor:
    """``(B, H·W, C)`` → ``(B, C, H, W)``, inverse of :func:`to_tokens`."""
    return rearrange(x, "b (h w) c -> b c h w", h=H, w=W)


def maybe_checkpoint(enabled: bool, module: nn.Module, fn, *args):
    """Run ``fn(*args)``, under non-reentrant gradient checkpointing when it can pay off:
    the flag is on, the module trains and autograd records. Recomputation is deterministic
    (no dropout, OmniShift uses its training branches), so gradients are unchanged."""
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _biwkv4(w: Tensor, u: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
    # Imported at first use, so that building a model without RWKV modules never loads the
    # operator package; Python caches the module after the first call.
    from kernels_triton import biwkv4

    return biwkv4(w, u, k, v, backend=backend)


class SpatialMix(nn.Module):
    """Bi-WKV4 spatial mixing (LALIC's ``SpatialMix_BiV4``), optionally cross-stream.

    ::

        s   = OmniShift(x)                      (kv stream: OmniShift_kv(kv) if cross)
        r, k, v = s W_r, s_kv W_k, s_kv W_v      (Linear, no bias)
        y   = Bi-WKV4(decay / T, boost / T, k, v),   T = H·W of the current map
        out = (σ(r) ⊙ y) W_o                     (Linear, no bias)

    Dividing decay and boost by T (as LALIC does, no exp) makes the decay across the whole map,
    (T−2)·decay/T ≈ decay, independent of resolution, so one set of weights serves 1×1 … 4K maps.

    Args:
        dim: channels C.
        cross: if True, k and v come from a second stream ``kv`` with its own OmniShift
            (used by :class:`RWKVContextCell`: receptance from x_t, keys/values from h_prev).
        backend: passed to ``kernels_triton.biwkv4`` (``"auto"``, ``"torch"``, ...).

    Shapes:
        ``forward(x, kv=None)``: x, kv ``(B, C, H, W)`` → ``(B, C, H, W)``.
        ``forward_tokens(x, H, W, kv=None)``: x, kv ``(B, H·W, C)`` → ``(B, H·W, C)``.

    Init (deterministic): ``decay = linspace(0, 8, C)`` — channel 0 averages the whole map
    uniformly, the last channel's weight falls by e^-8 across the map (a spread of ranges, like
    heads); ``boost = 0`` (the own token weighs like a distance-1 neighbour). LALIC drew both
    from ``randn``. The Linear layers use PyTorch's default init (deterministic under a seed).

    Parameters: 4·C² + 37·C + 4 (+ 35·C + 4 with ``cross``).
    """

    def __init__(self, dim: int, cross: bool = False, backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.cross = cross
        self.backend = backend
        self.omni_shift = OmniShift(dim)
        self.omni_shift_kv = OmniShift(dim) if cross else None
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim, bias=False)
        self.decay = nn.Parameter(torch.linspace(0.0, 8.0, dim))
        self.boost = nn.Parameter(torch.zeros(dim))

    def _mix(self, x_map: Tensor, kv_map: Tensor | None) -> Tensor:
        """Maps in, tokens out."""
        B, C, H, W = x_map.shape
        T = H * W
        if kv_map is not None:
            if not self.cross:
                raise ValueError("SpatialMix(cross=False) takes no kv stream")
            if kv_map.shape != x_map.shape:
                raise ValueError(f"kv shape {tuple(kv_map.shape)} != x shape {tuple(x_map.shape)}")
        s = to_tokens(self.omni_shift(x_map))
        if not self.cross:
            s_kv = s
        else:
            # a cross module used on one stream still routes kv through its own shift
            s_kv = to_tokens(self.omni_shift_kv(x_map if kv_map is None else kv_map))
        r = self.receptance(s)
        k = self.key(s_kv)
        v = self.value(s_kv)
        y = _biwkv4(self.decay / T, self.boost / T, k, v, self.backend)
        return self.output(torch.sigmoid(r) * y)

    def forward(self, x: Tensor, kv: Tensor | None = None) -> Tensor:
        H, W = x.shape[-2:]
        return to_map(self._mix(x, kv), H, W)

    def forward_tokens(self, x: Tensor, H: int, W: int, kv: Tensor | None = None) -> Tensor:
        return self._mix(to_map(x, H, W), None if kv is None else to_map(kv, H, W))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, cross={self.cross}, backend={self.backend!r}"


class ChannelMix(nn.Module):
    """RWKV channel mixing, a gated squared-ReLU FFN after an OmniShift.

    ::

        s   = OmniShift(x)
        out = σ(s W_r) ⊙ ((relu(s W_k))² W_v)     W_k: C→hC, W_v: hC→C, W_r: C→C, no bias

    Args:
        dim: channels C.
        hidden_rate: FFN expansion h; hidden width ``int(hidden_rate·C)``.

    Shapes:
        ``forward(x)``: ``(B, C, H, W)`` → ``(B, C, H, W)``;
        ``forward_tokens(x, H, W)``: ``(B, H·W, C)`` → ``(B, H·W, C)``.

    Parameters: C² + 2·C·int(h·C) + 35·C + 4.
    """

    def __init__(self, dim: int, hidden_rate: float = 4):
        super().__init__()
        self.dim = dim
        self.hidden_rate = hidden_rate
        hidden = int(hidden_rate * dim)
        self.omni_shift = OmniShift(dim)
        self.key = nn.Linear(dim, hidden, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(hidden, dim, bias=False)

    def _mix(self, x_map: Tensor) -> Tensor:
        s = to_tokens(self.omni_shift(x_map))
        kv = self.value(torch.square(torch.relu(self.key(s))))
        return torch.sigmoid(self.receptance(s)) * kv

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        return to_map(self._mix(x), H, W)

    def forward_tokens(self, x: Tensor, H: int, W: int) -> Tensor:
        return self._mix(to_map(x, H, W))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_rate={self.hidden_rate}"
