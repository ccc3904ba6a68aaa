"""Writing training checkpoints and exporting weights.

Reading any checkpoint (training, exported, official) is :mod:`hpcm_triton.models.weights`'s
job; this module writes the two hpcm-triton formats:

* the training checkpoint (:data:`TRAIN_FORMAT`, written by the loop): the weights with the
  model name and configuration, plus the optimizer, scheduler, grad scaler, step, stream
  position, every rank's RNG states and the run configuration (``run``);
* exported weights (:data:`EXPORT_FORMAT`): the weights with their CDF tables, the model name,
  configuration, λ, metric and step; nothing needed only to resume.
"""
from __future__ import annotations

import os

import torch

from ..models.weights import is_hpcm_triton_format, read_checkpoint
from ..models.zoo import load_checkpoint
from ..outputs import atomic_write, check_output

TRAIN_FORMAT = "hpcm-triton-train/1"
EXPORT_FORMAT = "hpcm-triton-weights/1"


def save_atomic(obj, path: str | os.PathLike, *, exclusive: bool = False) -> None:
    """``torch.save`` through a temporary file and a rename: never a partial checkpoint
    (``exclusive``: see :func:`hpcm_triton.outputs.atomic_write`)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp), exclusive=exclusive)


def export_weights(src: str | os.PathLike, dst: str | os.PathLike, force: bool = False) -> dict:
    """A training checkpoint → ``{"format", "model", "config", "state_dict" (with CDF tables),
    "lmbda", "metric", "step"}``, loadable wherever weights are read (``--checkpoint``,
    ``HPCM.from_checkpoint``). Optimizer and RNG states are left out."""
    out = check_output(dst, force=force, inputs=[src])
    ck = read_checkpoint(src)
    if not is_hpcm_triton_format(ck):
        raise ValueError(f"{src}: not a hpcm-triton training checkpoint (an official state_dict needs no export: "
                         "pass it with --checkpoint and --model)")
    model, name, _ = load_checkpoint(src)
    run = ck.get("run", {}) if isinstance(ck.get("run"), dict) else {}
    obj = {"format": EXPORT_FORMAT, "model": name, "config": ck["config"], "state_dict": model.state_dict(),
           "lmbda": ck.get("lmbda", run.get("lmbda")), "metric": run.get("metric", "mse"),
           "step": int(ck.get("step", 0))}
    save_atomic(obj, out, exclusive=not force)
    return {**obj, "bytes": out.stat().st_size}
