"""Training entry points and the checkpoint format (the implementation lives in
:mod:`hpcm_triton.training`).

``load_checkpoint``, ``seeded_model`` and ``size_overrides`` are used by the command line,
evaluation and the tests. ``seeded_model`` builds the golden files' deterministic weights
(SPEC §4): a fixture for tests and for untrained demos, never the start of a training run —
``train`` uses the modules' designed initialisation (:func:`hpcm_triton.training.build_model`).
"""
from __future__ import annotations

from .models.seeded import seeded_init_
from .models.zoo import get_model
from .training.checkpoint import export_weights, load_checkpoint, official_state_dict, strip_module_prefix
from .training.loop import SIZES, build_model, rd_loss, run, size_overrides, train, validate

__all__ = ["SIZES", "build_model", "export_weights", "load_checkpoint", "official_state_dict", "rd_loss", "run",
           "seeded_model", "size_overrides", "strip_module_prefix", "train", "validate"]


def seeded_model(name: str, size: str = "tiny", **overrides):
    """An untrained model whose weights depend only on parameter names (bit-identical in any
    process), eval mode, CDF tables built. A test/demo fixture: training never starts from it."""
    model = seeded_init_(get_model(name, **{**size_overrides(size), **overrides}))
    model.eval()
    model.update(force=True)
    return model
