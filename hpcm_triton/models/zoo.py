"""Named variants: HPCM-Base/Large (weight-compatible with the official release) and Phases 1–4."""
from __future__ import annotations


from .config import BASE, LARGE, PHASES, HPCMConfig
from .hpcm import HPCM
from .official import load_official


class _Variant(HPCM):
    preset: HPCMConfig = BASE
    strict_official = True

    def __init__(self, **overrides):
        super().__init__(self.preset, **overrides)

    @classmethod
    def from_official_state_dict(cls, state_dict: dict, **overrides) -> "HPCM":
        """A ready (eval mode, CDF tables built) model from a state_dict with official key names.

        HPCM-Base/Large: every key must match (checkpoints without ``adaptive_params_list.*``
        get ones, with a warning). Phases: the parts shared with HPCM-Base load, the new RWKV
        parts keep their seeded initialisation; ``model.load_report`` lists both.
        Raises :class:`~hpcm_triton.models.official.CheckpointMismatchError` naming bad keys.
        """
        model = cls(**overrides)
        model.load_report = load_official(model, state_dict, strict_shared=cls.strict_official)
        model.eval()
        model.update()
        return model


class HPCM_Base(_Variant):
    """HPCM-Base (68.5 M parameters at the official widths)."""
    preset = BASE


class HPCM_Large(_Variant):
    """HPCM-Large: deeper transforms and priors (89.7 M parameters)."""
    preset = LARGE


def _phase(n: int, doc: str):
    return type(f"HPCM_Phase{n}", (_Variant,), {"preset": PHASES[n], "strict_official": False, "__doc__": doc})


HPCM_Phase1 = _phase(1, "Phase 1: RWKV context cell at s3 (rate 4); s1/s2 keep cross-attention.")
HPCM_Phase2 = _phase(2, "Phase 2: RWKV context cells at s1/s2/s3 (rates 2/3/4).")
HPCM_Phase3 = _phase(3, "Phase 3: Phase 2 + RWKVFusionNet between scales (context_net).")
HPCM_Phase4 = _phase(4, "Phase 4: Phase 3 + RWKV spatial priors.")

MODELS = {"hpcm-base": HPCM_Base, "hpcm-large": HPCM_Large, "phase1": HPCM_Phase1, "phase2": HPCM_Phase2,
          "phase3": HPCM_Phase3, "phase4": HPCM_Phase4}


def get_model(name: str, **overrides) -> HPCM:
    """Build a variant by name (``hpcm-base``, ``hpcm-large``, ``phase1`` … ``phase4``);
    keyword arguments override :class:`HPCMConfig` fields (e.g. small widths for tests)."""
    try:
        cls = MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
    return cls(**overrides)


def param_groups(model: HPCM, lr: float = 1e-4, rwkv_lr: float = 5e-5) -> list[dict]:
    """Optimizer groups the seed recommends: RWKV modules (context cells, RWKV fusion, RWKV
    priors) at ``rwkv_lr``, everything else at ``lr``."""
    rwkv = model.config.rwkv_modules
    slow, fast = [], []
    for name, p in model.named_parameters():
        (slow if name.split(".")[0] in rwkv else fast).append(p)
    groups = [{"params": fast, "lr": lr, "name": "base"}]
    if slow:
        groups.append({"params": slow, "lr": rwkv_lr, "name": "rwkv"})
    return groups
