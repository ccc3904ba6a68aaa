"""The variants a study can run: the named models, and configurations one switch away from them.
Torch-free.

A study variant is a named model (``hpcm_triton.models.config.PRESETS``) plus config overrides;
``phase3-forkcell`` is Phase 3 with the public fork's context cell design in all three scales
(``HPCMConfig.cells``, hpcm_triton/rwkv/context_cell.py), not a model of its own.
"""
from __future__ import annotations

from ..models.config import MODEL_NAMES, PRESETS

BASELINE = "hpcm-base"
DEFAULT = ("hpcm-base", "phase1", "phase2", "phase3", "phase4")
# name → (named model, config overrides)
SWITCHED = {"phase3-forkcell": ("phase3", {"cells": ("rwkv-fork",) * 3})}
NAMES = tuple(MODEL_NAMES) + tuple(SWITCHED)


def resolve(name: str) -> tuple[str, dict]:
    """``(named model, config overrides)`` of a study variant."""
    if name in SWITCHED:
        model, overrides = SWITCHED[name]
        return model, dict(overrides)
    if name in PRESETS:
        return name, {}
    raise ValueError(f"unknown study variant {name!r}; choose from {', '.join(NAMES)}")


def pad_multiple(name: str) -> int:
    """The side multiple the variant pads images to (``HPCMConfig.pad_multiple``)."""
    model, overrides = resolve(name)
    return PRESETS[model].with_(**overrides).pad_multiple
