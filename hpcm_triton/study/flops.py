"""MACs of a forward pass: ``torch.utils.flop_counter.FlopCounterMode``, with Bi-WKV4 counted.

FlopCounterMode counts the FLOPs of the operators it has a formula for: matrix products and
convolutions (2 FLOPs per multiply-accumulate), and Bi-WKV4 where the operator is registered
with one (``torch.ops.hpcm.biwkv4``, kernels_triton/custom_op.py: 17 FLOPs per batch row, token
and channel, each exp, add, multiply and divide counted once, from the recurrences of
docs/biwkv4.md §2). Element-wise work elsewhere counts nothing. MACs are FLOPs / 2.

Where FlopCounterMode does not count a Bi-WKV4 call (an operator without a flop formula), the
study counts it itself, per call and with the same formula (:func:`biwkv4_flops`), by wrapping
the mixing step of every ``hpcm_triton.rwkv.mix.SpatialMix`` of the model while counting.
:func:`biwkv4_counting` is the one place that picks between the two: it asks FlopCounterMode
whether it counts a Bi-WKV4 call, so a call is never counted twice or not at all.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from kernels_triton.custom_op import FWD_FLOPS_PER_ELEMENT

from ..rwkv.mix import SpatialMix

REGISTERED, ANALYTIC = "registered flop formula", "counted per SpatialMix call"
BIWKV4_OP = "hpcm.biwkv4"  # the operator's name in FlopCounterMode's per-operator counts


def biwkv4_flops(B: int, T: int, C: int) -> int:
    """Forward FLOPs of Bi-WKV4 on ``k, v: (B, T, C)``: FWD_FLOPS_PER_ELEMENT·B·T·C, the O(T)
    form's count (docs/biwkv4.md §2; the tally is in kernels_triton/custom_op.py)."""
    return FWD_FLOPS_PER_ELEMENT * B * T * C


@functools.lru_cache(maxsize=None)
def biwkv4_counting() -> str:
    """:data:`REGISTERED` where FlopCounterMode counts a Bi-WKV4 call itself, else :data:`ANALYTIC`."""
    from kernels_triton import biwkv4

    k = torch.zeros(1, 4, 2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        biwkv4(torch.zeros(2), torch.zeros(2), k, k)
    return REGISTERED if counter.get_total_flops() > 0 else ANALYTIC


class ForwardMacs:
    """Context manager counting the MACs of the model calls inside it.

    After exit: ``macs`` (all), ``biwkv4_macs`` (the Bi-WKV4 part), ``by_module`` (per top-level
    module of ``model``: g_a, attn_s1, context_net, ...), ``biwkv4`` (how Bi-WKV4 was counted).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.biwkv4 = biwkv4_counting()
        self.counter = FlopCounterMode(display=False)
        self._bi = {}
        self._wrapped = []

    def __enter__(self):
        if self.biwkv4 == ANALYTIC:
            for name, m in self.model.named_modules():
                if isinstance(m, SpatialMix):
                    self._wrap(m, name.split(".")[0])
        self.counter.__enter__()
        return self

    def _wrap(self, m: SpatialMix, top: str) -> None:
        mix = m._mix  # maps in (B, C, H, W), tokens out: the one step every SpatialMix path runs

        def counted(x_map, kv_map):
            B, C, H, W = x_map.shape
            self._bi[top] = self._bi.get(top, 0) + biwkv4_flops(B, H * W, C)
            return mix(x_map, kv_map)

        m._mix = counted  # an instance attribute over the method; removed on exit
        self._wrapped.append(m)

    def __exit__(self, *exc):
        self.counter.__exit__(*exc)
        for m in self._wrapped:
            del m._mix
        self._wrapped.clear()
        return False

    @property
    def biwkv4_macs(self) -> float:
        if self.biwkv4 == ANALYTIC:
            return sum(self._bi.values()) / 2
        per_op = self.counter.get_flop_counts().get("Global", {})
        return sum(n for op, n in per_op.items() if str(op) == BIWKV4_OP) / 2

    @property
    def macs(self) -> float:
        counted = self.counter.get_total_flops() / 2
        return counted + (self.biwkv4_macs if self.biwkv4 == ANALYTIC else 0)

    @property
    def by_module(self) -> dict:
        """MACs per top-level module (ModuleLists, which are never called, through their items)."""
        counts = self.counter.get_flop_counts()
        flops: dict = {}
        depth: dict = {}
        for key, per_op in counts.items():
            parts = key.split(".")
            if len(parts) < 2:
                continue  # "Global" and the model itself
            top, d = parts[1], len(parts)
            if d < depth.get(top, 99):
                depth[top], flops[top] = d, 0
            if d == depth[top]:
                flops[top] += sum(per_op.values())
        for top, f in self._bi.items():
            flops[top] = flops.get(top, 0) + f
        return {k: v / 2 for k, v in flops.items()}
