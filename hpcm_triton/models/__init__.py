"""The HPCM codec and its variants.

``config`` (no torch) loads eagerly; everything else on first use, so a .hpcm header can be read
and refused without importing torch. ``HPCM`` is reached through ``zoo``, so that the named
variants are registered (``HPCM.variants``) whenever the class is.
"""
import importlib

from .config import BASE, LARGE, MODEL_NAMES, PHASES, PRESETS, SIZES, TINY, HPCMConfig, size_overrides

__all__ = ["BASE", "LARGE", "MODEL_NAMES", "PHASES", "PRESETS", "SIZES", "TINY", "HPCMConfig", "size_overrides",
           "HPCM", "get_model", "seeded_model", "crop_centered", "pad_centered"]

_LAZY = {"HPCM": ".zoo", "get_model": ".zoo", "seeded_model": ".seeded", "crop_centered": ".hpcm",
         "pad_centered": ".hpcm"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
