"""OmniShift: a re-parameterisable depthwise 5×5 token shift (Restore-RWKV / LALIC).

Training form (four parallel branches, all depthwise, no bias)::

    y = α0·x + α1·dw1×1(x) + α2·dw3×3(x) + α3·dw5×5(x)

Every branch is linear and depthwise with "same" padding, so the sum is itself one depthwise
5×5 convolution whose kernel is the zero-padded sum of the branch kernels (α0 is a 1 on the
centre tap). In eval mode the module runs that single 5×5 convolution.

Unlike the public version, the fused kernel is not a parameter and not a buffer: it never
appears in ``state_dict`` (the public module stores a random, unused ``conv5x5_reparam`` there
until its first eval forward). It is derived from the parameters on demand and cached.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OmniShift"]


class OmniShift(nn.Module):
    """Depthwise multi-kernel shift with an exact single-5×5 inference form.

    Args:
        dim: number of channels C.

    Shapes:
        ``forward(x)``: x ``(B, C, H, W)`` → ``(B, C, H, W)``, any B ≥ 1, H, W ≥ 1.

    Parameters: ``conv1x1.weight (C,1,1,1)``, ``conv3x3.weight (C,1,3,3)``,
    ``conv5x5.weight (C,1,5,5)``, ``alpha (4,)`` — 35·C + 4 numbers.

    Init: ``alpha = (1, 0, 0, 0)``, so a fresh OmniShift is exactly the identity (the block
    around it then starts as plain RWKV without a shift, independent of the random seed); the
    conv weights keep PyTorch's default (seeded) init so that ∂L/∂α_j = ⟨g, conv_j(x)⟩ ≠ 0 and
    the branches switch on after the first optimiser step. The public code used
    ``torch.randn(4)`` here.

    Eval mode: the fused kernel is cached, keyed on the ``_version``, storage pointer, dtype and
    device of the four parameters, and dropped at every ``train()``/``eval()`` call. Optimiser
    steps, ``load_state_dict`` and ``.to()`` therefore invalidate it automatically. In-place
    edits through ``param.data`` bypass PyTorch's version counter: call
    :meth:`invalidate_reparam` (or ``.eval()`` again) after such edits (e.g. hand-written EMA).
    When autograd is recording and the parameters require grad, eval mode uses a fresh,
    differentiable fused kernel instead of the cache, so eval-mode gradients stay correct.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        # Depthwise branches: groups=dim, no bias (a bias would break the pure-shift role).
        self.conv1x1 = nn.Conv2d(dim, dim, 1, padding=0, groups=dim, bias=False)
        self.conv3x3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.conv5x5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim, bias=False)
        self.alpha = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        # (key, fused weight); a plain attribute, so never part of state_dict.
        self._reparam_cache: tuple[tuple, Tensor] | None = None

    # ------------------------------------------------------------------ training form
    def forward_train(self, x: Tensor) -> Tensor:
        """The four-branch form (used in training mode)."""
        a = self.alpha
        return a[0] * x + a[1] * self.conv1x1(x) + a[2] * self.conv3x3(x) + a[3] * self.conv5x5(x)

    # ------------------------------------------------------------------ inference form
    def reparam_weight(self) -> Tensor:
        """The fused depthwise kernel ``(C, 1, 5, 5)``; differentiable in the parameters."""
        a = self.alpha
        w = a[3] * self.conv5x5.weight
        w = w + F.pad(a[2] * self.conv3x3.weight, (1, 1, 1, 1))
        # identity and 1×1 both act on the centre tap only
        centre = a[0] + a[1] * self.conv1x1.weight
        return w + F.pad(centre, (2, 2, 2, 2))

    def invalidate_reparam(self) -> None:
        """Drop the cached fused kernel (needed only after edits through ``param.data``)."""
        self._reparam_cache = None

    def _cache_key(self) -> tuple:
        ps = (self.alpha, self.conv1x1.weight, self.conv3x3.weight, self.conv5x5.weight)
        return tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in ps) + (
            torch.is_inference_mode_enabled(),
        )

    def _eval_weight(self) -> Tensor:
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            # Someone wants parameter gradients in eval mode: give them the real graph.
            return self.reparam_weight()
        key = self._cache_key()
        cache = self._reparam_cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, self.reparam_weight().detach())
            self._reparam_cache = cache
        return cache[1]

    def train(self, mode: bool = True):
        self._reparam_cache = None
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return self.forward_train(x)
        return F.conv2d(x, self._eval_weight(), padding=2, groups=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
