from .config import BASE, FORK_PHASE4, LARGE, PHASES, PRESETS, TINY, HPCMConfig
from .hpcm import HPCM, crop_centered, pad_centered

__all__ = ["BASE", "FORK_PHASE4", "LARGE", "PHASES", "PRESETS", "TINY", "HPCMConfig", "HPCM", "crop_centered", "pad_centered"]
