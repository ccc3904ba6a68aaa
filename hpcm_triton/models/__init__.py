from .config import BASE, LARGE, PHASES, PRESETS, TINY, HPCMConfig
from .hpcm import HPCM, crop_centered, pad_centered

__all__ = ["BASE", "LARGE", "PHASES", "PRESETS", "TINY", "HPCMConfig", "HPCM", "crop_centered", "pad_centered"]
