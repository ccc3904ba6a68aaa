"""Command-line arguments of the training subcommands ``train`` and ``export``.

Kept free of torch imports so ``hpcm-triton --help`` answers without loading torch: each
subcommand imports its implementation only when it runs.

Every run-configuration option of ``train`` has ``default=None`` on the parser, so that the
trainer can tell an option the user gave from one left out: a fresh run fills the gaps from
:data:`DEFAULTS`, a resumed run from the checkpoint's saved configuration (and refuses a changed
λ, model or metric unless ``--override``).
"""
from __future__ import annotations

ALL_MODELS = ("hpcm-base", "hpcm-large", "phase1", "phase2", "phase3", "phase4")
METRICS = ("mse", "ms-ssim")
AMP = ("none", "bf16", "fp16")

# The run configuration and its defaults (SPEC §3: Adam 1e-4, grad-clip 1.0, 256² crops; the
# seed's RWKV learning rate 5e-5). A checkpoint stores the resolved dict under "run".
DEFAULTS = {
    "model": "phase3", "size": "full", "data": None, "val": None, "val_every": 1000, "val_crop": 0,
    "val_max_images": 0, "steps": 1000, "batch_size": 8, "crop": 256, "lmbda": 0.0067, "metric": "mse",
    "lr": 1e-4, "rwkv_lr": 5e-5, "milestones": [], "gamma": 0.1, "grad_clip": 1.0, "workers": 2,
    "amp": "none", "grad_checkpointing": False, "init_official": None, "freeze_inherited": 0,
    "checkpoint_every": 500, "log_every": 10, "seed": 0, "device": "cpu",
}
# Changing one of these on --resume changes what is being trained: refused unless --override.
IDENTITY = ("model", "size", "lmbda", "metric")


def _args_to_config(args) -> dict:
    """The options given on the command line (None = not given) as a config dict."""
    cfg = {k: getattr(args, k) for k in DEFAULTS}
    if args.milestones is not None:
        cfg["milestones"] = [int(s) for s in args.milestones]
    return cfg


def cmd_train(args) -> int:
    from .training.loop import run

    res = run(_args_to_config(args), out=args.out, resume=args.resume, override=args.override, force=args.force)
    if res["rank"] == 0:
        last = res["last"]
        if last:
            print(f"step {last['step']}: loss {last['loss']:.4f}, bpp {last['bpp']:.4f}, PSNR {last['psnr']:.2f} dB, "
                  f"skipped steps {res['skipped']}")
        if res.get("best_val") is not None:
            print(f"best validation loss {res['best_val']:.4f} (step {res['best_step']}): {res['best_path']}")
        print(f"checkpoint: {res['checkpoint']}; log: {res['log']}")
    return 0


def cmd_export(args) -> int:
    from .training.checkpoint import export_weights

    info = export_weights(args.checkpoint, args.output, force=args.force)
    print(f"{args.checkpoint} → {args.output}: {info['model']} weights with CDF tables "
          f"(step {info['step']}, λ {info['lmbda']}), {info['bytes']:,} bytes")
    return 0


def _ints(s: str) -> list:
    try:
        return [int(v) for v in s.replace(",", " ").split()] if s.strip() else []
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"expected comma-separated step numbers, got {s!r}") from None


def register(sub) -> None:
    """Add the training subcommands to ``sub`` (an argparse subparsers object)."""
    t = sub.add_parser("train", help="train a variant (λ·255²·MSE + bpp, or λ·(1 − MS-SSIM) + bpp); "
                       "torchrun --nproc_per_node=K runs it distributed",
                       description="Train a variant. Options left out take their defaults (shown), or on "
                       "--resume the values saved in the checkpoint.")
    d = DEFAULTS
    g = t.add_argument_group("model")
    g.add_argument("--model", default=None, choices=ALL_MODELS, type=str.lower, help=f"(default {d['model']})")
    g.add_argument("--size", default=None, choices=("tiny", "full"),
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
    t.set_defaults(func=cmd_train)

    x = sub.add_parser("export", help="training checkpoint → deployable weights with CDF tables")
    x.add_argument("checkpoint", help="a training checkpoint (RUN/best.pt or RUN/checkpoint.pt)")
    x.add_argument("-o", "--output", required=True)
    x.add_argument("--force", action="store_true", help="overwrite an existing output file")
    x.set_defaults(func=cmd_export)
