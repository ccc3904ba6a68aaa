"""Command-line options of ``hpcm-triton study``: argparse only, torch-free.

A bad value ends in one line (``hpcm-triton: error: study: argument --X: ...``, exit 2) before
anything heavy is imported.
"""
from __future__ import annotations

import argparse
import re

from ..models.config import SIZES
from .variants import DEFAULT, NAMES

DEFAULT_RESOLUTIONS = {"cpu": ((256, 256), (512, 512), (768, 768), (1024, 1024)),
                       "cuda": ((256, 256), (512, 512), (1024, 1024), (1536, 1536), (2048, 2048), (2160, 3840))}
DEFAULT_PROBE_MAX = {"cpu": 4096, "cuda": 8192}
DEFAULT_LAMBDAS = (0.0018, 0.0035, 0.0067, 0.013)
MAX_SIDE = 16384
_UNITS = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


def resolution(text: str) -> tuple[int, int]:
    """``"512"`` → (512, 512); ``"2160x3840"`` (or ×) → (2160, 3840), height × width."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x×]\s*(\d+))?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a side (512) or a height×width (2160x3840)")
    h = int(m.group(1))
    w = int(m.group(2) or h)
    if not (64 <= h <= MAX_SIDE and 64 <= w <= MAX_SIDE):
        raise argparse.ArgumentTypeError(f"{text!r}: each side must be between 64 and {MAX_SIDE} pixels")
    return h, w


def memory_size(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"1.5g"`` → bytes (binary units; a bare number is bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)i?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size (e.g. 8G, 512M)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 2 ** 20:
        raise argparse.ArgumentTypeError(f"{text!r}: a memory limit below 1 MiB leaves nothing to run")
    return n


def _at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v}: must be at least {lo}")
        return v

    parse.__name__ = f"integer ≥ {lo}"
    return parse


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number")
    return v


def register(sub, study, formatter_class=argparse.HelpFormatter) -> None:
    """Add the ``study`` subcommand to ``sub`` (an argparse subparsers object), run by ``study(args)``."""
    s = sub.add_parser(
        "study", help="measure every variant (MACs, time, memory, largest image that fits; optionally RD at equal "
        "training) against the phase design's expected effects",
        description="Runs each variant in its own process over a list of image sizes and measures parameters, "
        "MACs per pixel, forward / training-step / compress / decompress time and peak memory, and (with "
        "--memory-limit) the largest image each variant trains on or decodes within that memory. Writes "
        "report.md, study.json and plots to --out and judges each of the phase design's expected effects "
        "(docs/architecture.md §5) from the numbers. docs/study.md describes the method.",
        formatter_class=formatter_class)
    g = s.add_argument_group("what to measure")
    g.add_argument("--variants", nargs="+", default=list(DEFAULT), choices=NAMES, type=str.lower,
                   metavar="VARIANT", help=f"study variants: {', '.join(NAMES)}")
    g.add_argument("--size", default="full", choices=SIZES, help="model widths: full (official) or tiny (test "
                   "widths; a smoke run, no claim can be judged)")
    g.add_argument("--resolutions", nargs="+", type=resolution, default=None, metavar="SIDE|HxW",
                   help="image sizes (default: CPU " + " ".join(f"{h}" for h, _ in DEFAULT_RESOLUTIONS["cpu"])
                   + "; CUDA 256 512 1024 1536 2048 2160x3840)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--threads", type=_at_least(1), default=None, help="CPU threads per worker (default: torch's)")
    g.add_argument("--repeats", type=_at_least(1), default=3, help="timed runs per measurement (the median is "
                   "reported)")
    g.add_argument("--warmup", type=_at_least(0), default=1, help="untimed runs before each timing")
    g.add_argument("--batch", type=_at_least(1), default=4, help="the largest batch tried for the second "
                   "training step (a batch that fits: halved until its estimated peak fits the memory budget)")
    g.add_argument("--memory-limit", type=memory_size, default=None, metavar="SIZE",
                   help="memory limit (e.g. 8G) for the largest-image search and the training batch; without it "
                   "the search is not run and the batch's budget is half the memory free at the start")
    g.add_argument("--probe-max", type=_at_least(64), default=None, metavar="SIDE",
                   help="the largest side the search tries (default: CPU 4096, CUDA 8192)")
    g.add_argument("--probe-step", type=_at_least(64), default=128, metavar="N",
                   help="the search's side granularity")
    g.add_argument("--breakdown", type=resolution, default=None, metavar="SIDE|HxW",
                   help="also time each module group (g_a, h_a, h_s, adaptors, spatial priors, attn_s1–3, "
                   "context_net, g_s, entropy coding) of forward, compress and decompress at this size")
    g.add_argument("--no-measure", action="store_true",
                   help="skip the per-size measurements (e.g. only --breakdown or --train)")
    g = s.add_argument_group("rate–distortion at equal training (--train)")
    g.add_argument("--train", type=_at_least(1), default=None, metavar="STEPS",
                   help="train each variant for STEPS steps per λ (same data, seed, schedule and shared "
                   "initialisation), evaluate on --heldout with real bitstreams, report BD-rates against hpcm-base")
    g.add_argument("--lambdas", nargs="+", type=_positive_float, default=list(DEFAULT_LAMBDAS), metavar="λ",
                   help="one RD point per λ (BD-rates need at least 4)")
    g.add_argument("--crop", type=_at_least(64), default=256, help="training crop side")
    g.add_argument("--train-batch", type=_at_least(1), default=8, help="training batch")
    g.add_argument("--train-data", default=None, metavar="DIR",
                   help="training images (default: four of the bundled photos)")
    g.add_argument("--heldout", default=None, metavar="DIR",
                   help="held-out evaluation images (default: the other two bundled photos, chelsea and coffee)")
    g.add_argument("--init-official", default=None, metavar="CKPT",
                   help="an official HPCM-Base checkpoint: every variant's shared parts start from it (default: "
                   "from one designed-initialised HPCM-Base, the same for all)")
    g.add_argument("--seed", type=_at_least(0), default=0, help="training seed (initialisation, crops, noise)")
    g.add_argument("--max-images", type=_at_least(1), default=None, help="evaluate at most this many images")
    g = s.add_argument_group("output")
    g.add_argument("--out", default="runs/study", help="folder for report.md, study.json and the plots")
    g.add_argument("--force", action="store_true", help="replace the files of an earlier study in --out")
    g.add_argument("--in-process", action="store_true",
                   help="run every measurement in this process instead of one process per variant and size "
                   "(faster to start; memory and timings then share one process)")
    s.set_defaults(func=study)


def to_options(args) -> dict:
    """The parsed options as the dict :func:`hpcm_triton.study.run.run_study` takes (defaults that depend
    on the device filled in)."""
    kind = "cuda" if str(args.device).startswith("cuda") else "cpu"
    return {"variants": list(dict.fromkeys(args.variants)), "size": args.size,
            "resolutions": [list(r) for r in (args.resolutions or DEFAULT_RESOLUTIONS[kind])],
            "device": args.device, "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
            "batch": args.batch, "memory_limit": args.memory_limit,
            "probe_max": args.probe_max or DEFAULT_PROBE_MAX[kind], "probe_step": args.probe_step,
            "breakdown": list(args.breakdown) if args.breakdown else None, "measure": not args.no_measure,
            "train": args.train, "lambdas": list(args.lambdas), "crop": args.crop, "train_batch": args.train_batch,
            "train_data": args.train_data, "heldout": args.heldout, "init_official": args.init_official,
            "seed": args.seed, "max_images": args.max_images, "out": args.out, "force": args.force,
            "isolate": not args.in_process}
