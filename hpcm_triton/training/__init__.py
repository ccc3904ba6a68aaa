"""Training: the run configuration (``config``, torch-free), its command-line options
(``args``, argparse only), data (``data``), checkpoints (``checkpoint``) and the (distributed)
loop (``loop``). Submodules load on first use: importing this package imports no torch.

``hpcm-triton train`` → :func:`hpcm_triton.training.loop.run`; ``hpcm-triton export`` →
:func:`hpcm_triton.training.checkpoint.export_weights`.
"""
import importlib

_LAZY = {"run": ".loop", "train": ".loop", "validate": ".loop", "rd_loss": ".loop", "build_model": ".loop",
         "export_weights": ".checkpoint"}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
