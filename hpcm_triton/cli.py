"""Command line: ``hpcm-triton`` / ``python -m hpcm_triton``.

Subcommands: demo (the default), compress, decompress, train, export, evaluate, info.
User errors (missing or unreadable files, corrupted or foreign bitstreams, bad checkpoints,
bad arguments, images above ``--max-pixels``) print one line on stderr and exit with status 2;
outputs are checked before any work and written atomically, never over an existing file
without ``--force``, never over an input, and never over anything but a regular file. Ctrl-C
(SIGINT) or SIGTERM ends the whole command at once with status 130 (143), no traceback and no
partial file; the decode worker dies with it (``train`` first finishes its step and saves a
checkpoint). A reader that goes away (``hpcm-triton info f.hpcm | head``) ends the command
quietly, as it ends other Unix tools.

Only argparse and torch-free constants are imported up front: ``--help``, ``--version`` and
argument errors answer without loading torch.
"""
from __future__ import annotations

import argparse
import difflib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .defaults import BUNDLED_PHOTOS, DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES
from .models.config import MODEL_NAMES, SIZES
from .study import args as study_args
from .training import args as train_args

PROG = "hpcm-triton"
# What evaluate writes in --out (hpcm_triton/evaluate.py writes exactly these).
EVALUATE_OUTPUTS = ("results.json", "per_image.json", "bd_rate.json", "evaluate.log", "rd.png")
COMMANDS = ("demo", "compress", "decompress", "train", "export", "evaluate", "info")
DEMO_DEFAULT_SIZE = "full"  # measured: all six variants on chelsea in ~2.5 min on the 2-core CPU
UNTRAINED_NOTE = ("NOTE: weights are UNTRAINED (seeded deterministically from parameter names; no trained "
                  "checkpoint ships), so bitrates and PSNR show the coding path works, not compression quality.")


class UserError(Exception):
    """A problem with the user's input: reported in one line, exit status 2."""


def _is_user_error(e: BaseException) -> bool:
    """UserError, OSError, ValueError (BitstreamError, CheckpointMismatchError are ValueErrors)."""
    return isinstance(e, (UserError, ValueError, OSError))


def _note(msg: str) -> None:
    print(f"{PROG}: note: {msg}", file=sys.stderr)


def _check_output(path: str, force: bool = False, inputs=(), suffixes=None) -> Path:
    from .outputs import check_output

    return check_output(path, force=force, inputs=[i for i in inputs if i], suffixes=suffixes)


def _check_max_pixels(args) -> None:
    if args.max_pixels is not None and args.max_pixels < 1:
        raise UserError(f"--max-pixels {args.max_pixels}: must be positive")


def _write_hpcm(path: Path, name: str, model, comp: dict, force: bool) -> int:
    """Write a .hpcm file the command line's way: without ``force``, only as a new file."""
    from . import bitstream
    from .outputs import atomic_write_bytes

    data = bitstream.to_bytes(name, model, comp)
    atomic_write_bytes(path, data, exclusive=not force)
    return len(data)


def _check_device(device: str) -> str:
    """The device string, or a UserError for one that does not exist here."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device}: not a device name (cpu, cuda, cuda:1, …)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type != "cpu":
        raise UserError(f"--device {device}: only cpu and cuda are supported")
    return device


def _model(name: str | None, size: str, checkpoint: str | None, device: str = "cpu", config=None):
    """(model, name), ready to code: from ``checkpoint`` when given (the variant it holds, or
    ``name`` for an official state_dict), else the seeded untrained ``name`` (default phase3) at
    ``size`` or with ``config`` (a file's :class:`HPCMConfig`)."""
    if checkpoint:
        from .models.zoo import load_checkpoint

        if not Path(checkpoint).is_file():
            raise UserError(f"{checkpoint}: no such checkpoint file"
                            + (" (it is a directory)" if Path(checkpoint).is_dir() else ""))
        try:
            model, name, _ = load_checkpoint(checkpoint, name=name, device=device)
        except Exception as e:  # torch.load and load_state_dict raise anything on a foreign file
            if isinstance(e, (ValueError, OSError)):
                raise
            detail = " ".join(str(e).split())[:200]
            raise UserError(f"{checkpoint}: not a usable checkpoint for {name or 'this model'} "
                            f"({e.__class__.__name__}: {detail})") from None
        return model, name
    from .models.seeded import seeded_model

    name = (name or "phase3").lower()
    if config is not None:
        import dataclasses

        return seeded_model(name, "full", **dataclasses.asdict(config)).to(device), name
    return seeded_model(name, size).to(device), name


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    import tempfile

    import torch

    from . import bitstream
    from . import images as im
    from .outputs import check_output_folder, track, untrack
    from .progress import progress

    _check_device(args.device)
    _check_max_pixels(args)
    keep = check_output_folder(args.keep) if args.keep else None
    label, x = im.resolve_image(args.image, report=_note, max_pixels=args.max_pixels)
    stem = label.rsplit('.', 1)[0]
    if keep is not None and keep.is_dir():
        for name in args.models:
            _check_output(keep / f"{stem}.{name}.hpcm", args.force, [args.image])
    H, W = x.shape[-2:]
    print(f"hpcm-triton demo: image {label} ({H}×{W}, height×width), widths: {args.size} "
          f"({'official' if args.size == 'full' else 'TINY test widths'}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, device {args.device}")
    print(UNTRAINED_NOTE)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        out_dir = keep
    else:
        out_dir = Path(tempfile.mkdtemp(prefix="hpcm-demo-"))
        track(out_dir)
    rows, ok = [], True
    t_start = time.perf_counter()
    x = x.to(args.device)
    try:
        for name in progress(args.models, "variants"):
            model, _ = _model(name, args.size, None, args.device)
            with torch.no_grad():
                fwd = model(x)
            est_bits = sum(-torch.log2(v).sum().item() for v in fwd["likelihoods"].values())
            path = out_dir / f"{stem}.{name}.hpcm"
            t0 = time.perf_counter()
            comp = model.compress(x)
            _write_hpcm(path, name, model, comp, args.force)
            t1 = time.perf_counter()
            x_hat = bitstream.decode(path, model, name)
            t2 = time.perf_counter()
            exact = torch.equal(x_hat, fwd["x_hat"].clamp(0, 1))
            ok &= exact
            file_bytes = os.path.getsize(path)
            rows.append((name, _n_params(model), file_bytes, 8 * file_bytes / (H * W), est_bits / (H * W),
                         im.psnr(x.cpu(), x_hat.cpu()), t1 - t0, t2 - t1, "yes" if exact else "NO"))
    finally:
        if keep is None:
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)
            untrack(out_dir)
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
    print(f"files in {out_dir}{'' if keep is not None else ' (temporary, removed)'}; total {total:.1f} s")
    if not ok:
        print(f"{PROG}: error: decoded image differs from the forward reconstruction", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- compress / decompress
def _check_input_file(path: str, what: str = "file") -> None:
    from .outputs import input_kind

    why = input_kind(path)
    if why == "no such file":
        raise UserError(f"{path}: no such file (expected {what})")
    if why:
        raise UserError(f"{path}: {why}, expected {'an' if what[0] in 'aeiou.' else 'a'} {what}")


def cmd_compress(args) -> int:
    if os.path.lexists(args.input) or args.input not in BUNDLED_PHOTOS:
        _check_input_file(args.input, "image file")
    out = _check_output(args.output, args.force, [args.input])
    if args.threads is not None and not 1 <= args.threads <= 256:
        raise UserError(f"--threads {args.threads}: must be between 1 and 256")
    _check_max_pixels(args)
    _check_device(args.device)

    import torch

    from . import images as im

    # a file, or a bundled photo name; an image over --max-pixels is refused from its header
    _, x = im.resolve_image(args.input, report=_note, max_pixels=args.max_pixels)
    if min(x.shape[-2:]) < 64:
        raise UserError(f"{args.input}: image is {x.shape[-2]}×{x.shape[-1]} (height×width), the models need at "
                        "least 64×64")
    model, name = _model(args.model, args.size, args.checkpoint, args.device)
    t0 = time.perf_counter()
    comp = model.compress(x.to(args.device), threads=torch.get_num_threads() if args.threads is None else args.threads)
    n = _write_hpcm(out, name, model, comp, args.force)
    dt = time.perf_counter() - t0
    H, W = x.shape[-2:]
    print(f"{args.input} ({H}×{W}, height×width) → {out}: {n:,} bytes, {8 * n / (H * W):.4f} bpp, {name}"
          f"{'' if args.checkpoint else f' ({args.size}, untrained seeded weights)'}, "
          f"{comp['threads']} coding thread(s), {dt:.2f} s")
    return 0


def cmd_decompress(args) -> int:
    _check_input_file(args.input, ".hpcm file")
    out = _check_output(args.output, args.force, [args.input], suffixes=IMAGE_SUFFIXES)
    _check_max_pixels(args)
    from . import bitstream  # no torch yet: a hostile header is refused before ~0.9 GB of imports

    info = bitstream.read(args.input, max_pixels=args.max_pixels)
    if info["n_images"] != 1:
        raise UserError(f"{args.input}: holds {info['n_images']} images; the command line decodes files of one "
                        "(use hpcm_triton.bitstream.decode in Python)")
    _check_device(args.device)

    import torch

    from . import images as im

    model, name = _model(info["model"], "full", args.checkpoint, args.device,
                         config=None if args.checkpoint else info["config"])
    bitstream.check(info, model, name)
    threads = info.get("threads")
    if info["version"] < 3 and threads and threads > (os.cpu_count() or 1):
        _note(f"the file was encoded with {threads} CPU threads; decoding uses the same count (bit-exact "
              f"arithmetic needs it) on {os.cpu_count()} CPUs, which is slower")
    t0 = time.perf_counter()
    with torch.no_grad():
        dec = bitstream.decompress(info, model, details=True)
    dt = time.perf_counter() - t0
    im.save_image(dec["x_hat"].cpu(), out, exclusive=not args.force)
    H, W = info["image_size"]
    print(f"{args.input} → {out} ({H}×{W}, height×width, 8-bit RGB), {name}, {dt:.2f} s, "
          f"{bitstream.describe_flips(dec['flips'])}")
    return 0


# ---------------------------------------------------------------- train / export / evaluate / info
def cmd_train(args) -> int:
    from .training.loop import run

    res = run(train_args.to_config(args), out=args.out, resume=args.resume, override=args.override, force=args.force)
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
                   anchor_files=args.anchor or (), max_pixels=args.max_pixels, exclusive=not args.force)
    if not args.checkpoints:
        print(UNTRAINED_NOTE)
    r = res["results"]
    cols = [("bpp", "bpp", "{:.4f}"), ("bpp-file", "bpp file", "{:.4f}"), ("psnr-rgb", "PSNR", "{:.2f}"),
            ("ms-ssim-rgb", "MS-SSIM", "{:.4f}"), ("encoding_time", "enc s", "{:.2f}"),
            ("decoding_time", "dec s", "{:.2f}")]
    cols = [c for c in cols if c[0] in r]
    labels = [Path(c).name for c in args.checkpoints] or [res["name"]]
    w = max(len("point"), *map(len, labels))
    print(f"{'point':<{w}} " + " ".join(f"{h:>8}" for _, h, _ in cols))
    for i, label in enumerate(labels):
        print(f"{label:<{w}} " + " ".join(f"{fmt.format(r[k][i]):>8}" for k, _, fmt in cols))
    for label, values in res["bd_rate"].items():
        print(f"BD-rate vs {label}: " + ", ".join(f"{m} {v:+.2f} %" for m, v in values.items()))
    for n in res["notes"]:
        print(f"note: {n}")
    print("wrote " + ", ".join(res["files"].values()))
    return 0


def cmd_study(args) -> int:
    from .study import run_study

    res = run_study(study_args.to_options(args))
    for c in res["claims"]:
        print(f"{c['claim']} ({c['measure']}): {c['verdict']}")
    print("wrote " + ", ".join(res["files"].values()))
    return 0


def _check_evaluate_outputs(args) -> None:
    """evaluate writes EVALUATE_OUTPUTS in OUT: refuse to replace them
    without --force, and refuse an OUT that is an input (the data folder, a checkpoint)."""
    from .outputs import check_output_folder

    out = check_output_folder(args.out)
    inputs = [args.data, *(args.checkpoints or [])]
    for i in inputs:
        if i and Path(i).exists() and os.path.realpath(i) == os.path.realpath(out):
            raise UserError(f"--out {out}: is the input {i}; choose another folder")
    if out.is_dir():
        for f in EVALUATE_OUTPUTS:
            _check_output(out / f, args.force, inputs)
    _check_max_pixels(args)
    _check_device(args.device)


def cmd_info(args) -> int:
    if args.file:
        return _info_file(args)
    import torch

    from .models.config import size_overrides
    from .models.zoo import MODELS, get_model

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


def _info_file(args) -> int:
    """What a .hpcm file holds, from its header alone: no model is built."""
    _check_input_file(args.file, ".hpcm file")
    from . import bitstream

    info = bitstream.read(args.file, max_pixels=None)
    d = bitstream.describe_file(info)
    w = max(map(len, d))
    print(f"{args.file}:")
    for k, v in d.items():
        print(f"  {k:<{w}}  {v}")
    return 0


# ---------------------------------------------------------------- parser
class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, and no "(default: None)" noise."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``hpcm-triton: error: …`` and exit status 2."""

    def error(self, message):
        sub = self.prog[len(PROG):].strip()
        hint = f" (see {PROG}{' ' + sub if sub else ''} --help)"
        sys.stderr.write(f"{PROG}: error: {sub + ': ' if sub else ''}{message}{hint}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog=PROG, formatter_class=_Formatter,
                description="HPCM learned image compression and its RWKV hybrids. Without a subcommand, runs "
                            "the demo.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    def add(name, **kw):
        return sub.add_parser(name, formatter_class=_Formatter, **kw)

    def device(sp):
        sp.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda or cuda:N")

    def common(sp, size_default="full", model=True):
        if model:
            sp.add_argument("--model", default=None, choices=MODEL_NAMES, type=str.lower,
                            help="which variant (see `hpcm-triton info`); default: the checkpoint's own model "
                                 "(an official state_dict needs --model), else phase3")
        sp.add_argument("--size", default=size_default, choices=SIZES,
                        help="tiny: small test widths (fast on CPU); full: the official widths")
        device(sp)

    def max_pixels(sp, what):
        sp.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"refuse {what} more pixels than this, read from the header before any decoding "
                             "(bounds memory; 8K UHD by default)")

    def force(sp, what="the output file"):
        sp.add_argument("--force", action="store_true",
                        help=f"replace {what} if it exists (an input is never overwritten)")

    d = add("demo", help="end-to-end run on a bundled photo, every variant (default command)",
            description="Compress a photo with each variant into a real .hpcm file, decode it, and report "
                        "bpp, PSNR, times and whether the decode is exact.")
    d.add_argument("--image", default="chelsea", help=f"a bundled photo name ({', '.join(BUNDLED_PHOTOS)}) "
                   "or an image file")
    d.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES, type=str.lower,
                   help="the variants to run")
    d.add_argument("--size", default=DEMO_DEFAULT_SIZE, choices=SIZES,
                   help="model widths: tiny (test widths, fast) or full (official)")
    device(d)
    max_pixels(d, "an image with")
    d.add_argument("--keep", metavar="DIR", help="keep the .hpcm files in DIR (default: a temporary folder, "
                   "removed at the end)")
    force(d, "existing .hpcm files in --keep DIR")
    d.set_defaults(func=cmd_demo)

    c = add("compress", help="image file → .hpcm file",
            description="Compress an image (any bit depth and mode Pillow reads) into a .hpcm file.")
    c.add_argument("input", help="an image file, or a bundled photo name (e.g. chelsea)")
    c.add_argument("-o", "--output", required=True, help="the .hpcm file to write")
    c.add_argument("--checkpoint", help="a training checkpoint or an official state_dict (default: the "
                   "untrained seeded weights)")
    common(c)
    c.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the coding path, recorded in the file as information (any count "
                        "decodes it) (default: torch's, i.e. OMP_NUM_THREADS or the number of cores)")
    max_pixels(c, "an image with")
    force(c)
    c.set_defaults(func=cmd_compress)

    x = add("decompress", help=".hpcm file → image file (PNG)",
            description="Decode a .hpcm file into an image. The file's header is validated before any model "
                        "is built; a corrupted, truncated, foreign or hostile file ends in one line and exit 2.")
    x.add_argument("input", help="the .hpcm file")
    x.add_argument("-o", "--output", required=True, help="the image to write (format from the suffix, e.g. .png)")
    x.add_argument("--checkpoint", help="the checkpoint that compressed the file (default: the seeded model "
                   "the file names)")
    device(x)
    max_pixels(x, "a file whose images hold")
    force(x)
    x.set_defaults(func=cmd_decompress)

    train_args.register(sub, train=cmd_train, export=cmd_export)  # options: hpcm_triton/training/args.py

    e = add("evaluate", help="RD evaluation with real bitstreams (CompressAI results JSON, RD plot)")
    e.add_argument("checkpoints", nargs="*", help="checkpoints, one RD point each (none: the seeded untrained model)")
    e.add_argument("--model", default=None, choices=MODEL_NAMES, type=str.lower,
                   help="the checkpoints' model: needed for official state_dicts, checked against training "
                        "checkpoints; without checkpoints the untrained model to evaluate (default phase3)")
    common(e, model=False)
    e.add_argument("--anchor", action="append", metavar="RESULTS.json",
                   help="also report BD-rates against this results file (repeatable)")
    e.add_argument("--compare", nargs=2, metavar=("TEST.json", "ANCHOR.json"),
                   help="only compute BD-rates (PSNR, MS-SSIM) of one results file against another")
    e.add_argument("--data", default=None, help="a folder of images (default: the bundled photos)")
    e.add_argument("--max-images", type=int, default=None, help="evaluate at most this many images")
    max_pixels(e, "an image of --data with")
    e.add_argument("--name", default=None, help="the name in results.json (default: the model's)")
    e.add_argument("--out", default="runs/eval", help="folder for " + ", ".join(EVALUATE_OUTPUTS))
    force(e, "the files evaluate writes in --out (" + ", ".join(EVALUATE_OUTPUTS) + ")")
    e.set_defaults(func=cmd_evaluate)

    study_args.register(sub, study=cmd_study, formatter_class=_Formatter)  # options: hpcm_triton/study/args.py

    i = add("info", help="variants, parameter counts, RWKV modules; or what a .hpcm file holds",
            description="Without FILE: every variant's parameter count and RWKV modules. With FILE: what the "
                        ".hpcm file holds (variant, config, image size, stream sizes, fingerprints, encoder "
                        "environment), read from its header without building a model.")
    i.add_argument("file", nargs="?", help="a .hpcm file to describe")
    i.add_argument("--size", default="full", choices=SIZES, help="widths for the parameter counts")
    i.set_defaults(func=cmd_info)
    sub.metavar = "{" + ",".join(sub.choices) + "}"
    p.commands = tuple(sub.choices)
    return p


def _check_train_out(args) -> None:
    """train writes in OUT: a folder it can make or write, checked before the work."""
    from .outputs import check_output_folder

    check_output_folder(args.out)


PRECHECKS = {"evaluate": _check_evaluate_outputs, "train": _check_train_out}
# Commands whose own code handles interrupts (a training run saves a checkpoint): they get
# Python's default SIGINT behaviour and SIGTERM as outputs.Interrupted; main() turns either into
# exit 130 (143) and one line, without a traceback.
GRACEFUL = ("train", "export")


def _command(argv: list[str], commands=COMMANDS) -> list[str]:
    """argv with the default command made explicit; a word that is no command is an error."""
    if not argv:
        return ["demo"]
    first = argv[0]
    if first in commands or first in ("-h", "--help", "--version"):
        return argv
    if first.startswith("-"):
        return ["demo", *argv]
    close = difflib.get_close_matches(first, commands, n=1)
    raise UserError(f"unknown command {first!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                    + f"; commands: {', '.join(commands)}")


def _exit_on_signals() -> None:
    """Make SIGINT/SIGTERM end the process within a second, whatever the main thread is doing
    (a long convolution does not return to Python for seconds): block them in every thread
    and wait for them in one that removes partial outputs and exits 130 (SIGINT) or 143."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return
    sigs = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)

    def wait():
        sig = signal.sigwait(sigs)
        try:
            from .outputs import remove_pending

            remove_pending()
            sys.stdout.flush()
        finally:
            os.write(2, f"{PROG}: interrupted\n".encode())
            os._exit(130 if sig == signal.SIGINT else 143)

    threading.Thread(target=wait, name="hpcm-signals", daemon=True).start()


def _announce_kernel_builds() -> None:
    """The first Bi-WKV4 call on a machine compiles the CPU kernels (several seconds, once):
    say so on stderr rather than pause silently."""
    import logging

    log = logging.getLogger("kernels_cpu")
    if not any(getattr(h, "_hpcm", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
        h._hpcm = True
        log.addHandler(h)
        log.setLevel(logging.INFO)


def _terminate_as_interrupt() -> None:
    """For the GRACEFUL commands: SIGTERM raises Interrupted as Ctrl-C raises KeyboardInterrupt,
    so that their own handlers and clean-ups run (the training loop installs its own)."""
    from .outputs import Interrupted

    def handler(signum, _frame):
        raise Interrupted(signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _reader_gone() -> bool:
    """Whether standard output is a pipe or socket whose reader has gone (poll reports an error
    or hang-up; where poll is missing, assumed)."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


def main(argv: list[str] | None = None) -> int:
    """The command line. Called without ``argv`` (as the program), interrupts end the process
    directly (see :func:`_exit_on_signals`; ``train`` and ``export`` get SIGTERM as an exception,
    like Ctrl-C); called with ``argv`` (tests, scripts), Ctrl-C raises KeyboardInterrupt inside
    and returns 130."""
    as_program = argv is None
    argv = sys.argv[1:] if as_program else argv
    try:
        parser = build_parser()
        args = parser.parse_args(_command(list(argv), parser.commands))
        if as_program:
            if args.command in GRACEFUL:
                _terminate_as_interrupt()
            else:
                _exit_on_signals()
        check = PRECHECKS.get(args.command)
        if check is not None:
            check(args)
        _announce_kernel_builds()
        rc = args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, not in the interpreter's last flush
        return rc
    except KeyboardInterrupt as e:  # Ctrl-C, or Interrupted: SIGTERM, or a training run that saved and stopped
        print(f"{PROG}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except BrokenPipeError as e:
        if not _reader_gone():
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        if as_program:  # nowhere to write the rest: let the interpreter's last flush go to /dev/null
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE  # quietly, with the status of a Unix tool that SIGPIPE ended
    except Exception as e:
        if not _is_user_error(e):
            raise
        msg = " ".join(str(e).split()) or e.__class__.__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
