"""The HPCM codec and its configurations. ``config`` (no torch) loads eagerly; the model
classes on first use, so a .hpcm header can be read and refused without importing torch."""
import importlib

from .config import BASE, LARGE, PHASES, PRESETS, TINY, HPCMConfig

__all__ = ["BASE", "LARGE", "PHASES", "PRESETS", "TINY", "HPCMConfig", "HPCM", "crop_centered", "pad_centered"]


def __getattr__(name):
    if name in ("HPCM", "crop_centered", "pad_centered"):
        return getattr(importlib.import_module(".hpcm", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
