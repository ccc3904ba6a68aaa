"""Command-line options of ``hpcm-triton train`` and ``hpcm-triton export``: argparse only.

Torch-free, so ``hpcm-triton --help`` answers without loading torch. Every run-configuration
option of ``train`` has ``default=None`` on the parser, so that the trainer can tell an option
the user gave from one left out (see :mod:`hpcm_triton.training.config`).
"""
from __future__ import annotations

import argparse

from ..models.config import MODEL_NAMES, SIZES
from .config import AMP, DEFAULTS, METRICS


def to_config(args) -> dict:
    """The options given on the command line (None = not given) as a run-configuration dict."""
    cfg = {k: getattr(args, k) for k in DEFAULTS}
    if args.milestones is not None:
        cfg["milestones"] = [int(s) for s in args.milestones]
    return cfg


def _ints(s: str) -> list:
    try:
        return [int(v) for v in s.replace(",", " ").split()] if s.strip() else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step numbers, got {s!r}") from None


def register(sub, train, export) -> None:
    """Add the ``train`` and ``export`` subcommands to ``sub`` (an argparse subparsers object),
    run by the functions ``train(args)`` and ``export(args)``."""
    t = sub.add_parser("train", help="train a variant (λ·255²·MSE + bpp, or λ·(1 − MS-SSIM) + bpp); "
                       "torchrun --nproc_per_node=K runs it distributed",
                       description="Train a variant. Options left out take their defaults (shown), or on "
                       "--resume the values saved in the checkpoint.")
    d = DEFAULTS
    g = t.add_argument_group("model")
    g.add_argument("--model", default=None, choices=MODEL_NAMES, type=str.lower, help=f"(default {d['model']})")
    g.add_argument("--size", default=None, choices=SIZES,
                   help="tiny: small test widths (fast on CPU); full: the official widths (default full)")
    g.add_argument("--init-official", metavar="CKPT", default=None,
                   help="start from an official HPCM-Base/Large checkpoint (plain state_dict, {'state_dict': ...}, "
                   "'module.' prefixes all accepted): shared parts loaded, new RWKV parts designed-initialised")
    g.add_argument("--freeze-inherited", type=int, metavar="STEPS", default=None,
                   help="with --init-official: train only the new parts for the first STEPS steps (default 0)")
    g.add_argument("--grad-checkpointing", action="store_const", const=True, default=None,
                   help="recompute activations in backward (RWKV modules' use_checkpoint, and the transforms)")
    g = t.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="DIR",
                   help="training images, searched recursively (png/jpg/webp/ppm/...); default: the bundled photos")
    g.add_argument("--crop", type=int, default=None, help=f"random crop side, ≥ 64 (default {d['crop']})")
    g.add_argument("--batch-size", type=int, default=None, help=f"the GLOBAL batch over all processes "
                   f"(default {d['batch_size']})")
    g.add_argument("--workers", type=int, default=None, help=f"DataLoader workers per process (default {d['workers']})")
    g.add_argument("--val", default=None, metavar="DIR", help="validation images (default: the bundled photos)")
    g.add_argument("--val-every", type=int, default=None, help=f"validate every N steps, 0 = never "
                   f"(default {d['val_every']})")
    g.add_argument("--val-crop", type=int, default=None, help="centre-crop validation images to at most this side, "
                   "0 = whole images (default 0)")
    g.add_argument("--val-max-images", type=int, default=None, help="use the first N validation images, 0 = all")
    g = t.add_argument_group("optimisation")
    g.add_argument("--lmbda", type=float, default=None, help=f"λ of the RD loss, > 0 (default {d['lmbda']})")
    g.add_argument("--metric", default=None, choices=METRICS,
                   help="mse: λ·255²·MSE + bpp; ms-ssim: λ·(1 − MS-SSIM) "
                   "+ bpp (default mse)")
    g.add_argument("--steps", type=int, default=None, help=f"total optimizer steps (default {d['steps']})")
    g.add_argument("--lr", type=float, default=None, help=f"Adam learning rate of the inherited/base parts "
                   f"(default {d['lr']}); given on --resume, it replaces the saved one")
    g.add_argument("--rwkv-lr", type=float, default=None, help=f"learning rate of the RWKV parts "
                   f"(default {d['rwkv_lr']})")
    g.add_argument("--milestones", type=_ints, default=None, metavar="S1,S2,...",
                   help="MultiStepLR: multiply the learning rates by --gamma at these steps (default none)")
    g.add_argument("--gamma", type=float, default=None, help=f"MultiStepLR factor (default {d['gamma']})")
    g.add_argument("--grad-clip", type=float, default=None, help=f"max gradient norm, 0 = no clipping "
                   f"(default {d['grad_clip']})")
    g.add_argument("--amp", default=None, choices=AMP, help="autocast the transforms and RWKV blocks in bf16/fp16; "
                   "quantisation, likelihoods and the rate stay float32 (default none)")
    g.add_argument("--seed", type=int, default=None, help="model init, sample order, crops and noise (default 0)")
    g.add_argument("--device", default=None, help="cpu or cuda (under torchrun: each process its LOCAL_RANK GPU)")
    g = t.add_argument_group("run")
    g.add_argument("--out", default="runs/train", help="run directory: checkpoint.pt, best.pt, log.jsonl")
    g.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint.pt")
    g.add_argument("--override", action="store_true", help="on --resume, accept a changed λ, model, size or metric")
    g.add_argument("--force", action="store_true", help="start afresh in an OUT that already holds a run")
    g.add_argument("--checkpoint-every", type=int, default=None,
                   help=f"save OUT/checkpoint.pt every N steps (default {d['checkpoint_every']})")
    g.add_argument("--log-every", type=int, default=None, help=f"append a log.jsonl line every N steps "
                   f"(default {d['log_every']})")
    t.set_defaults(func=train)

    x = sub.add_parser("export", help="training checkpoint → deployable weights with CDF tables",
                       description="Write a training checkpoint's weights, configuration and CDF tables (no "
                       "optimizer or RNG state) to a file that --checkpoint and HPCM.from_checkpoint load.")
    x.add_argument("checkpoint", help="a training checkpoint (RUN/best.pt or RUN/checkpoint.pt)")
    x.add_argument("-o", "--output", required=True, help="the weights file to write (e.g. phase3_0067.pth)")
    x.add_argument("--force", action="store_true", help="overwrite an existing output file")
    x.set_defaults(func=export)
