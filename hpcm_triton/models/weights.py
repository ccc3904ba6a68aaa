"""Reading and loading weights: one set of rules for every file a model is built from.

Formats (told apart by their content, never by the file name):

* **hpcm-triton checkpoints**: a dict with ``"model"`` (a variant name), ``"config"``
  (``dataclasses.asdict(HPCMConfig)``) and ``"state_dict"``. Training checkpoints
  (``hpcm-triton train``) also hold the optimizer, scheduler, RNG states, …; exported weights
  (``hpcm-triton export``) hold the weights with their CDF tables. The model is rebuilt from
  ``model`` and ``config`` and loaded strictly.
* **official HPCM releases**: a bare state_dict with the official key names, or one wrapped as
  ``{"state_dict": …}``, ``{"network": …}`` or ``{"model_state_dict": …}`` (other keys such as
  ``epoch`` are ignored). Such a file does not say which model it is: the caller names it.

In every format, leading ``module.`` prefixes (``DataParallel``/``DistributedDataParallel``,
possibly nested) are stripped from each key that has them, and every floating-point tensor must
be finite. The CDF tables are rebuilt from the loaded weights by ``update()``.

The named variants register themselves in :attr:`HPCM.variants <hpcm_triton.models.hpcm.HPCM>`
(``models/zoo.py``); :func:`load_model` takes that mapping, so this module does not import the
model classes.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Mapping

import torch

from .config import TABLE_BUFFERS, HPCMConfig

# Keys under which a state_dict is wrapped in the files people share.
WRAPPER_KEYS = ("state_dict", "network", "model_state_dict")


class CheckpointMismatchError(ValueError):
    """A state_dict does not fit the model: unknown keys, missing keys or wrong shapes."""


def strip_module_prefix(sd: dict) -> dict:
    """Drop leading ``module.`` prefixes (DataParallel/DDP, possibly nested) from every key.
    Raises ValueError when two keys become one."""
    out = {}
    for k, v in sd.items():
        key = k
        while isinstance(key, str) and key.startswith("module."):
            key = key[len("module."):]
        if key in out:
            raise ValueError(f"keys {k!r} and another one both name {key!r} once 'module.' prefixes are removed")
        out[key] = v
    return out


def unwrap_state_dict(obj) -> dict:
    """The state_dict inside a loaded file: the dict of tensors itself, or the one under one of
    :data:`WRAPPER_KEYS`, with ``module.`` prefixes stripped. Raises ValueError when ``obj``
    holds no tensors."""
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a state_dict (expected a dict of tensors, or one under "
                         + ", ".join(repr(k) for k in WRAPPER_KEYS) + ")")
    return strip_module_prefix(obj)


def check_finite(sd: dict, source: str) -> None:
    """Raise ValueError naming the first floating-point tensor of ``sd`` with a NaN or inf."""
    for name, t in sd.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{source} has non-finite weights in {name} ({bad} of {t.numel()} values are NaN or inf)")


def is_hpcm_triton_format(ck) -> bool:
    """True for this package's training checkpoints and exported weights."""
    return (isinstance(ck, dict) and isinstance(ck.get("model"), str) and isinstance(ck.get("config"), dict)
            and isinstance(ck.get("state_dict"), dict))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load`` (weights only, on CPU) with one-line errors."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises anything on a foreign or damaged file
        first = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: not a readable checkpoint ({e.__class__.__name__}: {first})") from None
    if not isinstance(ck, dict):
        raise ValueError(f"{path}: not a checkpoint (a {type(ck).__name__})")
    return ck


def load_official(model, sd: dict, *, strict_shared: bool) -> dict:
    """Load an official-format state_dict ``sd`` into ``model`` and report what happened.

    ``strict_shared=True`` (HPCM-Base/Large): every key must match the model, except the
    ``adaptive_params_list.*`` that the released checkpoints lack (docs/architecture.md §4 c;
    filled with ones, with a warning). ``strict_shared=False`` (the RWKV phases): official keys
    of modules the phase replaced are dropped, and the phase's new modules keep their
    initialisation. Unknown keys and shape mismatches are errors in both cases.
    """
    own = model.state_dict()
    sd = dict(sd)
    replaced = set(model.config.rwkv_modules)
    unknown = [k for k in sd if k not in own and k.split(".")[0] not in replaced]
    if unknown:
        raise CheckpointMismatchError(f"unknown keys in the state_dict: {_short(unknown)}")
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items()
           if k in own and k.split(".")[-1] not in TABLE_BUFFERS and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointMismatchError("shape mismatch: " + "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))

    filled = sorted(k for k in own if k.startswith("adaptive_params_list.") and k not in sd)
    if filled:
        warnings.warn(f"the checkpoint has no {len(filled)} adaptive_params_list.* entries (the released "
                      "checkpoints never trained them): filled with ones", stacklevel=3)
        for k in filled:
            sd[k] = torch.ones_like(own[k])
    for k in TABLE_BUFFERS:
        sd.setdefault(k, own[k])
    dropped = sorted(k for k in sd if k not in own)
    for k in dropped:
        del sd[k]
    new = sorted({_module_of(k) for k in own if k not in sd})
    if strict_shared and new:
        raise CheckpointMismatchError(f"missing keys in the state_dict: {_short([k for k in own if k not in sd])}")
    result = model.load_state_dict(sd, strict=False)
    if result.unexpected_keys:
        raise CheckpointMismatchError(f"unexpected keys in the state_dict: {_short(result.unexpected_keys)}")
    return {"new_modules": new, "dropped_official_modules": sorted({_module_of(k) for k in dropped}),
            "filled_adaptive_params": filled, "loaded_keys": len(sd)}


def _module_of(key: str) -> str:
    parts = key.split(".")
    # report at the granularity of the model's top-level modules (attn_s1, context_net.0, ...)
    if parts[0] in ("context_net", "adaptive_params_list") and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def _short(keys, n=8):
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def load_model(path: str | os.PathLike, variants: Mapping[str, type], name: str | None = None,
               device: str | torch.device = "cpu", *, fallback_name: str | None = None):
    """A ready model (eval mode on ``device``, CDF tables built) from a file of any format.

    ``variants``: variant name → class (``HPCM.variants``). ``name``: the model the caller
    requires; a checkpoint of another model is refused, and an official state_dict is loaded as
    this model. ``fallback_name``: used only for an official state_dict when ``name`` is None
    (e.g. a command's default ``--model``), never checked against an hpcm-triton checkpoint.
    Returns ``(model, variant name, the loaded dict)``. Raises ValueError (one line, naming the
    file) for anything that is not a usable checkpoint of a known model.
    """
    path = Path(path)
    ck = read_checkpoint(path)
    if not variants:
        raise RuntimeError("no model variants are registered: import hpcm_triton.models.zoo first")
    if is_hpcm_triton_format(ck):
        ck_name = ck["model"].lower()
        if ck_name not in variants:
            raise ValueError(f"{path}: checkpoint is for an unknown model {ck['model']!r}")
        if name is not None and name.lower() != ck_name:
            raise ValueError(f"{path}: checkpoint is for model {ck_name!r}, not {name.lower()!r}")
        sd = strip_module_prefix(ck["state_dict"])
        check_finite(sd, f"checkpoint {path}")
        try:
            model = variants[ck_name](**{**HPCMConfig.json_fields(ck["config"]), "use_checkpoint": False})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: checkpoint has an unusable configuration ({e})") from None
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path}: state_dict does not fit {ck_name}: {str(e).splitlines()[0]}") from None
        name = ck_name
    else:
        name = name or fallback_name
        if name is None:
            raise ValueError(f"{path}: an official state_dict does not say which model it is; pass --model")
        if name.lower() not in variants:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(variants)}")
        name = name.lower()
        try:
            sd = unwrap_state_dict(ck)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        check_finite(sd, f"checkpoint {path}")
        try:
            model = variants[name].from_official_state_dict(sd)
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(f"{path}: does not fit {name}: {e}") from None
        new = model.load_report.get("new_modules")
        if new:
            warnings.warn(f"{path}: an official state_dict loaded into {name}: {', '.join(new)} are untrained "
                          "(fine-tune them with `train --init-official`)", stacklevel=2)
    model.to(device).eval()
    model.update(force=True)
    return model, name, ck
