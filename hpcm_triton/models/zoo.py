"""Named variants: HPCM-Base/Large (weight-compatible with the official release) and Phases 1–4,
and their registration in CompressAI's registries."""
from __future__ import annotations

from .config import BASE, LARGE, PHASES, HPCMConfig
from .hpcm import HPCM
from .weights import load_model, load_official, unwrap_state_dict


class _Variant(HPCM):
    """A named variant: a class per entry of ``config.PRESETS``, registered in ``HPCM.variants``."""

    preset: HPCMConfig = BASE
    strict_official = True

    def __init_subclass__(cls, variant: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if variant is not None:
            cls.variant = variant
            HPCM.variants[variant] = cls

    def __init__(self, **overrides):
        super().__init__(self.preset, **overrides)

    @classmethod
    def from_official_state_dict(cls, state_dict: dict, **overrides) -> "HPCM":
        """A ready (eval mode, CDF tables built) model from a state_dict with official key names.

        HPCM-Base/Large: every key must match (checkpoints without ``adaptive_params_list.*``
        get ones, with a warning). Phases: the parts shared with HPCM-Base load, the new RWKV
        parts keep their initialisation; ``model.load_report`` lists both. Wrappers and
        ``module.`` prefixes are accepted (:func:`~hpcm_triton.models.weights.unwrap_state_dict`).
        Raises :class:`~hpcm_triton.models.weights.CheckpointMismatchError` naming bad keys.
        """
        model = cls(**overrides)
        model.load_report = load_official(model, unwrap_state_dict(state_dict), strict_shared=cls.strict_official)
        model.eval()
        model.update()
        return model

    @classmethod
    def from_state_dict(cls, state_dict: dict, **overrides) -> "HPCM":
        """CompressAI's constructor from weights (``compressai.zoo``, ``eval_model checkpoint``):
        a ready model from a state_dict with official key names, at the widths the state_dict
        has. M, N and the transform widths are read from its shapes; other config fields are
        the preset's unless given as ``overrides``. Wrappers and ``module.`` prefixes are
        accepted as :func:`~hpcm_triton.models.weights.unwrap_state_dict` describes."""
        sd = unwrap_state_dict(state_dict)
        inferred = {}
        try:
            widths = tuple(int(sd[f"g_a.branch.{i}.weight"].shape[0]) for i in _ga_down_indices(sd))
            inferred = {"M": widths[-1], "N": int(sd["means_hyper"].shape[1]), "transform_widths": widths[:-1]}
        except (KeyError, IndexError, AttributeError):
            pass  # let load_official name the missing/mismatched keys
        if inferred and "attention_heads" not in overrides:
            heads = cls.preset.attention_heads
            while (2 * inferred["M"]) % heads:
                heads //= 2
            if heads != cls.preset.attention_heads:
                inferred["attention_heads"] = heads
        return cls.from_official_state_dict(sd, **{**inferred, **overrides})


def _ga_down_indices(sd: dict) -> list:
    """Indices of g_a's four down-sampling convs: the layers with a 4-D ``weight`` directly
    under ``g_a.branch`` (the PConvRBs have nested parameters)."""
    idx = sorted({int(k.split(".")[2]) for k in sd if k.startswith("g_a.branch.") and k.count(".") == 3
                  and k.endswith(".weight")})
    if len(idx) != 4:
        raise KeyError("g_a.branch.*.weight")
    return idx


class HPCM_Base(_Variant, variant="hpcm-base"):
    """HPCM-Base (68.5 M parameters at the official widths)."""
    preset = BASE


class HPCM_Large(_Variant, variant="hpcm-large"):
    """HPCM-Large: deeper transforms and priors (89.7 M parameters)."""
    preset = LARGE


class _Phase(_Variant):
    strict_official = False  # an official checkpoint fills the shared parts; the RWKV parts are new


class HPCM_Phase1(_Phase, variant="phase1"):
    """Phase 1: RWKV context cell at s3 (rate 4); s1/s2 keep cross-attention."""
    preset = PHASES[1]


class HPCM_Phase2(_Phase, variant="phase2"):
    """Phase 2: RWKV context cells at s1/s2/s3 (rates 2/3/4)."""
    preset = PHASES[2]


class HPCM_Phase3(_Phase, variant="phase3"):
    """Phase 3: Phase 2 + RWKVFusionNet between scales (context_net)."""
    preset = PHASES[3]


class HPCM_Phase4(_Phase, variant="phase4"):
    """Phase 4: Phase 3 + RWKV spatial priors."""
    preset = PHASES[4]


# Variant name → class, in the order of config.MODEL_NAMES (the registry HPCM.variants itself).
MODELS = HPCM.variants


def get_model(name: str, **overrides) -> HPCM:
    """Build a variant by name (``hpcm-base``, ``hpcm-large``, ``phase1`` … ``phase4``);
    keyword arguments override :class:`HPCMConfig` fields (e.g. small widths for tests)."""
    try:
        cls = MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
    return cls(**overrides)


def load_checkpoint(path, name: str | None = None, device="cpu", *, fallback_name: str | None = None):
    """``(model, variant name, loaded dict)`` from a checkpoint of any format
    (:func:`hpcm_triton.models.weights.load_model` with the registered variants): what the
    command line, evaluation and training use to read weights."""
    return load_model(path, MODELS, name, device, fallback_name=fallback_name)


def param_groups(model: HPCM, lr: float = 1e-4, rwkv_lr: float = 5e-5) -> list[dict]:
    """Optimizer groups recommended for fine-tuning a phase (docs/architecture.md §5): the RWKV
    modules (context cells, RWKV fusion, RWKV priors) at ``rwkv_lr``, everything else at ``lr``."""
    rwkv = model.config.rwkv_modules
    slow, fast = [], []
    for name, p in model.named_parameters():
        (slow if name.split(".")[0] in rwkv else fast).append(p)
    groups = [{"params": fast, "lr": lr, "name": "base"}]
    if slow:
        groups.append({"params": slow, "lr": rwkv_lr, "name": "rwkv"})
    return groups


# ---------------------------------------------------------------- CompressAI's registries
def register_compressai() -> bool:
    """Register the six variants under their names (``hpcm-base`` … ``phase4``) in
    compressai 1.2.8's registries: ``compressai.registry.MODELS`` (``register_model``),
    ``compressai.zoo.image.model_architectures`` (what ``eval_model checkpoint -a NAME`` builds
    with ``from_state_dict``), and ``compressai.zoo.image_models`` / ``compressai.zoo.models``
    (factories ``f(quality, metric="mse", pretrained=False)``; no pretrained weights ship, so
    ``pretrained=True`` raises). Runs when this module is imported, which ``import hpcm_triton``
    arranges as soon as compressai's zoo is loaded (``hpcm_triton/__init__.py``)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
        import compressai.zoo
        import compressai.zoo.image
        from compressai.registry import MODELS as REGISTRY, register_model
    for name, cls in MODELS.items():
        if REGISTRY.get(name) is not cls:
            register_model(name)(cls)
        compressai.zoo.image.model_architectures[name] = cls
        factory = _zoo_factory(name, cls)
        compressai.zoo.image_models[name] = factory
        compressai.zoo.models[name] = factory
    return True


def _zoo_factory(name: str, cls):
    def factory(quality: int = 1, metric: str = "mse", pretrained: bool = False, progress: bool = True, **kwargs):
        if pretrained:
            raise ValueError(f"no pretrained weights ship for {name!r} (hpcm-triton has no trained checkpoint); "
                             f"build it untrained, or load official weights with {cls.__name__}.from_state_dict")
        return cls(**kwargs)

    factory.__name__ = name.replace("-", "_")
    factory.__doc__ = f"{cls.__name__} in CompressAI's zoo convention (quality/metric ignored: one model per λ)."
    return factory


register_compressai()
