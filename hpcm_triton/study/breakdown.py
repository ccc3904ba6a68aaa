"""Where the time goes: wall time per module group of forward, compress and decompress.

Each top-level module of the model (and each item of its ModuleLists) gets a forward pre-hook
and hook that read a timer (after a CUDA synchronise); the rANS coder's ``encode`` and the
steps of ``DecodeSession`` (:data:`CODER_STEPS`) are wrapped the same way for the time of one
pass. The groups are the model's parts (docs/architecture.md §2–3): g_a, h_a, h_s, the 1×1
adaptors before the spatial priors, the spatial priors, the three context cells, context_net,
g_s, the entropy model's likelihoods, entropy coding, and "other": the rest of the pass (masks,
quantisation, the schedule's glue), the total minus the groups. Each pass runs ``warmup`` times
untimed, then ``repeats`` times; every number is a median over the repeats. The forward's MACs
per group come from :class:`~hpcm_triton.study.flops.ForwardMacs`.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
from torch import nn

from ..entropy import coder
from ..models.zoo import HPCM
from .flops import ForwardMacs
from .measure import build, image, say, sync

# Group → the top-level modules in it, in the order of the schedule.
GROUPS = {
    "g_a": ("g_a",), "h_a": ("h_a",), "h_s": ("h_s",),
    "adaptors": ("y_spatial_prior_adaptor_list_s1", "y_spatial_prior_adaptor_list_s2",
                 "y_spatial_prior_adaptor_list_s3"),
    "spatial priors": ("y_spatial_prior_s1_s2", "y_spatial_prior_s3"),
    "attn_s1": ("attn_s1",), "attn_s2": ("attn_s2",), "attn_s3": ("attn_s3",),
    "context_net": ("context_net",), "g_s": ("g_s",), "entropy model": ("entropy_estimation",),
}
CODING, OTHER = "entropy coding", "other"
# What of the rANS decoder a decompress runs: starting its worker process, the decode calls, the
# re-encoding check, and ending the worker.
CODER_STEPS = ("__post_init__", "decode", "verify", "__exit__")
ORDER = (*GROUPS, CODING, OTHER)
PASSES = ("forward", "compress", "decompress")


def group_of(top: str) -> str | None:
    return next((g for g, names in GROUPS.items() if top in names), None)


class GroupTimer:
    """``with GroupTimer(model, device) as t: ...`` → ``t.seconds`` per group for the code inside."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.seconds = dict.fromkeys(ORDER[:-1], 0.0)
        self._handles = []
        self._patched = []

    def _clock(self, group: str):
        starts = []

        def pre(*_):
            sync(self.device)
            starts.append(time.perf_counter())

        def post(*_):
            sync(self.device)
            self.seconds[group] += time.perf_counter() - starts.pop()

        return pre, post

    def _wrap(self, owner, name: str, group: str):
        fn = getattr(owner, name)
        pre, post = self._clock(group)

        def timed(*args, **kwargs):
            pre()
            try:
                return fn(*args, **kwargs)
            finally:
                post()

        setattr(owner, name, timed)
        self._patched.append((owner, name, fn))

    def __enter__(self):
        for top, child in self.model.named_children():
            group = group_of(top)
            if group is None:
                continue
            for m in (child if isinstance(child, nn.ModuleList) else (child,)):
                pre, post = self._clock(group)
                self._handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        self._wrap(sys.modules[HPCM.__module__], "encode", CODING)  # the name compress calls
        for name in CODER_STEPS:
            self._wrap(coder.DecodeSession, name, CODING)
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        for owner, name, fn in reversed(self._patched):
            setattr(owner, name, fn)
        self._handles.clear()
        self._patched.clear()
        return False


def breakdown(spec: dict) -> dict:
    """Per-group medians of forward (eval), compress and decompress of one variant at one size:
    ``{"resolution", "passes": {pass: {"total_s", "groups": {group: s}}}, "macs_by_group"}``."""
    dev = torch.device(spec["device"])
    res = tuple(spec["resolution"])
    model = build(spec["variant"], spec["size"], dev)
    x = image(res).to(dev)
    comp = model.compress(x)
    calls = {"forward": lambda: model(x), "compress": lambda: model.compress(x),
             "decompress": lambda: model.decompress(comp)}
    out = {"resolution": list(res), "passes": {}}
    with torch.no_grad():
        with ForwardMacs(model) as c:
            model(x)
        macs = {}
        for top, n in c.by_module.items():
            g = group_of(top) or OTHER
            macs[g] = macs.get(g, 0) + n / (res[0] * res[1])
        out["macs_by_group"] = macs
        for name, call in calls.items():
            for _ in range(spec["warmup"]):
                call()
            totals, groups = [], []
            for _ in range(spec["repeats"]):
                with GroupTimer(model, dev) as t:
                    sync(dev)
                    t0 = time.perf_counter()
                    call()
                    sync(dev)
                    total = time.perf_counter() - t0
                totals.append(total)
                groups.append({**t.seconds, OTHER: total - sum(t.seconds.values())})
            med = {g: statistics.median(r[g] for r in groups) for g in ORDER}
            out["passes"][name] = {"total_s": statistics.median(totals), "groups": med,
                                   "runs_total_s": totals}
            say(f"{spec['variant']} {res[0]}×{res[1]} {name}: {out['passes'][name]['total_s']:.3f} s; "
                + ", ".join(f"{g} {s * 1e3:.0f} ms" for g, s in med.items() if s > 0.0005))
    return out
