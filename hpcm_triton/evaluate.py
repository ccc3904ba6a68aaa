"""Evaluation with real bitstreams: compress → write a ``.hpcm`` file → read → decompress.

Per image: ``bpp`` from the y and z streams (what papers and CompressAI report), ``bpp-file``
from the whole ``.hpcm`` file (header included), PSNR-RGB and MS-SSIM-RGB (8-bit rounded), and
the model's encoding and decoding times (``compress`` and ``decompress`` only: the container's
write/read and its weight fingerprint, hashed once per model, are not timed). One RD point per
checkpoint (the mean over images), written in CompressAI's results-JSON schema, in which every
value is a number: a metric that cannot be computed for every image is left out, and the
reason is written to ``evaluate.log``. BD-rates (PSNR and MS-SSIM) against the published Kodak
anchors and against any other results file.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch

from . import bitstream
from . import images as im
from .defaults import DEFAULT_MAX_PIXELS

RESULT_KEYS = ("bpp", "bpp-file", "psnr-rgb", "ms-ssim-rgb", "encoding_time", "decoding_time")
VTM_LABEL = "VTM (CompressAI Kodak)"
HPCM_BASE_LABEL = "HPCM-Base (published Kodak)"


def published_points() -> dict:
    """The published Kodak RD points shipped in ``hpcm_triton/data/published_kodak.json``."""
    return json.loads(resources.files("hpcm_triton").joinpath("data/published_kodak.json").read_text())


def anchors() -> dict:
    """Published Kodak curves usable as BD-rate anchors, as results dicts
    (``bpp``, ``psnr-rgb``, and ``ms-ssim-rgb`` with its own ``ms-ssim-bpp`` where the
    MS-SSIM points come from other models than the PSNR ones)."""
    pub = published_points()["curves"]
    out = {VTM_LABEL: {"bpp": pub["VTM"]["bpp"], "psnr-rgb": pub["VTM"]["psnr-rgb"],
                       "ms-ssim-rgb": pub["VTM"]["ms-ssim-rgb"]}}
    for label, key in ((HPCM_BASE_LABEL, "HPCM-Base"), ("HPCM-Large (published Kodak)", "HPCM-Large")):
        c = pub[key]
        out[label] = {"bpp": c["bpp"], "psnr-rgb": c["psnr-rgb"], "ms-ssim-bpp": c["ms-ssim-bpp"],
                      "ms-ssim-rgb": [1 - 10 ** (-v / 10) for v in c["ms-ssim-rgb-db"]]}
    return out


def unavailable_anchors() -> dict:
    """Anchors asked for but not computable, with the reason (e.g. the paper's VTM-22.0)."""
    return dict(published_points().get("anchors_not_available", {}))


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- BD-rate
def ms_ssim_db(v: float) -> float:
    """MS-SSIM in dB, −10·log10(1 − v), as CompressAI's plot and the papers use."""
    return -10 * math.log10(1 - v) if v < 1 else math.inf


def bd_rate(anchor_bpp, anchor_dist, test_bpp, test_dist) -> tuple[float | None, str]:
    """BD-rate (%) of the test curve against the anchor (akima), or (None, why not)."""
    if len(anchor_bpp) < 4 or len(test_bpp) < 4:
        return None, (f"it needs at least 4 RD points on each curve (one per checkpoint/λ), got "
                      f"{len(test_bpp)} (test) and {len(anchor_bpp)} (anchor)")
    vals = [*anchor_bpp, *anchor_dist, *test_bpp, *test_dist]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
        return None, "a point is not a finite number"
    try:
        import bjontegaard as bd
    except ImportError:
        return None, "the 'bjontegaard' package is not installed"
    a = sorted(zip(anchor_bpp, anchor_dist))
    t = sorted(zip(test_bpp, test_dist))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = bd.bd_rate([p[0] for p in a], [p[1] for p in a], [p[0] for p in t], [p[1] for p in t],
                               method="akima", require_matching_points=False)
        except Exception as e:  # bjontegaard raises on non-monotonic curves
            return None, f"{e.__class__.__name__}: {e}"
    why = "; ".join(str(w.message) for w in caught)
    if value is None or not math.isfinite(float(value)):
        return None, why or "the BD integral is not finite"
    return float(value), why


def bd_rates(test: dict, anchor: dict) -> tuple[dict, list]:
    """{"psnr": %, "ms-ssim": %} of results ``test`` against results ``anchor`` (only the ones
    that could be computed) and a list of reasons for the others."""
    out, notes = {}, []
    for metric, key in (("psnr", "psnr-rgb"), ("ms-ssim", "ms-ssim-rgb")):
        if key not in test or key not in anchor:
            side = "test" if key not in test else "anchor"
            notes.append(f"BD-rate ({metric}) not computed: the {side} results have no {key}")
            continue
        conv = ms_ssim_db if metric == "ms-ssim" else float
        a_bpp = anchor.get("ms-ssim-bpp", anchor["bpp"]) if metric == "ms-ssim" else anchor["bpp"]
        t_bpp = test.get("ms-ssim-bpp", test["bpp"]) if metric == "ms-ssim" else test["bpp"]
        value, why = bd_rate(a_bpp, [conv(v) for v in anchor[key]], t_bpp, [conv(v) for v in test[key]])
        if value is None:
            notes.append(f"BD-rate ({metric}) not computed: {why}")
        else:
            out[metric] = value
            if why:
                notes.append(f"BD-rate ({metric}): {why}")
    return out, notes


def bd_rate_vs_vtm(bpp: list, psnr: list) -> tuple[float | None, str]:
    """BD-rate (%, PSNR) of (bpp, psnr) against CompressAI's VTM Kodak curve, or (None, why not)."""
    vtm = anchors()[VTM_LABEL]
    value, why = bd_rate(vtm["bpp"], vtm["psnr-rgb"], list(bpp), list(psnr))
    if value is None:
        return None, f"BD-rate not computed: {why}"
    note = ("BD-rate vs VTM (akima, CompressAI's Kodak points); ours are the images evaluated here, so this is "
            "like-for-like only on Kodak")
    return value, note + (f"; {why}" if why else "")


def load_results(path) -> dict:
    """The ``results`` of a CompressAI-style results file; CompressAI's own ``psnr``/``ms-ssim``
    keys (as in its vtm.json) are read as ``psnr-rgb``/``ms-ssim-rgb``."""
    data = json.loads(Path(path).read_text())
    r = dict(data.get("results", data))
    for short, full in (("psnr", "psnr-rgb"), ("ms-ssim", "ms-ssim-rgb")):
        if short in r and full not in r:
            r[full] = r.pop(short)
    if "bpp" not in r:
        raise ValueError(f"{path}: no 'bpp' in its results")
    return r


def compare_files(test_path, anchor_path) -> dict:
    """BD-rates (PSNR, MS-SSIM) of one results file against another (e.g. Phase 3 vs HPCM-Base)."""
    values, notes = bd_rates(load_results(test_path), load_results(anchor_path))
    return {"test": str(test_path), "anchor": str(anchor_path), "bd_rate": values, "notes": notes}


# ---------------------------------------------------------------- one image
@contextmanager
def _weights_hashed_once(model):
    """Within evaluation, ``bitstream`` fingerprints this model's weights once, not twice per
    image (the weights do not change while it runs)."""
    original = bitstream.weights_fingerprint
    fp = original(model)
    bitstream.weights_fingerprint = lambda m: fp if m is model else original(m)
    try:
        yield fp
    finally:
        bitstream.weights_fingerprint = original


@torch.no_grad()
def evaluate_image(model, name: str, x: torch.Tensor, path: str | os.PathLike) -> dict:
    """Code one (1, 3, H, W) image through a real file at ``path`` → metrics dict (numbers only;
    ``ms-ssim-rgb`` is absent when the image is too small for it)."""
    dev = next(model.parameters()).device
    x = x.to(dev)
    _sync(dev)
    t0 = time.perf_counter()
    comp = model.compress(x)
    _sync(dev)
    t1 = time.perf_counter()
    nbytes = bitstream.write(path, name, model, comp)
    info = bitstream.read(path, model, name)
    _sync(dev)
    t2 = time.perf_counter()
    x_hat = model.decompress(info["strings"], info["shape"], image_size=info["image_size"])["x_hat"]
    _sync(dev)
    t3 = time.perf_counter()
    if os.path.getsize(path) != nbytes:
        raise RuntimeError(f"{path}: file size {os.path.getsize(path)} != bytes written {nbytes}")
    H, W = x.shape[-2:]
    y_bytes, z_bytes = sum(len(s) for s in comp["strings"][0]), sum(len(s) for s in comp["strings"][1])
    row = {"bytes-y": y_bytes, "bytes-z": z_bytes, "bytes-file": nbytes, "bpp": 8 * (y_bytes + z_bytes) / (H * W),
           "bpp-file": 8 * nbytes / (H * W), "psnr-rgb": im.psnr(x, x_hat), "encoding_time": t1 - t0,
           "decoding_time": t3 - t2}
    ms = im.ms_ssim(x, x_hat)
    if ms is not None:
        row["ms-ssim-rgb"] = ms
    return row


def _number(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# ---------------------------------------------------------------- plots
def plot_rd(results: dict, path: str | os.PathLike, data_label: str, *, exclusive: bool = False) -> None:
    """RD plot: our points against the published Kodak curves (``exclusive``: see
    :func:`hpcm_triton.outputs.atomic_write`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pub = published_points()["curves"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    styles = {"HPCM-Base": "C0", "HPCM-Large": "C1", "LALIC": "C2", "VTM": "C7"}
    for label, c in pub.items():
        ax.plot(c["bpp"], c["psnr-rgb"], "--o", ms=3, lw=1, color=styles.get(label), label=f"{label} (published, Kodak)")
    r = results["results"]
    if "psnr-rgb" in r:  # left out only if some PSNR was not finite (see the log)
        pts = sorted(zip(r["bpp"], r["psnr-rgb"]))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-s", color="C3", ms=6,
                label=f"{results['name']} (ours, {data_label})")
    ax.set_xlabel("bpp (y + z streams)")
    ax.set_ylabel("PSNR-RGB (dB)")
    ax.set_title("Rate–distortion (published points are Kodak; ours are the images evaluated)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    from .outputs import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), exclusive=exclusive)
    plt.close(fig)


# ---------------------------------------------------------------- a run
def evaluate(checkpoints: list | None = None, model_name: str | None = None, size: str = "tiny",
             data: str | os.PathLike | None = None, out_dir: str | os.PathLike = "runs/eval",
             name: str | None = None, description: str | None = None, device: str = "cpu",
             max_images: int | None = None, progress: bool = True, anchor_files=(),
             max_pixels: int | None = DEFAULT_MAX_PIXELS, exclusive: bool = False) -> dict:
    """Evaluate each checkpoint (or, with none, the seeded untrained ``model_name`` at ``size``)
    on ``data`` (a folder, or None for the bundled photos).

    ``model_name``: the model the checkpoints are; required for official state_dicts (they do
    not say which model they are), checked against training checkpoints. Without checkpoints it
    picks the untrained model (default ``phase3``).

    Writes in ``out_dir``: ``results.json`` (CompressAI schema, one point per checkpoint, numbers
    only), ``per_image.json``, ``bd_rate.json`` (against the published anchors and each of
    ``anchor_files``), ``rd.png`` and ``evaluate.log`` (every value left out, and why); with
    ``exclusive``, only as new files (see :func:`hpcm_triton.outputs.atomic_write`). An image
    of ``data`` with more than ``max_pixels`` pixels (None: no bound) is refused from its
    header before any is decoded.
    """
    from .models.seeded import seeded_model
    from .models.zoo import load_checkpoint
    from .outputs import atomic_write_bytes, temporary_folder
    from .progress import progress as show_progress

    out_dir = Path(out_dir)
    if data is None or str(data) == "bundled":
        imgs = [(n, im.bundled(n)) for n in im.bundled_names()]
        data_label = "bundled photos: " + ", ".join(n for n, _ in imgs)
    else:
        files = im.image_files(data)
        for p in files:  # every header before any pixels: a refused image costs no decoding
            H, W = im.image_size(p)
            im.check_pixels(p, H, W, max_pixels)
        imgs = [(p.name, im.load_image(p, max_pixels=max_pixels)) for p in files]
        data_label = f"{len(imgs)} images from {data}"
    if max_images:
        imgs = imgs[:max_images]
    if not imgs:
        raise ValueError(f"no images to evaluate in {data}")
    runs = list(checkpoints) if checkpoints else [None]
    log: list[str] = []

    points, per_image, run_name = [], [], None
    with temporary_folder("hpcm-eval-") as tmp:  # removed also when SIGINT/SIGTERM end the command
        for ck in runs:
            if ck is None:
                mname = (model_name or "phase3").lower()
                model = seeded_model(mname, size).to(device)
                label = f"{mname} ({size}, untrained seeded weights)"
            else:
                # The name goes through: an official state_dict needs it, a training checkpoint is checked against it.
                kw = {"name": model_name} if model_name else {}
                model, mname, _ = load_checkpoint(ck, device=device, **kw)
                label = str(ck)
            rows = []
            with _weights_hashed_once(model):
                for img_name, x in show_progress(imgs, f"eval {Path(label).name if ck else mname}", enabled=progress):
                    rec = evaluate_image(model, mname, x, Path(tmp) / "img.hpcm")
                    if "ms-ssim-rgb" not in rec:
                        log.append(f"{label}: {img_name} ({x.shape[-2]}×{x.shape[-1]}): no MS-SSIM (it needs both "
                                   "sides > 160 px for its 5 scales, and the pytorch_msssim package)")
                    rows.append({"checkpoint": label, "image": img_name, "size": list(x.shape[-2:]), **rec})
            per_image.extend(rows)
            points.append({k: (sum(r[k] for r in rows) / len(rows) if all(_number(r.get(k)) for r in rows) else None)
                           for k in RESULT_KEYS})
            run_name = run_name or mname

    results = {}
    for k in RESULT_KEYS:
        vals = [p[k] for p in points]
        if all(_number(v) for v in vals):
            results[k] = vals
        else:
            log.append(f"results.json: '{k}' left out: not a number for every image of every point (see above)")
    out = {"name": name or run_name,
           "description": description or (f"hpcm-triton {run_name}, real bitstreams, {data_label}; points are means "
                                          "over images, one per checkpoint; bpp from the y and z streams, bpp-file "
                                          "from the .hpcm file with its header; times are compress/decompress only"),
           "results": results}

    bd = {}
    targets = [(label, res) for label, res in anchors().items()]
    for f in anchor_files or ():
        targets.append((str(f), load_results(f)))
    for label, anchor in targets:
        values, notes = bd_rates(results, anchor)
        if values:
            bd[label] = values
        log.extend(f"vs {label}: {n}" for n in notes)
    for label, why in unavailable_anchors().items():
        log.append(f"vs {label}: not computed: {why}")

    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a run that fails earlier leaves nothing behind

    def write_json(fname, obj):
        atomic_write_bytes(out_dir / fname, json.dumps(obj, indent=2, allow_nan=False).encode(), exclusive=exclusive)

    write_json("results.json", out)
    write_json("per_image.json", per_image)
    write_json("bd_rate.json", {"test": out["name"], "bd_rate_percent": bd})
    atomic_write_bytes(out_dir / "evaluate.log", "".join(line + "\n" for line in log).encode(), exclusive=exclusive)
    plot_rd(out, out_dir / "rd.png", data_label, exclusive=exclusive)
    files = {k: str(out_dir / f) for k, f in (("results", "results.json"), ("per_image", "per_image.json"),
                                              ("bd_rate", "bd_rate.json"), ("log", "evaluate.log"),
                                              ("plot", "rd.png"))}
    return {**out, "bd_rate": bd, "notes": log, "per_image": per_image, "files": files}
