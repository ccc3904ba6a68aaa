"""Command-line arguments of the training subcommands (``train``; ``export`` to come).

Kept free of torch imports so ``hpcm-triton --help`` answers without loading torch: each
subcommand imports its implementation only when it runs.
"""
from __future__ import annotations

ALL_MODELS = ("hpcm-base", "hpcm-large", "phase1", "phase2", "phase3", "phase4")


def cmd_train(args) -> int:
    from pathlib import Path

    from .train import load_dataset, seeded_model, train

    data = load_dataset(args.data)
    model = seeded_model(args.model, args.size)
    hist = train(model, data, lmbda=args.lmbda, steps=args.steps, batch_size=args.batch_size, crop=args.crop,
                 lr=args.lr, rwkv_lr=args.rwkv_lr, grad_clip=args.grad_clip, device=args.device, out_dir=args.out,
                 resume=args.resume, model_name=args.model, checkpoint_every=args.checkpoint_every, seed=args.seed)
    if hist["step"]:
        print(f"step {hist['step'][-1]}: loss {hist['loss'][-1]:.4f}, bpp {hist['bpp'][-1]:.4f}, "
              f"PSNR {hist['psnr'][-1]:.2f} dB")
    print(f"checkpoint: {Path(args.out) / 'checkpoint.pt'}; curves: {Path(args.out) / 'curves.png'}")
    return 0


def register(sub) -> None:
    """Add the training subcommands to ``sub`` (an argparse subparsers object)."""
    t = sub.add_parser("train", help="train a variant (λ·255²·MSE + bpp)")
    t.add_argument("--model", default="phase3", choices=ALL_MODELS, type=str.lower)
    t.add_argument("--size", default="full", choices=("tiny", "full"),
                   help="tiny: small test widths (fast on CPU); full: the official widths")
    t.add_argument("--device", default="cpu")
    t.add_argument("--lmbda", type=float, default=0.0067)
    t.add_argument("--data", default=None, help="a folder of images (default: the bundled photos)")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--crop", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--rwkv-lr", type=float, default=5e-5)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--out", default="runs/train")
    t.set_defaults(func=cmd_train)
