"""Training: data (``data``), checkpoints (``checkpoint``), the (distributed) loop (``loop``).

``hpcm-triton train`` → :func:`hpcm_triton.training.loop.run`; ``hpcm-triton export`` →
:func:`hpcm_triton.training.checkpoint.export_weights`.
"""
from .checkpoint import export_weights, load_checkpoint, official_state_dict, strip_module_prefix
from .loop import build_model, rd_loss, run, size_overrides, train, validate

__all__ = ["build_model", "export_weights", "load_checkpoint", "official_state_dict", "rd_loss", "run",
           "size_overrides", "strip_module_prefix", "train", "validate"]
