"""Reading and writing checkpoints.

Formats ``load_checkpoint`` reads (wherever a checkpoint is read: train, evaluate, compress,
decompress, ``HPCM.from_checkpoint``):

* this package's training checkpoint and its exported weights, dicts with ``"model"`` (a variant
  name), ``"config"`` (``asdict(HPCMConfig)``) and ``"state_dict"``; the model is rebuilt from
  them and loaded strictly. A training checkpoint also has ``optimizer``, ``scheduler``,
  ``scaler``, ``step``, ``position``, ``rng`` (every rank's), ``run`` (the run configuration), …
* an official HPCM release: the bare state_dict or ``{"state_dict": ...}`` (other keys such as
  ``epoch`` are ignored). It does not say which model it is: the caller names it.

In every format, ``module.`` prefixes (from ``DataParallel``/``DistributedDataParallel``) are
stripped.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..models.config import HPCMConfig
from ..models.zoo import MODELS, get_model
from ..outputs import atomic_write, check_output

EXPORT_FORMAT = "hpcm-triton-weights/1"


def strip_module_prefix(sd: dict) -> dict:
    """Drop leading ``module.`` (DataParallel/DDP) prefixes from every key."""
    out = {}
    for k, v in sd.items():
        while isinstance(k, str) and k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def official_state_dict(obj) -> dict:
    """The state_dict inside an official checkpoint object: the bare dict or ``{"state_dict": ...}``,
    with ``module.`` prefixes stripped. Raises ValueError when ``obj`` holds no tensors."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a state_dict (expected a dict of tensors, or {'state_dict': {...}})")
    return strip_module_prefix(obj)


def is_training_format(ck) -> bool:
    return (isinstance(ck, dict) and isinstance(ck.get("model"), str) and isinstance(ck.get("config"), dict)
            and isinstance(ck.get("state_dict"), dict))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load`` (weights only, on CPU) with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{path}: not a readable checkpoint ({e.__class__.__name__}: {first})") from None
    if not isinstance(ck, dict):
        raise ValueError(f"{path}: not a checkpoint (a {type(ck).__name__})")
    return ck


def load_checkpoint(path: str | os.PathLike, name: str | None = None, device: str | torch.device = "cpu", *,
                    fallback_name: str | None = None):
    """Load a training checkpoint, exported weights, or an official HPCM state_dict.

    ``name``: the model the caller requires; a training checkpoint of another model is refused,
    and an official state_dict is loaded as this model. ``fallback_name``: used only for an
    official state_dict when ``name`` is None (e.g. a command's default ``--model``), never
    checked against a training checkpoint. Returns ``(model, name, checkpoint_dict)``, the model
    in eval mode on ``device`` with its CDF tables rebuilt from the loaded weights.
    """
    path = Path(path)
    ck = read_checkpoint(path)
    if is_training_format(ck):
        ck_name = ck["model"].lower()
        if ck_name not in MODELS:
            raise ValueError(f"{path}: checkpoint is for an unknown model {ck['model']!r}")
        if name is not None and name.lower() != ck_name:
            raise ValueError(f"{path}: checkpoint is for model {ck_name!r}, not {name.lower()!r}")
        model = get_model(ck_name, **{**HPCMConfig.json_fields(ck["config"]), "use_checkpoint": False})
        try:
            model.load_state_dict(strip_module_prefix(ck["state_dict"]), strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path}: state_dict does not fit {ck_name}: {str(e).splitlines()[0]}") from None
        name = ck_name
    else:
        name = name or fallback_name
        if name is None:
            raise ValueError(f"{path}: an official state_dict does not say which model it is; pass --model")
        if name.lower() not in MODELS:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        try:
            sd = official_state_dict(ck)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        model = MODELS[name.lower()].from_official_state_dict(sd)
        name = name.lower()
        new = getattr(model, "load_report", {}).get("new_modules")
        if new:
            warnings.warn(f"{path}: an official state_dict loaded into {name}: {', '.join(new)} are untrained "
                          "(fine-tune them with `train --init-official`)", stacklevel=2)
    model.to(device).eval()
    model.update(force=True)
    return model, name, ck


def save_atomic(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and a rename: never a partial checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def export_weights(src: str | os.PathLike, dst: str | os.PathLike, force: bool = False) -> dict:
    """A training checkpoint → ``{"format", "model", "config", "state_dict" (with CDF tables),
    "lmbda", "metric", "step"}``, loadable by ``load_checkpoint`` (``--checkpoint`` everywhere)
    and ``HPCM.from_checkpoint``. Optimizer and RNG states are left out."""
    out = check_output(dst, force=force, inputs=[src])
    ck = read_checkpoint(src)
    if not is_training_format(ck):
        raise ValueError(f"{src}: not a hpcm-triton training checkpoint (an official state_dict needs no export: "
                         "pass it with --checkpoint and --model)")
    model, name, _ = load_checkpoint(src)
    run = ck.get("run", {}) if isinstance(ck.get("run"), dict) else {}
    obj = {"format": EXPORT_FORMAT, "model": name, "config": ck["config"], "state_dict": model.state_dict(),
           "lmbda": ck.get("lmbda", run.get("lmbda")), "metric": run.get("metric", "mse"),
           "step": int(ck.get("step", 0))}
    save_atomic(obj, out)
    return {**obj, "bytes": out.stat().st_size}
