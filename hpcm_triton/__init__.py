"""hpcm-triton: HPCM learned image compression and its RWKV hybrids (Phases 1–4).

>>> import torch, hpcm_triton
>>> model = hpcm_triton.get_model("phase3").eval()
>>> model.update()
>>> out = model.compress(torch.rand(1, 3, 256, 256))    # (B, 3, H, W) in [0, 1]
>>> x_hat = model.decompress(out)["x_hat"]

The names below load on first use, so ``hpcm-triton --help`` answers without importing torch.
The variants register with CompressAI (``compressai.zoo.image_models["phase3"]``, …) as soon as
both this package and compressai are imported, in either order.
"""
import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_LAZY = {
    "BitstreamError": ".entropy", "HPCMConfig": ".models.config",
    "CheckpointMismatchError": ".models.weights",
    **{n: ".models.zoo" for n in ("HPCM", "MODELS", "HPCM_Base", "HPCM_Large", "HPCM_Phase1", "HPCM_Phase2",
                                  "HPCM_Phase3", "HPCM_Phase4", "get_model", "param_groups")},
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


# ---------------------------------------------------------------- registration with CompressAI
_COMPRESSAI = "compressai"
_VARIANTS = __name__ + ".models.zoo"


def _register() -> None:
    """Import the variants, which registers them with CompressAI (models/zoo.py does it when it
    is first imported; while that import is what loads compressai, it does so when it finishes)."""
    if _VARIANTS in sys.modules:
        return
    try:
        importlib.import_module(_VARIANTS)
    except Exception as e:  # never break the caller's own import of compressai
        import warnings

        warnings.warn(f"hpcm_triton: could not register the variants with CompressAI ({e!r})", stacklevel=2)


class _AfterCompressai(importlib.abc.MetaPathFinder):
    """Runs :func:`_register` right after the compressai package is first imported (by anyone)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _COMPRESSAI:
            return None
        sys.meta_path.remove(self)  # find the real spec with the other finders
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


if _COMPRESSAI in sys.modules:
    _register()
elif not any(isinstance(f, _AfterCompressai) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterCompressai())
