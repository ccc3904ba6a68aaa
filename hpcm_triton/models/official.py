"""Loading state_dicts with the official release's key names (SPEC §3, §4)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .hpcm import TABLE_BUFFERS


class CheckpointMismatchError(ValueError):
    """A state_dict does not fit the model: unknown keys, missing keys or wrong shapes."""


def load_official(model: nn.Module, sd: dict, *, strict_shared: bool) -> dict:
    """Load ``sd`` into ``model`` and report what happened.

    ``strict_shared=True`` (HPCM-Base/Large): every key must match the model, except the
    ``adaptive_params_list.*`` that checkpoints released before 2026-01 lack (filled with ones).
    ``strict_shared=False`` (the RWKV phases): official keys that belong to modules the phase
    replaced are dropped, and the phase's new modules keep their seeded initialisation.
    Unknown keys and shape mismatches are errors in both cases.
    """
    own = model.state_dict()
    sd = dict(sd)
    unknown = [k for k in sd if k not in own and not _is_replaced_official_key(model, k)]
    if unknown:
        raise CheckpointMismatchError(f"unknown keys in the state_dict: {_short(unknown)}")
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items()
           if k in own and k.split(".")[-1] not in TABLE_BUFFERS and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointMismatchError("shape mismatch: " + "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))

    filled = sorted(k for k in own if k.startswith("adaptive_params_list.") and k not in sd)
    if filled:
        warnings.warn(f"the checkpoint has no {len(filled)} adaptive_params_list.* entries (released before the "
                      "2026-01 fix, they were untrained): filled with ones", stacklevel=3)
        for k in filled:
            sd[k] = torch.ones_like(own[k])
    missing_tables = [k for k in TABLE_BUFFERS if k not in sd]
    for k in missing_tables:
        sd[k] = own[k]
    dropped = sorted(k for k in sd if k not in own)
    for k in dropped:
        del sd[k]
    new = sorted({_module_of(k) for k in own if k not in sd})
    if strict_shared and new:
        raise CheckpointMismatchError(f"missing keys in the state_dict: {_short([k for k in own if k not in sd])}")
    result = model.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return {"new_modules": new, "dropped_official_modules": sorted({_module_of(k) for k in dropped}),
            "filled_adaptive_params": filled, "loaded_keys": len(sd)}


def _module_of(key: str) -> str:
    parts = key.split(".")
    # report at the granularity of the model's top-level modules (attn_s1, context_net.0, ...)
    if parts[0] in ("context_net", "adaptive_params_list") and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def _is_replaced_official_key(model: nn.Module, key: str) -> bool:
    """An official key whose module this variant replaced by an RWKV module."""
    return key.split(".")[0] in model.config.rwkv_modules


def _short(keys, n=8):
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")
