"""hpcm-triton: HPCM learned image compression and its RWKV hybrids (Phases 1–4).

>>> import hpcm_triton
>>> model = hpcm_triton.get_model("phase3").eval()
>>> model.update()
>>> out = model.compress(x)            # x: (B, 3, H, W) in [0, 1]
>>> x_hat = model.decompress(out)["x_hat"]
"""
from .entropy import BitstreamError
from .models import HPCM, HPCMConfig
from .models.official import CheckpointMismatchError
from .models.zoo import (MODELS, HPCM_Base, HPCM_Large, HPCM_Phase1, HPCM_Phase2, HPCM_Phase3, HPCM_Phase4, get_model,
                         param_groups)

__version__ = "0.1.0"
__all__ = ["BitstreamError", "CheckpointMismatchError", "HPCM", "HPCMConfig", "MODELS", "HPCM_Base", "HPCM_Large",
           "HPCM_Phase1", "HPCM_Phase2", "HPCM_Phase3", "HPCM_Phase4", "get_model", "param_groups"]
