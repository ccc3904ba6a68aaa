"""HPCM (Hierarchical Progressive Context Model) and its RWKV variants, as one codec class.

CompressAI's contract: ``forward(x) -> {"x_hat", "likelihoods"}``, ``compress(x) ->
{"strings", "shape", "image_size"}``, ``decompress(strings, shape) -> {"x_hat"}``, ``update()``.
The 11-step progressive schedule is written once (:meth:`HPCM._schedule`) and shared by
forward, compress and decompress, which differ only in how a step turns (scales, means) into
quantized latents: from y (forward, compress) or from the bitstream (decompress).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():  # compressai 1.2.8 scripts a few functions at import time
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
    from compressai.models import CompressionModel

from ..entropy import BitstreamError, CdfTables, DecodeSession, GeneralizedGaussian, default_scale_table, encode
from ..entropy.checks import flip_candidates
from ..entropy.ggm import is_default_scale_table, stored_y_tables
from ..layers import conv1x1
from . import masks, weights
from .coding import coding_path
from .config import BASE, TABLE_BUFFERS, HPCMConfig
from .modules import (CrossAttentionCell, DWConvSpatialPrior, analysis_transform, hyper_analysis, hyper_synthesis,
                      synthesis_transform)


# Channel groups per scale: each step codes one position per group, packed densely for rANS.
_GROUPS = {"s1": 2, "s2": 4, "s3": 8}


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


def _uniform_noise(x: torch.Tensor) -> torch.Tensor:
    return x + torch.empty_like(x).uniform_(-0.5, 0.5)


def pad_centered(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad H, W up to multiples of ``multiple``, centred (as the official test script does)."""
    h, w = x.shape[-2:]
    H, W = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    left, top = (W - w) // 2, (H - h) // 2
    return F.pad(x, (left, W - w - left, top, H - h - top))


def crop_centered(x: torch.Tensor, size) -> torch.Tensor:
    """Inverse of :func:`pad_centered`."""
    H, W = x.shape[-2:]
    h, w = size
    left, top = (W - w) // 2, (H - h) // 2
    return x[..., top:top + h, left:left + w]


class CodedShape(tuple):
    """``compress()["shape"]``: z's (h, w) as CompressAI expects, carrying the original image
    size in ``.image_size`` so that ``decompress(strings, shape)`` — CompressAI's call —
    returns exactly the size that was compressed. It is a plain 2-tuple to everything else
    (``.hpcm`` files store z's shape and the image size separately)."""

    image_size: tuple | None

    def __new__(cls, zh: int, zw: int, image_size=None):
        obj = super().__new__(cls, (int(zh), int(zw)))
        obj.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        return obj

    def __reduce__(self):
        return (CodedShape, (self[0], self[1], self.image_size))

    def __repr__(self):
        return f"CodedShape(z={tuple(self)}, image_size={self.image_size})"


class HPCM(CompressionModel):
    """A learned image codec: analysis/synthesis transforms, a hyperprior, and the HPCM
    progressive context model whose cells, fusion and priors are chosen by ``config``.

    Input images are (B, 3, H, W) in [0, 1], any H, W ≥ 64: they are padded (centred) to the
    multiple the schedule needs (``config.pad_multiple``) and cropped back.

    A ``compressai.models.CompressionModel``: ``update()``, ``aux_loss()``,
    ``load_state_dict()`` (CDF buffers of any size) and ``compress``/``decompress(strings,
    shape)`` behave as CompressAI's loops expect.
    """

    # The named variants (hpcm-base … phase4, models/zoo.py) register here by name when their
    # classes are defined; a variant class carries its name in ``variant``.
    variants: dict = {}
    variant: str | None = None

    def __init__(self, config: HPCMConfig = BASE, **overrides):
        super().__init__()
        cfg = config.with_(**overrides) if overrides else config
        self.config = cfg
        M, N = cfg.M, cfg.N
        self.M, self.N = M, N

        self.g_a = analysis_transform(M, cfg.transform_widths, cfg.ga_blocks)
        self.g_s = synthesis_transform(M, cfg.transform_widths, cfg.gs_blocks)
        self.h_a = hyper_analysis(M, N)
        self.h_s = hyper_synthesis(M, N)

        # z's entropy model: a learned per-channel mean and scale.
        self.means_hyper = nn.Parameter(torch.zeros(1, N, 1, 1))
        self.scales_hyper = nn.Parameter(torch.ones(1, N, 1, 1))
        self.entropy_estimation = GeneralizedGaussian()
        # Training's additive U(−½, ½) noise, x ↦ x + noise; None draws from torch's global RNG.
        # The trainer sets a per-sample generator here so the noise does not depend on how a
        # batch is split over processes.
        self.quantization_noise = None

        self.y_spatial_prior_adaptor_list_s1 = nn.ModuleList(conv1x1(3 * M, 3 * M) for _ in range(1))
        self.y_spatial_prior_adaptor_list_s2 = nn.ModuleList(conv1x1(3 * M, 3 * M) for _ in range(3))
        self.y_spatial_prior_adaptor_list_s3 = nn.ModuleList(conv1x1(3 * M, 3 * M) for _ in range(6))
        if cfg.prior == "dwconv":
            self.y_spatial_prior_s1_s2 = DWConvSpatialPrior(M, cfg.prior_s1_s2_blocks)
            self.y_spatial_prior_s3 = DWConvSpatialPrior(M, cfg.prior_s3_blocks)
        else:
            from ..rwkv import RWKVSpatialPrior

            (b1, a1), (b3, a3) = cfg.rwkv_prior_s1_s2_blocks, cfg.rwkv_prior_s3_blocks
            self.y_spatial_prior_s1_s2 = RWKVSpatialPrior(M, num_blocks=b1, num_post_blocks=a1,
                                                          use_checkpoint=cfg.use_checkpoint)
            self.y_spatial_prior_s3 = RWKVSpatialPrior(M, num_blocks=b3, num_post_blocks=a3,
                                                       use_checkpoint=cfg.use_checkpoint)
        # One per prior call after the first step (1 + 3 + 6); multiplies the prior's features.
        self.adaptive_params_list = nn.ParameterList(nn.Parameter(torch.ones(1, 3 * M, 1, 1)) for _ in range(10))

        self.attn_s1, self.attn_s2, self.attn_s3 = (self._context_cell(i) for i in range(3))
        if cfg.fusion == "conv":
            self.context_net = nn.ModuleList(conv1x1(2 * M, 2 * M) for _ in range(2))
        else:
            from ..rwkv import RWKVFusionNet

            self.context_net = nn.ModuleList(
                RWKVFusionNet(2 * M, num_blocks=1, hidden_rate=4, use_checkpoint=cfg.use_checkpoint) for _ in range(2))

        for name in TABLE_BUFFERS:
            self.register_buffer(name, torch.empty(0, dtype=torch.float32 if name == "scale_table" else torch.int32))
        self._tables = None  # CdfTables cache, rebuilt after update()/load
        # A test hook: decompress passes each step's (scale name, scales, means) through it and
        # decodes with what it returns (hpcm_triton.models.coding.perturbed_decoding).
        self.decoder_param_hook = None

    def _context_cell(self, scale: int) -> nn.Module:
        """The cell ``cfg.cells[scale]`` names (models/config.py ``CELLS``) at 2M channels."""
        cfg = self.config
        if cfg.cells[scale] == "attention":
            return CrossAttentionCell(2 * cfg.M, 2 * cfg.M, window_size=cfg.attention_windows[scale], kernel_size=1,
                                      num_heads=cfg.attention_heads)
        from ..rwkv import ConcatRWKVContextCell, RWKVContextCell

        design = RWKVContextCell if cfg.cells[scale] == "rwkv" else ConcatRWKVContextCell
        return design(2 * cfg.M, hidden_rate=cfg.rwkv_rates[scale], use_checkpoint=cfg.use_checkpoint)

    # ------------------------------------------------------------------ entropy tables
    def update(self, scale_table: torch.Tensor | None = None, force: bool = False,
               update_quantiles: bool = False) -> bool:
        """Build the rANS CDF tables (state_dict buffers). ``None`` = the official 60-scale table
        (not CompressAI's 64-scale default: the official bitstreams depend on it).

        Returns True if tables were (re)built; with ``force=False`` existing tables are kept
        (tables loaded from a checkpoint are authoritative: rebuilding them is this explicit
        call). y's tables for the official scale table are the stored ones
        (:func:`~hpcm_triton.entropy.ggm.stored_y_tables`), the same on every machine; z's are
        computed from ``scales_hyper`` with the official arithmetic.
        ``update_quantiles`` is CompressAI's argument for EntropyBottlenecks; HPCM has none.
        """
        if self.quantized_cdf_y.numel() and not force and scale_table is None:
            return False
        if scale_table is None:
            scale_table = default_scale_table()
        dev = self.scales_hyper.device
        self.scale_table = scale_table.detach().float().to(dev)
        cdf, length, offset = self.entropy_estimation.quantized_cdfs(self.scales_hyper.detach().view(-1))
        self.quantized_cdf_z, self.cdf_length_z, self.offset_z = cdf.to(dev), length.to(dev), offset.to(dev)
        if is_default_scale_table(self.scale_table):
            cdf, length, offset = stored_y_tables()
        else:
            cdf, length, offset = self.entropy_estimation.quantized_cdfs(self.scale_table)
        self.quantized_cdf_y, self.cdf_length_y, self.offset_y = cdf.to(dev), length.to(dev), offset.to(dev)
        self._tables = None
        return True

    def aux_loss(self) -> torch.Tensor:
        """CompressAI's auxiliary loss, for EntropyBottleneck quantiles. HPCM has no
        EntropyBottleneck (z's model is a learned mean and scale trained by the main loss), so
        this is a zero that supports ``.backward()``, and CompressAI's loops run unchanged."""
        return torch.zeros((), device=self.scales_hyper.device, requires_grad=True)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # CompressAI's override only resizes EntropyBottleneck/GaussianConditional buffers;
        # the CDF tables here are resized in _load_from_state_dict.
        return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)

    def _cdf_tables(self) -> dict:
        if not self.quantized_cdf_y.numel():
            raise RuntimeError("the entropy coder's tables are empty: call model.update() before compress/decompress")
        if self._tables is None:
            self._tables = {
                "z": CdfTables.from_tensors(self.quantized_cdf_z, self.cdf_length_z, self.offset_z),
                "y": CdfTables.from_tensors(self.quantized_cdf_y, self.cdf_length_y, self.offset_y),
            }
        return self._tables

    def _y_indexes(self, scales: torch.Tensor) -> torch.Tensor:
        # A scale's table index is the count of table entries (but the last) below it.
        table = self.scale_table[:-1].to(scales.device)
        return (scales.unsqueeze(-1) > table).sum(-1).int()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The CDF tables change size with update(); take the checkpoint's sizes (CompressAI's behaviour).
        for name in TABLE_BUFFERS:
            key = prefix + name
            if key in state_dict:
                cur = getattr(self, name)
                setattr(self, name, torch.empty_like(state_dict[key], dtype=cur.dtype, device=cur.device))
        self._tables = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ the schedule
    def _schedule(self, params: torch.Tensor, code_step):
        """Run HPCM's 11 coding steps on hyperprior output ``params`` (B, 2M, h, w).

        ``code_step(scale, scales, means, mask)`` codes one step and returns a tuple of masked
        tensors at that scale's resolution, the first being that step's ŷ; the tuples are
        summed over steps and carried up the scales. Returns the summed tuple at full size.
        """
        B, _, H, W = params.shape
        C, dt, dev = self.M, params.dtype, params.device
        scales_all, means_all = params.chunk(2, 1)
        adaptive = iter(self.adaptive_params_list)  # one per prior call, in schedule order

        def steps(scale, adaptors, prior, cell, mlist, acc, context_next):
            for i, mask in enumerate(mlist):
                # Official quirk (docs/architecture.md §4 a): adaptors[i - 1] at i = 0 is the scale's last adaptor.
                x = adaptors[i - 1](torch.cat((context_next, acc[0]), dim=1))
                context = prior(x, next(adaptive))
                context_next = cell(context, context_next)
                acc = tuple(a + n for a, n in zip(acc, code_step(scale, *context.chunk(2, 1), mask)))
            return acc, context_next

        def up_scale(acc, context_next, mlist, h, w, hyper, fusion):
            """Carry the sums and the context to the next scale; add its hyperprior; fuse."""
            acc = tuple(masks.upsample(t, mlist, h, w) for t in acc)
            context = torch.cat([masks.upsample(t, mlist, h, w) for t in context_next.chunk(2, 1)], dim=1)
            return acc, fusion(context + hyper)

        # ---- s1: quarter resolution, 2 steps; step 0 uses the hyperprior directly
        (scales_s1, _), full_s2, rec = masks.scale_views(scales_all)
        (means_s1, _), _, _ = masks.scale_views(means_all)
        context_next = torch.cat((scales_s1, means_s1), dim=1)
        mlist = masks.two_part(B, C, H // 4, W // 4, dt, dev)
        acc = code_step("s1", scales_s1, means_s1, mlist[0])
        acc, context_next = steps("s1", self.y_spatial_prior_adaptor_list_s1, self.y_spatial_prior_s1_s2,
                                  self.attn_s1, mlist[1:], acc, context_next)

        # ---- s2: half resolution, 3 more steps
        full_s1 = masks.s1_in_full(B, C, H, W, dt, dev)
        hyper = torch.cat([masks.s2_hyper(t, full_s1, full_s2, rec, H // 2, W // 2) for t in (scales_all, means_all)],
                          dim=1)
        acc, context_next = up_scale(acc, context_next, rec, H // 2, W // 2, hyper, self.context_net[0])
        acc, context_next = steps("s2", self.y_spatial_prior_adaptor_list_s2, self.y_spatial_prior_s1_s2,
                                  self.attn_s2, masks.four_part(B, C, H // 2, W // 2, dt, dev)[1:], acc, context_next)

        # ---- s3: full resolution, 6 more steps
        hyper = torch.cat([masks.s3_hyper(t, full_s2) for t in (scales_all, means_all)], dim=1)
        acc, context_next = up_scale(acc, context_next, full_s2, H, W, hyper, self.context_net[1])
        acc, _ = steps("s3", self.y_spatial_prior_adaptor_list_s3, self.y_spatial_prior_s3, self.attn_s3,
                       masks.eight_part(B, C, H, W, dt, dev)[2:], acc, context_next)
        return acc

    def _quantize_y(self, y: torch.Tensor, params: torch.Tensor, on_step=None):
        """The schedule driven by the real latent y; returns (ŷ, y − μ, scales)."""
        (y_s1, y_s2), _, _ = masks.scale_views(y)
        y_at = {"s1": y_s1, "s2": y_s2, "s3": y}
        rnd = _ste_round if self.training else torch.round

        def code_step(scale, scales, means, mask):
            means_hat, scales_hat = means * mask, scales * mask
            y_res = (y_at[scale] - means_hat) * mask
            y_q = rnd(y_res)
            if on_step is not None:
                on_step(scale, y_q, scales_hat)
            return y_q + means_hat, y_res, scales_hat

        return self._schedule(params, code_step)

    # ------------------------------------------------------------------ CompressAI contract
    def _check_input(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be a (B, 3, H, W) tensor, got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a float tensor in [0, 1], got {x.dtype}")
        if min(x.shape[-2:]) < 64:
            raise ValueError(f"images must be at least 64×64, got {x.shape[-2]}×{x.shape[-1]}")
        finite = torch.isfinite(x).all()
        if torch.compiler.is_compiling():   # a compiled graph cannot branch on values
            torch._assert_async(finite, "x contains NaN or inf")
        elif not finite:
            raise ValueError("x contains NaN or inf")

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous NCHW on every path: convolutions on channels-last tensors round
        # differently, and the decoder (which starts from z) must see the encoder's numbers.
        return pad_centered(x, self.config.pad_multiple).contiguous()

    def forward(self, x: torch.Tensor, training: bool | None = None) -> dict:
        """x (B, 3, H, W) → {"x_hat": (B, 3, H, W), "likelihoods": {"y", "z"}} (on the padded latents).

        ``training`` (default: ``self.training``) picks additive-noise likelihoods and
        straight-through rounding, as in the official training.
        """
        self._check_input(x)
        training = self.training if training is None else training
        size = x.shape[-2:]
        x = self._prepare(x)
        y = self.g_a(x)
        z = self.h_a(y)
        z_res = z - self.means_hyper
        add_noise = self.quantization_noise or _uniform_noise
        if training:
            z_hat = _ste_round(z_res) + self.means_hyper
            z_likelihoods = self.entropy_estimation(add_noise(z_res), self.scales_hyper)
        else:
            z_res_hat = torch.round(z_res)
            z_hat = z_res_hat + self.means_hyper
            z_likelihoods = self.entropy_estimation(z_res_hat, self.scales_hyper)
        params = self.h_s(z_hat)
        y_hat, y_res, scales = self._quantize_y(y, params)
        x_hat = crop_centered(self.g_s(y_hat), size)
        y_for_rate = add_noise(y_res) if training else torch.round(y_res)
        return {"x_hat": x_hat, "likelihoods": {"y": self.entropy_estimation(y_for_rate, scales), "z": z_likelihoods}}

    @torch.no_grad()
    @coding_path  # fixed thread count, kernels by shape alone: the decoder must see the same floats
    def compress(self, x: torch.Tensor) -> dict:
        """x (B, 3, H, W) → {"strings": [[y bytes]*B, [z bytes]*B], "shape": (zh, zw), "image_size": (H, W)}.

        ``shape`` is a :class:`CodedShape`: z's (h, w) that also carries (H, W), so CompressAI's
        ``decompress(out["strings"], out["shape"])`` gets back an H×W image.
        """
        self._check_input(x)
        tables = self._cdf_tables()
        size = tuple(x.shape[-2:])
        x = self._prepare(x)
        y = self.g_a(x)
        z = self.h_a(y)
        z_res_hat = torch.round(z - self.means_hyper)
        B = x.shape[0]
        z_idx = self._z_indexes(z_res_hat.shape)
        z_strings = [encode([(z_res_hat[b].cpu().numpy(), z_idx[b].cpu().numpy(), tables["z"])]) for b in range(B)]

        params = self.h_s(z_res_hat + self.means_hyper)
        chunks = [[] for _ in range(B)]

        def on_step(scale, y_q, scales_masked):
            g = _GROUPS[scale]
            sym = masks.combine_groups(y_q, g).int().cpu().numpy()
            idx = self._y_indexes(masks.combine_groups(scales_masked, g)).cpu().numpy()
            for b in range(B):
                chunks[b].append((sym[b], idx[b], tables["y"]))

        self._quantize_y(y, params, on_step)
        y_strings = [encode(c) for c in chunks]
        return {"strings": [y_strings, z_strings], "shape": CodedShape(*z.shape[-2:], image_size=size),
                "image_size": size}

    def _z_indexes(self, shape) -> torch.Tensor:
        B, C, h, w = shape
        return torch.arange(C, dtype=torch.int32).view(1, C, 1, 1).expand(B, C, h, w)

    @torch.no_grad()
    @coding_path
    def decompress(self, strings, shape=None, image_size=None) -> dict:
        """Decode ``strings`` (as returned by :meth:`compress`) into {"x_hat": (B, 3, H, W)}.

        ``shape`` is z's (h, w); ``image_size`` the original (H, W) to crop to (default:
        ``shape.image_size`` when ``shape`` came from :meth:`compress`, else the padded size).
        ``decompress(model.compress(x))`` also works. Raises
        :class:`~hpcm_triton.entropy.BitstreamError` for truncated, corrupted or foreign streams.

        Streams that carry per-step index checks (``compress``'s, and version-3 files') decode
        on any machine, thread count and Bi-WKV4 backend: a step whose CDF indexes miss the
        encoder's check has its flipped indexes repaired first (docs/bitstream.md §4), and
        ``"flips"`` lists, per image, how many were repaired at each y coding step.
        """
        if isinstance(strings, dict):
            strings, shape, image_size = strings["strings"], strings["shape"], strings.get("image_size")
        if not isinstance(strings, (list, tuple)) or len(strings) != 2 or len(strings[0]) != len(strings[1]):
            raise BitstreamError("strings must be [y_strings, z_strings], one bytes object per image in each")
        if image_size is None:
            image_size = getattr(shape, "image_size", None)
        if shape is None or len(shape) != 2 or min(shape) < 1:
            raise BitstreamError(f"shape must be z's (h, w), got {shape}")
        zh, zw = int(shape[0]), int(shape[1])
        mult = self.config.pad_multiple // 64
        if zh % mult or zw % mult:
            raise BitstreamError(f"shape {zh}×{zw} is not a z shape this model writes (multiples of {mult})")
        if image_size is not None and not (0 < image_size[0] <= 64 * zh and 0 < image_size[1] <= 64 * zw):
            raise BitstreamError(f"image_size {tuple(image_size)} does not fit z shape {zh}×{zw}")
        tables = self._cdf_tables()
        B = len(strings[0])
        dev = self.scales_hyper.device
        with DecodeSession(list(strings[1]), tables, label="z stream") as zdec:
            z_idx = self._z_indexes((1, self.N, zh, zw))
            z_res = torch.stack([torch.from_numpy(zdec.decode(b, "z", z_idx.numpy())).view(self.N, zh, zw)
                                 for b in range(B)]).to(dev, torch.float32)
            zdec.verify()
        params = self.h_s(z_res + self.means_hyper)
        boundaries = self.scale_table[:-1].detach().cpu().numpy()
        with DecodeSession(list(strings[0]), tables, label="y stream") as ydec:
            def code_step(scale, scales, means, mask):
                if self.decoder_param_hook is not None:
                    scales, means = self.decoder_param_hook(scale, scales, means)
                g = _GROUPS[scale]
                dense = masks.combine_groups(scales * mask, g)
                idx = self._y_indexes(dense).cpu().numpy()

                def candidates(b):  # only called for a step whose indexes miss the encoder's check
                    return lambda k: flip_candidates(dense[b].double().cpu().numpy(), boundaries, idx[b], k)

                sym = torch.stack([torch.from_numpy(ydec.decode(b, "y", idx[b], candidates(b))).view(idx.shape[1:])
                                   for b in range(B)]).to(dev, torch.float32)
                return ((torch.cat([sym] * g, dim=1) + means) * mask,)

            (y_hat,) = self._schedule(params, code_step)
            ydec.verify()
        x_hat = self.g_s(y_hat).clamp_(0, 1)
        if image_size is not None:
            x_hat = crop_centered(x_hat, image_size)
        return {"x_hat": x_hat, "flips": ydec.flips}

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_checkpoint(cls, path, device="cpu", name: str | None = None) -> "HPCM":
        """A ready model (eval mode, CDF tables built) from a training checkpoint, exported
        weights (``hpcm-triton export``) or an official state_dict (which needs ``name``, or a
        call on a variant class); the formats are described in :mod:`hpcm_triton.models.weights`.
        Called on a variant class (e.g. ``HPCM_Phase3``), a checkpoint of another variant is
        refused."""
        model, _, _ = weights.load_model(path, HPCM.variants, name=name or cls.variant, device=device)
        return model

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items() if getattr(BASE, k) != v) or "HPCM-Base"
