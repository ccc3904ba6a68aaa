"""Rate–distortion at equal training (``hpcm-triton study --train STEPS``).

Every variant is trained by the project's trainer (:func:`hpcm_triton.training.train`) once per λ
with the same data, seed, schedule (steps, batch, crop, learning rates) and initialisation of
the parts it shares with HPCM-Base: those come from one HPCM-Base state_dict through the
trainer's ``init_official`` path, either an official checkpoint (``--init-official``) or, without
one, a designed-initialised HPCM-Base built under the seed and saved for the purpose, so that
every variant starts its shared parts from the same numbers. Each variant's checkpoints are then
evaluated by :func:`hpcm_triton.evaluate.evaluate` on the held-out images, with real ``.hpcm``
files (bpp from the streams, PSNR, MS-SSIM), and compared with HPCM-Base's curve by
:func:`hpcm_triton.evaluate.bd_rates` (BD-rate) and by BD-PSNR (:func:`bd_psnr`, the same akima
interpolation).

A study variant with config overrides (``phase3-forkcell``) is not trained: the trainer builds
named models only, and a ``.hpcm`` file holds each named model to its own cells; the result says
so instead of a curve.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch

from .. import images as im
from ..evaluate import bd_rates, evaluate
from ..models.config import size_overrides
from ..models.zoo import get_model
from ..training import train
from . import variants

HELDOUT_PHOTOS = ("chelsea", "coffee")
SHARED_INIT = "shared_init_hpcm-base.pt"


def prepare_data(train_data, heldout, folder: Path) -> tuple[str, str, str]:
    """(training folder, held-out folder, description). Without folders: the bundled photos,
    split into four for training and :data:`HELDOUT_PHOTOS` held out, written as PNGs."""
    if train_data and heldout:
        return str(train_data), str(heldout), f"training images from {train_data}, held-out images from {heldout}"
    names = im.bundled_names()
    held = [n for n in names if n in HELDOUT_PHOTOS]
    rest = [n for n in names if n not in HELDOUT_PHOTOS]
    out = []
    for sub, given, pick in (("train", train_data, rest), ("heldout", heldout, held)):
        if given:
            out.append(str(given))
            continue
        d = folder / sub
        d.mkdir(parents=True, exist_ok=True)
        for n in pick:
            if not (d / f"{n}.png").exists():
                im.save_image(im.bundled(n), d / f"{n}.png")
        out.append(str(d))
    what = (f"training: {train_data or 'bundled ' + ', '.join(rest)}; held out: "
            f"{heldout or 'bundled ' + ', '.join(held)}")
    return out[0], out[1], what


def shared_init(size: str, seed: int, init_official, folder: Path) -> tuple[str, str]:
    """(state_dict path, description) the shared parts of every variant start from."""
    if init_official:
        return str(init_official), f"official checkpoint {init_official}"
    torch.manual_seed(seed)
    base = get_model(variants.BASELINE, **size_overrides(size))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SHARED_INIT
    torch.save(base.state_dict(), path)
    return str(path), f"one designed-initialised HPCM-Base (seed {seed}), saved as {path.name}"


def bd_psnr(anchor: dict, test: dict) -> tuple[float | None, str]:
    """BD-PSNR (dB) of results ``test`` against results ``anchor`` (akima), or (None, why not)."""
    a, t = (sorted(zip(r.get("bpp", []), r.get("psnr-rgb", []))) for r in (anchor, test))
    if len(a) < 4 or len(t) < 4:
        return None, f"BD-PSNR needs at least 4 RD points on each curve, got {len(t)} (test) and {len(a)} (anchor)"
    try:
        import bjontegaard as bd
    except ImportError:
        return None, "the 'bjontegaard' package is not installed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            v = bd.bd_psnr([p[0] for p in a], [p[1] for p in a], [p[0] for p in t], [p[1] for p in t],
                           method="akima", require_matching_points=False)
        except Exception as e:  # bjontegaard raises on curves it cannot interpolate
            return None, f"BD-PSNR: {e.__class__.__name__}: {e}"
    v = float(v)
    return (v, "") if math.isfinite(v) else (None, "BD-PSNR is not finite")


def compare(test: dict, anchor: dict) -> dict:
    """BD-rates (PSNR, MS-SSIM; %) and BD-PSNR (dB) of ``test`` against ``anchor``, with notes."""
    rates, notes = bd_rates(test, anchor)
    psnr, why = bd_psnr(anchor, test)
    if why:
        notes.append(why)
    return {"rate_psnr_pct": rates.get("psnr"), "rate_msssim_pct": rates.get("ms-ssim"), "psnr_db": psnr,
            "notes": notes}


def run_rd(opts: dict, folder: Path, say=print) -> dict:
    """Train and evaluate every variant of ``opts`` (see :mod:`hpcm_triton.study.args`); the runs,
    checkpoints and evaluation files go under ``folder``. Returns the study's ``rd`` section."""
    steps, lambdas = opts["train"], list(opts["lambdas"])
    train_dir, held_dir, data_label = prepare_data(opts.get("train_data"), opts.get("heldout"), folder / "data")
    init_path, init_label = shared_init(opts["size"], opts["seed"], opts.get("init_official"), folder / "runs")
    rd = {"size": opts["size"], "steps": steps, "lambdas": lambdas, "crop": opts["crop"],
          "batch_size": opts["train_batch"], "seed": opts["seed"], "data": data_label, "init": init_label,
          "schedule": "the trainer's defaults: Adam, lr 1e-4 (inherited parts) / 5e-5 (RWKV parts), gradient "
                      "clipping 1.0, no milestones", "variants": {}, "bd": {}}
    for variant in opts["variants"]:
        name, overrides = variants.resolve(variant)
        entry = {"model": name, "overrides": overrides, "training": [], "results": None, "error": None}
        rd["variants"][variant] = entry
        if overrides:
            entry["error"] = ("not trained: the trainer builds named models only (no config overrides), and a .hpcm "
                              "file holds a named model to its own cells, so its bitstreams could not be written")
            say(f"rd: {variant}: {entry['error']}")
            continue
        checkpoints = []
        for lmbda in lambdas:
            run_dir = folder / "runs" / variant / f"lambda_{lmbda:g}"
            t0 = time.perf_counter()
            res = train(out=run_dir, force=True, model=name, size=opts["size"], steps=steps, lmbda=lmbda,
                        batch_size=opts["train_batch"], crop=opts["crop"], data=train_dir, val_every=0,
                        init_official=init_path, seed=opts["seed"], device=opts["device"], workers=0,
                        log_every=max(1, steps // 4), checkpoint_every=steps)
            last = res["last"] or {}
            entry["training"].append({"lambda": lmbda, "seconds": time.perf_counter() - t0,
                                      "final_loss": last.get("loss"), "final_bpp": last.get("bpp"),
                                      "final_psnr": last.get("psnr"), "skipped_steps": res["skipped"]})
            checkpoints.append(res["checkpoint"])
            del res
        ev = evaluate(checkpoints, model_name=name, size=opts["size"], data=held_dir,
                      out_dir=folder / "eval" / variant, name=variant, device=opts["device"],
                      max_images=opts.get("max_images"),
                      description=f"{variant} after {steps} training steps per λ, held-out images")
        entry["results"] = ev["results"]
        entry["lambdas"] = lambdas
        entry["notes"] = ev["notes"]
    base = rd["variants"].get(variants.BASELINE, {}).get("results")
    for variant, entry in rd["variants"].items():
        if variant == variants.BASELINE or not entry.get("results"):
            continue
        rd["bd"][variant] = {}
        if base:
            rd["bd"][variant][variants.BASELINE] = compare(entry["results"], base)
    p3, p4 = (rd["variants"].get(n, {}).get("results") for n in ("phase3", "phase4"))
    if p3 and p4:
        rd["bd"].setdefault("phase4", {})["phase3"] = compare(p4, p3)
    return rd
