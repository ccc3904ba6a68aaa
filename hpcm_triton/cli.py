"""Command line: ``hpcm-triton`` / ``python -m hpcm_triton``.

Subcommands: demo (the default), compress, decompress, train, evaluate, info.
User errors (missing or unreadable files, corrupted or foreign bitstreams, bad checkpoints)
print one line on stderr and exit with status 2; outputs are written atomically, so a failed
command never leaves a partial file behind.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

from .train_args import ALL_MODELS

PROG = "hpcm-triton"
COMMANDS = ("demo", "compress", "decompress", "train", "evaluate", "info")
DEMO_DEFAULT_SIZE = "full"  # measured: all six variants on chelsea in ~2.5 min on the 2-core CPU
UNTRAINED_NOTE = ("NOTE: weights are UNTRAINED (seeded deterministically from parameter names; no trained "
                  "checkpoint ships), so bitrates and PSNR show the coding path works, not compression quality.")


class UserError(Exception):
    """A problem with the user's input: reported in one line, exit status 2."""


def _user_errors():
    from .entropy import BitstreamError
    from .models.official import CheckpointMismatchError

    return (UserError, BitstreamError, CheckpointMismatchError, ValueError, OSError)


def _check_output(path: str) -> Path:
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{path}: output directory {parent} does not exist")
    if p.is_dir():
        raise UserError(f"{path}: is a directory")
    return p


def _model(name: str, size: str, checkpoint: str | None, device: str = "cpu"):
    """(model, name): from a checkpoint, else the seeded untrained model at ``size``."""
    from .train import load_checkpoint, seeded_model

    if checkpoint:
        model, name, _ = load_checkpoint(checkpoint, name=name, device=device)
        return model, name
    return seeded_model(name, size).to(device), name.lower()


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    import torch
    from tqdm import tqdm

    from . import bitstream
    from . import images as im

    label, x = im.resolve_image(args.image)
    H, W = x.shape[-2:]
    print(f"hpcm-triton demo: image {label} ({H}×{W}), widths: {args.size} "
          f"({'official' if args.size == 'full' else 'TINY test widths'}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print(UNTRAINED_NOTE)
    out_dir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hpcm-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, ok = [], True
    t_start = time.perf_counter()
    for name in tqdm(args.models, desc="variants", file=sys.stderr, dynamic_ncols=True):
        model, _ = _model(name, args.size, None)
        with torch.no_grad():
            fwd = model(x)
        est_bits = sum(-torch.log2(v).sum().item() for v in fwd["likelihoods"].values())
        path = out_dir / f"{label.rsplit('.', 1)[0]}.{name}.hpcm"
        t0 = time.perf_counter()
        comp = model.compress(x)
        bitstream.write(path, name, model, comp)
        t1 = time.perf_counter()
        x_hat = bitstream.decode(path, model, name)
        t2 = time.perf_counter()
        exact = torch.equal(x_hat, fwd["x_hat"].clamp(0, 1))
        ok &= exact
        file_bytes = os.path.getsize(path)
        rows.append((name, _n_params(model), file_bytes, 8 * file_bytes / (H * W), est_bits / (H * W),
                     im.psnr(x, x_hat), t1 - t0, t2 - t1, "yes" if exact else "NO"))
    total = time.perf_counter() - t_start
    head = ("model", "params", "file bytes", "bpp (file)", "bpp (est.)", "PSNR dB", "enc s", "dec s", "exact decode")
    fmt = ("{}", "{:,}", "{:,}", "{:.4f}", "{:.4f}", "{:.2f}", "{:.2f}", "{:.2f}", "{}")
    cells = [head] + [tuple(f.format(v) for f, v in zip(fmt, r)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for j, c in enumerate(cells):
        print("  ".join(s.rjust(w) if i else s.ljust(w) for i, (s, w) in enumerate(zip(c, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print("bpp (file) counts every byte of the .hpcm file (header included); bpp (est.) is −Σlog2(likelihoods)/pixels.")
    print("enc s: compress + write the file; dec s: read + check fingerprints + decompress (wall time).")
    print("exact decode: decompress(file) == forward(x)['x_hat'].clamp(0, 1), bit for bit.")
    print(f"files in {out_dir}{'' if args.keep else ' (temporary)'}; total {total:.1f} s")
    if not args.keep:
        for p in out_dir.iterdir():
            p.unlink()
        out_dir.rmdir()
    if not ok:
        print(f"{PROG}: error: decoded image differs from the forward reconstruction", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- compress / decompress
def cmd_compress(args) -> int:
    from . import bitstream
    from . import images as im

    out = _check_output(args.output)
    _, x = im.resolve_image(args.input)  # a file, or a bundled photo name
    if min(x.shape[-2:]) < 64:
        raise UserError(f"{args.input}: image is {x.shape[-2]}×{x.shape[-1]}, the models need at least 64×64")
    model, name = _model(args.model, args.size, args.checkpoint, args.device)
    t0 = time.perf_counter()
    comp = model.compress(x.to(args.device))
    n = bitstream.write(out, name, model, comp)
    dt = time.perf_counter() - t0
    H, W = x.shape[-2:]
    print(f"{args.input} ({H}×{W}) → {out}: {n:,} bytes, {8 * n / (H * W):.4f} bpp, {name}"
          f"{'' if args.checkpoint else f' ({args.size}, untrained seeded weights)'}, {dt:.2f} s")
    return 0


def cmd_decompress(args) -> int:
    import torch

    from . import bitstream
    from . import images as im
    from .models.seeded import seeded_init_
    from .models.zoo import get_model

    out = _check_output(args.output)
    info = bitstream.read(args.input)
    if args.checkpoint:
        model, name = _model(info["model"], "full", args.checkpoint, args.device)
    else:
        name = info["model"]
        model = seeded_init_(get_model(name, **dataclasses.asdict(info["config"]))).to(args.device).eval()
        model.update(force=True)
    bitstream.check(info, model, name)
    t0 = time.perf_counter()
    with torch.no_grad():
        x_hat = model.decompress(info["strings"], info["shape"], image_size=info["image_size"])["x_hat"]
    dt = time.perf_counter() - t0
    im.save_image(x_hat.cpu(), out)
    H, W = info["image_size"]
    print(f"{args.input} → {out} ({H}×{W}), {name}, {dt:.2f} s")
    return 0


# ---------------------------------------------------------------- train / evaluate / info
def cmd_evaluate(args) -> int:
    from .evaluate import compare_files, evaluate

    if args.compare:
        res = compare_files(*args.compare)
        for metric, v in res["bd_rate"].items():
            print(f"BD-rate ({metric}) of {res['test']} vs {res['anchor']}: {v:+.2f} %")
        for n in res["notes"]:
            print(n)
        return 0
    res = evaluate(args.checkpoints or None, model_name=args.model, size=args.size, data=args.data,
                   out_dir=args.out, name=args.name, device=args.device, max_images=args.max_images,
                   anchor_files=args.anchor or ())
    if not args.checkpoints:
        print(UNTRAINED_NOTE)
    r = res["results"]
    cols = [("bpp", "bpp", "{:.4f}"), ("bpp-file", "bpp file", "{:.4f}"), ("psnr-rgb", "PSNR", "{:.2f}"),
            ("ms-ssim-rgb", "MS-SSIM", "{:.4f}"), ("encoding_time", "enc s", "{:.2f}"),
            ("decoding_time", "dec s", "{:.2f}")]
    cols = [c for c in cols if c[0] in r]
    print(f"{'point':<6} " + " ".join(f"{h:>8}" for _, h, _ in cols))
    for i in range(len(r["bpp"])):
        print(f"{i:<6} " + " ".join(f"{fmt.format(r[k][i]):>8}" for k, _, fmt in cols))
    for label, values in res["bd_rate"].items():
        print(f"BD-rate vs {label}: " + ", ".join(f"{m} {v:+.2f} %" for m, v in values.items()))
    for n in res["notes"]:
        print(f"note: {n}")
    print("wrote " + ", ".join(res["files"].values()))
    return 0


def cmd_info(args) -> int:
    import torch

    from .models.zoo import MODELS, get_model
    from .train import size_overrides

    print(f"hpcm-triton variants ({'official' if args.size == 'full' else 'TINY'} widths; parameter counts "
          f"computed by building each model, torch {torch.__version__})")
    rows = []
    for name, cls in MODELS.items():
        m = get_model(name, **size_overrides(args.size))
        rows.append((name, f"{_n_params(m):,}", ", ".join(m.config.rwkv_modules) or "none",
                     (cls.__doc__ or "").strip().splitlines()[0]))
        del m
    w = [max(len(r[i]) for r in rows + [("model", "params", "RWKV modules", "")]) for i in range(3)]
    print(f"{'model':<{w[0]}}  {'params':>{w[1]}}  {'RWKV modules':<{w[2]}}  description")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:<{w[2]}}  {r[3]}")
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__, train_args

    p = argparse.ArgumentParser(prog=PROG, description="HPCM learned image compression and its RWKV hybrids. "
                                "Without a subcommand, runs the demo.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")

    def common(sp, size_default="full", model=True):
        if model:
            sp.add_argument("--model", default="phase3", choices=ALL_MODELS, type=str.lower)
        sp.add_argument("--size", default=size_default, choices=("tiny", "full"),
                        help="tiny: small test widths (fast on CPU); full: the official widths")
        sp.add_argument("--device", default="cpu")

    d = sub.add_parser("demo", help="end-to-end run on a bundled photo, every variant (default command)")
    d.add_argument("--image", default="chelsea", help="a bundled photo name (chelsea, astronaut, coffee, rocket, "
                   "hubble, grace_hopper) or an image file")
    d.add_argument("--models", nargs="+", default=list(ALL_MODELS), choices=ALL_MODELS, type=str.lower)
    d.add_argument("--size", default=DEMO_DEFAULT_SIZE, choices=("tiny", "full"),
                   help=f"model widths (default {DEMO_DEFAULT_SIZE})")
    d.add_argument("--keep", metavar="DIR", help="keep the .hpcm files in DIR")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("compress", help="image file → .hpcm file")
    c.add_argument("input", help="an image file, or a bundled photo name (e.g. chelsea)")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--checkpoint", help="a training checkpoint or an official state_dict (else untrained seeded)")
    common(c)
    c.set_defaults(func=cmd_compress)

    x = sub.add_parser("decompress", help=".hpcm file → image file (PNG)")
    x.add_argument("input")
    x.add_argument("-o", "--output", required=True)
    x.add_argument("--checkpoint", help="the checkpoint that compressed the file (else the seeded model the "
                   "file names)")
    x.add_argument("--device", default="cpu")
    x.set_defaults(func=cmd_decompress)

    train_args.register(sub)  # train (and export): hpcm_triton/train_args.py

    e = sub.add_parser("evaluate", help="RD evaluation with real bitstreams (CompressAI results JSON, RD plot)")
    e.add_argument("checkpoints", nargs="*", help="checkpoints, one RD point each (none: the seeded untrained model)")
    e.add_argument("--model", default=None, choices=ALL_MODELS, type=str.lower,
                   help="the checkpoints' model: needed for official state_dicts, checked against training "
                        "checkpoints; without checkpoints the untrained model to evaluate (default phase3)")
    common(e, model=False)
    e.add_argument("--anchor", action="append", metavar="RESULTS.json",
                   help="also report BD-rates against this results file (repeatable)")
    e.add_argument("--compare", nargs=2, metavar=("TEST.json", "ANCHOR.json"),
                   help="only compute BD-rates (PSNR, MS-SSIM) of one results file against another")
    e.add_argument("--data", default=None, help="a folder of images (default: the bundled photos)")
    e.add_argument("--max-images", type=int, default=None)
    e.add_argument("--name", default=None)
    e.add_argument("--out", default="runs/eval")
    e.set_defaults(func=cmd_evaluate)

    i = sub.add_parser("info", help="variants, parameter counts, RWKV modules")
    i.add_argument("--size", default="full", choices=("tiny", "full"))
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "demo")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        msg = " ".join(str(e).split()) or e.__class__.__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
