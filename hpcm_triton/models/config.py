"""One configuration describes every variant: HPCM-Base/Large and the RWKV Phases 1–4
(docs/architecture.md §5 has the phase table).

The variants differ only in which context cell each scale uses, which network fuses the
context between scales, and which spatial prior predicts the entropy parameters.

Torch-free: the command line and the ``.hpcm`` header reader import this module before (or
without) torch, so every constant they share with the models lives here.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

# The context cell designs a scale can use (``HPCMConfig.cells``):
#   "attention": HPCM's windowed cross-attention (docs/architecture.md §3);
#   "rwkv":      RWKVContextCell, receptance from the current context, keys/values from the
#                previous state (the phases' cell, docs/architecture.md §5);
#   "rwkv-fork": ConcatRWKVContextCell, the public fork's design: concatenate both streams,
#                conv1×1, one RWKV block, output conv1×1 (hpcm_triton/rwkv/context_cell.py).
# The choice lives in the existing ``cells`` field: a new field would enter every
# configuration's fingerprint (asdict) and so change it for files already written.
CELLS = ("attention", "rwkv", "rwkv-fork")
RWKV_CELLS = ("rwkv", "rwkv-fork")


@dataclass(frozen=True)
class HPCMConfig:
    M: int = 320                      # latent channels (multiple of 8: eight channel groups)
    N: int = 256                      # hyper-latent channels
    transform_widths: tuple = (96, 192, 384)
    ga_blocks: tuple = (2, 2, 4)      # PConvRBs per g_a stage, shallow → deep
    gs_blocks: tuple = (4, 2, 2)      # PConvRBs per g_s stage, deep → shallow
    prior_s1_s2_blocks: tuple = (2, 1)
    prior_s3_blocks: tuple = (3, 2)
    # context cell per scale, one of CELLS (below): "attention" (windowed cross-attention),
    # "rwkv" (this project's cross-stream RWKV cell) or "rwkv-fork" (the public fork's design)
    cells: tuple = ("attention", "attention", "attention")
    attention_windows: tuple = (4, 8, 8)
    attention_heads: int = 32
    rwkv_rates: tuple = (2, 3, 4)     # hidden_rate of the RWKV context cell per scale
    fusion: str = "conv"              # context_net between scales: "conv" (1×1) or "rwkv"
    prior: str = "dwconv"             # spatial priors: "dwconv" or "rwkv"
    # RWKV spatial priors (prior="rwkv"): RWKVFusionBlocks (before, after) the quant_step
    # modulation. The seed builds 2 + 1 for both; the public fork's s3 prior is 3 + 2
    # (FORK_PHASE4 below).
    rwkv_prior_s1_s2_blocks: tuple = (2, 1)
    rwkv_prior_s3_blocks: tuple = (2, 1)
    use_checkpoint: bool = False      # gradient checkpointing in every RWKV module

    def __post_init__(self):
        if self.M % 8 or self.M <= 0:
            raise ValueError(f"M must be a positive multiple of 8 (eight channel groups), got {self.M}")
        if len(self.cells) != 3 or any(c not in CELLS for c in self.cells):
            raise ValueError(f"cells must be three of {'/'.join(map(repr, CELLS))}, got {self.cells}")
        if self.fusion not in ("conv", "rwkv"):
            raise ValueError(f"fusion must be 'conv' or 'rwkv', got {self.fusion!r}")
        if self.prior not in ("dwconv", "rwkv"):
            raise ValueError(f"prior must be 'dwconv' or 'rwkv', got {self.prior!r}")
        for name in ("prior_s1_s2_blocks", "prior_s3_blocks", "rwkv_prior_s1_s2_blocks", "rwkv_prior_s3_blocks"):
            v = getattr(self, name)
            if len(v) != 2 or any(not isinstance(n, int) or n < 0 for n in v):
                raise ValueError(f"{name} must be two block counts (before, after the quant_step), got {v}")
        if "attention" in self.cells and (2 * self.M) % self.attention_heads:
            raise ValueError(f"2M = {2 * self.M} must be divisible by attention_heads = {self.attention_heads}")

    @property
    def pad_multiple(self) -> int:
        """Image sizes the schedule supports: y (1/16) must tile the s3 8×8 cells; windowed
        attention at s1/s2 (1/64, 1/32 of the image) needs 256 as the official release does."""
        if any(c == "attention" for c in self.cells[:2]):
            return 64 * max(self.attention_windows[0], self.attention_windows[1] // 2)
        if self.cells[2] == "attention":
            return max(128, 16 * self.attention_windows[2])
        return 128

    @property
    def rwkv_modules(self) -> tuple:
        """Top-level modules that are RWKV in this variant (in place of the official ones)."""
        flags = {"attn_s1": self.cells[0] in RWKV_CELLS, "attn_s2": self.cells[1] in RWKV_CELLS,
                 "attn_s3": self.cells[2] in RWKV_CELLS, "context_net": self.fusion == "rwkv",
                 "y_spatial_prior_s1_s2": self.prior == "rwkv", "y_spatial_prior_s3": self.prior == "rwkv"}
        return tuple(name for name, rwkv in flags.items() if rwkv)

    def with_(self, **kw) -> "HPCMConfig":
        return replace(self, **kw)

    @classmethod
    def json_fields(cls, d: dict) -> dict:
        """The config fields of a JSON-decoded dict (lists back to tuples); other keys are left out."""
        names = {f.name for f in fields(cls)}
        d = dict(d)
        if "rwkv_prior_blocks" in d:  # older configs had one field for both priors (n + 1 blocks)
            n = d.pop("rwkv_prior_blocks")
            d.setdefault("rwkv_prior_s1_s2_blocks", (n, 1))
            d.setdefault("rwkv_prior_s3_blocks", (n, 1))
        return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}


BASE = HPCMConfig()
LARGE = HPCMConfig(ga_blocks=(2, 2, 8), gs_blocks=(8, 2, 2), prior_s1_s2_blocks=(2, 2), prior_s3_blocks=(4, 3))
PHASES = {
    1: BASE.with_(cells=("attention", "attention", "rwkv")),
    2: BASE.with_(cells=("rwkv", "rwkv", "rwkv")),
    3: BASE.with_(cells=("rwkv", "rwkv", "rwkv"), fusion="rwkv"),
    4: BASE.with_(cells=("rwkv", "rwkv", "rwkv"), fusion="rwkv", prior="rwkv"),
}
# Phase 4 with the public fork's (yutendo0714/LIC-HPCM-LALIC) s3 prior layout, 3 + 2 blocks.
FORK_PHASE4 = PHASES[4].with_(rwkv_prior_s3_blocks=(3, 2))
PRESETS = {"hpcm-base": BASE, "hpcm-large": LARGE, **{f"phase{k}": v for k, v in PHASES.items()}}

# The variants by name, in the order the command line and the tables list them.
MODEL_NAMES = tuple(PRESETS)

# A small configuration for CPU tests and demos: same structure, narrow widths.
TINY = dict(M=32, N=32, transform_widths=(16, 24, 32), attention_heads=4)

# Width presets of the command line (``--size``): the TINY widths, or the official ones.
SIZES = ("tiny", "full")


def size_overrides(size: str) -> dict:
    """The config overrides of a ``--size`` preset: TINY's widths for "tiny", none for "full"."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    return dict(TINY) if size == "tiny" else {}


# The state_dict buffers that hold the rANS CDF tables (built by ``HPCM.update()``); their
# sizes change with the tables, so loading takes the checkpoint's sizes.
TABLE_BUFFERS = ("scale_table", "quantized_cdf_z", "cdf_length_z", "offset_z",
                 "quantized_cdf_y", "cdf_length_y", "offset_y")
