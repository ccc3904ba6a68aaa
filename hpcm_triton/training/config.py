"""The run configuration of ``hpcm-triton train``: its options, defaults and checks. Torch-free.

A run's configuration is a dict with the keys of :data:`DEFAULTS`. A fresh run takes the
options given and fills the gaps from the defaults; a resumed run fills them from the
checkpoint's saved configuration, and refuses a changed :data:`IDENTITY` option unless
``override`` (:func:`resolve_config`). A checkpoint stores the resolved dict under ``"run"``.
"""
from __future__ import annotations

import math

from ..models.config import MODEL_NAMES, SIZES

METRICS = ("mse", "ms-ssim")
AMP = ("none", "bf16", "fp16")

# Defaults: Adam at 1e-4, gradient clipping at 1.0 and 256² crops as HPCM was trained
# (docs/architecture.md), 5e-5 for the RWKV modules (§5 there).
DEFAULTS = {
    "model": "phase3", "size": "full", "data": None, "val": None, "val_every": 1000, "val_crop": 0,
    "val_max_images": 0, "steps": 1000, "batch_size": 8, "crop": 256, "lmbda": 0.0067, "metric": "mse",
    "lr": 1e-4, "rwkv_lr": 5e-5, "milestones": [], "gamma": 0.1, "grad_clip": 1.0, "workers": 2,
    "amp": "none", "grad_checkpointing": False, "init_official": None, "freeze_inherited": 0,
    "checkpoint_every": 500, "log_every": 10, "seed": 0, "device": "cpu",
}
# Changing one of these on resume changes what is being trained: refused unless override.
IDENTITY = ("model", "size", "lmbda", "metric")


def resolve_config(given: dict, saved: dict | None = None, override: bool = False) -> tuple[dict, list]:
    """Defaults < the saved run (on resume) < options given. Returns (config, changed keys)."""
    cfg = dict(DEFAULTS)
    if saved:
        cfg.update({k: saved[k] for k in DEFAULTS if k in saved})
    changed = []
    for k, v in given.items():
        if k not in DEFAULTS:
            raise ValueError(f"unknown training option {k!r}")
        if v is None:
            continue
        if saved is not None and cfg.get(k) != v:
            changed.append(k)
        cfg[k] = v
    if saved is not None:
        refused = [k for k in changed if k in IDENTITY]
        if refused and not override:
            what = ", ".join(f"{k} ({saved.get(k)!r} → {cfg[k]!r})" for k in refused)
            raise ValueError(f"resume would change {what}: pass --override to accept")
    return cfg, changed


def validate_config(cfg: dict) -> dict:
    """One clear ValueError per bad option."""
    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

    cfg = dict(cfg)
    cfg["model"] = str(cfg["model"]).lower()
    need(cfg["model"] in MODEL_NAMES, f"unknown model {cfg['model']!r}; choose from {', '.join(MODEL_NAMES)}")
    need(cfg["size"] in SIZES, f"--size must be one of {', '.join(SIZES)}, got {cfg['size']!r}")
    need(cfg["metric"] in METRICS, f"--metric must be one of {', '.join(METRICS)}, got {cfg['metric']!r}")
    need(cfg["amp"] in AMP, f"--amp must be one of {', '.join(AMP)}, got {cfg['amp']!r}")
    for k, flag in (("lmbda", "--lmbda"), ("lr", "--lr"), ("rwkv_lr", "--rwkv-lr"), ("gamma", "--gamma")):
        v = cfg[k]
        need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"{flag} must be > 0, got {v}")
    need(math.isfinite(cfg["grad_clip"]) and cfg["grad_clip"] >= 0,
         f"--grad-clip must be ≥ 0, got {cfg['grad_clip']}")
    for k, lo in (("steps", 1), ("batch_size", 1), ("checkpoint_every", 1), ("log_every", 1), ("workers", 0),
                  ("val_every", 0), ("val_max_images", 0), ("freeze_inherited", 0), ("seed", 0), ("val_crop", 0)):
        v = cfg[k]
        need(isinstance(v, int) and v >= lo, f"--{k.replace('_', '-')} must be an integer ≥ {lo}, got {v}")
    need(isinstance(cfg["crop"], int) and cfg["crop"] >= 64, f"--crop must be ≥ 64 (the models' minimum), got "
         f"{cfg['crop']}")
    need(cfg["val_crop"] == 0 or cfg["val_crop"] >= 64, f"--val-crop must be 0 or ≥ 64, got {cfg['val_crop']}")
    if cfg["metric"] == "ms-ssim":
        need(cfg["crop"] > 160, f"--metric ms-ssim needs --crop > 160 (5 MS-SSIM scales), got {cfg['crop']}")
        need(cfg["val_crop"] == 0 or cfg["val_crop"] > 160, "--metric ms-ssim needs --val-crop 0 or > 160")
    ms = list(cfg["milestones"] or [])
    need(all(isinstance(m, int) and m >= 1 for m in ms) and ms == sorted(set(ms)),
         f"--milestones must be increasing step numbers ≥ 1, got {ms}")
    cfg["milestones"] = ms
    need(cfg["freeze_inherited"] == 0 or cfg["init_official"], "--freeze-inherited needs --init-official (without "
         "it, no part of the model is inherited)")
    return cfg
