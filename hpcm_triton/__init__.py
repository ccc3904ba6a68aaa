"""hpcm-triton: HPCM learned image compression and its RWKV hybrids (Phases 1–4).

>>> import hpcm_triton
>>> model = hpcm_triton.get_model("phase3").eval()
>>> model.update()
>>> out = model.compress(x)            # x: (B, 3, H, W) in [0, 1]
>>> x_hat = model.decompress(out)["x_hat"]

The names below load on first use, so ``hpcm-triton --help`` answers without importing torch.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "BitstreamError": ".entropy", "HPCM": ".models", "HPCMConfig": ".models",
    "CheckpointMismatchError": ".models.official",
    **{n: ".models.zoo" for n in ("MODELS", "HPCM_Base", "HPCM_Large", "HPCM_Phase1", "HPCM_Phase2", "HPCM_Phase3",
                                  "HPCM_Phase4", "get_model", "param_groups")},
}
__all__ = ["BitstreamError", "CheckpointMismatchError", "HPCM", "HPCMConfig", "MODELS", "HPCM_Base", "HPCM_Large",
           "HPCM_Phase1", "HPCM_Phase2", "HPCM_Phase3", "HPCM_Phase4", "get_model", "param_groups"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
