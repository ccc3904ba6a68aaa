"""Evaluation with real bitstreams: compress → write a ``.hpcm`` file → read → decompress.

Per image: bpp from the file's bytes, PSNR-RGB and MS-SSIM-RGB (8-bit rounded), encoding and
decoding wall times. One RD point per checkpoint (the mean over images), written in
CompressAI's results-JSON schema, plotted against the published Kodak points, and compared
with VTM by BD-rate when there are enough points.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from importlib import resources
from pathlib import Path

import torch

from . import bitstream
from . import images as im


def published_points() -> dict:
    """The published Kodak RD points shipped in ``hpcm_triton/data/published_kodak.json``."""
    return json.loads(resources.files("hpcm_triton").joinpath("data/published_kodak.json").read_text())


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def evaluate_image(model, name: str, x: torch.Tensor, path: str | os.PathLike) -> dict:
    """Code one (1, 3, H, W) image through a real file at ``path`` → metrics dict."""
    dev = next(model.parameters()).device
    x = x.to(dev)
    _sync(dev)
    t0 = time.perf_counter()
    comp = model.compress(x)
    nbytes = bitstream.write(path, name, model, comp)
    _sync(dev)
    t1 = time.perf_counter()
    x_hat = bitstream.decode(path, model, name)
    _sync(dev)
    t2 = time.perf_counter()
    H, W = x.shape[-2:]
    if os.path.getsize(path) != nbytes:
        raise RuntimeError(f"{path}: file size {os.path.getsize(path)} != bytes written {nbytes}")
    return {"bytes": nbytes, "bpp": 8 * nbytes / (H * W), "psnr-rgb": im.psnr(x, x_hat),
            "ms-ssim-rgb": im.ms_ssim(x, x_hat), "encoding_time": t1 - t0, "decoding_time": t2 - t1}


def _mean(values):
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def bd_rate_vs_vtm(bpp: list, psnr: list) -> tuple[float | None, str]:
    """BD-rate (%) of (bpp, psnr) against the published VTM Kodak curve, or (None, why not)."""
    if len(bpp) < 4:
        return None, (f"BD-rate not computed: it needs at least 4 RD points (one per checkpoint/λ), got {len(bpp)}")
    try:
        import bjontegaard as bd
    except ImportError:
        return None, "BD-rate not computed: the 'bjontegaard' package is not installed"
    vtm = published_points()["curves"]["VTM"]
    order = sorted(range(len(bpp)), key=lambda i: bpp[i])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = bd.bd_rate(vtm["bpp"], vtm["psnr-rgb"], [bpp[i] for i in order], [psnr[i] for i in order],
                               method="akima", require_matching_points=False)
        except Exception as e:
            return None, f"BD-rate not computed: {e}"
    note = ("BD-rate vs VTM (akima); VTM points are Kodak, ours are the images evaluated here, "
            "so this is not a like-for-like comparison")
    if caught:
        note += "; " + "; ".join(str(w.message) for w in caught)
    return float(value), note


def plot_rd(results: dict, path: str | os.PathLike, data_label: str) -> None:
    """RD plot: our points against the published Kodak curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pub = published_points()["curves"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    styles = {"HPCM-Base": "C0", "HPCM-Large": "C1", "LALIC": "C2", "VTM": "C7"}
    for label, c in pub.items():
        ax.plot(c["bpp"], c["psnr-rgb"], "--o", ms=3, lw=1, color=styles.get(label), label=f"{label} (published, Kodak)")
    r = results["results"]
    pts = sorted(zip(r["bpp"], r["psnr-rgb"]))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "-s", color="C3", ms=6,
            label=f"{results['name']} (ours, {data_label})")
    ax.set_xlabel("bpp (from file bytes)")
    ax.set_ylabel("PSNR-RGB (dB)")
    ax.set_title("Rate–distortion (published points are Kodak; ours are the images evaluated)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(checkpoints: list | None = None, model_name: str = "phase3", size: str = "tiny",
             data: str | os.PathLike | None = None, out_dir: str | os.PathLike = "runs/eval",
             name: str | None = None, description: str | None = None, device: str = "cpu",
             max_images: int | None = None, progress: bool = True) -> dict:
    """Evaluate each checkpoint (or, with none, the seeded untrained ``model_name`` at ``size``)
    on ``data`` (a folder, or None for the bundled photos).

    Writes ``out_dir/results.json`` (CompressAI schema, one entry per checkpoint),
    ``out_dir/per_image.json``, ``out_dir/rd.png``. Returns the results dict, with the
    BD-rate summary under ``"bd_rate_vs_vtm"`` (and its reason in ``"bd_rate_note"``).
    """
    from tqdm import tqdm

    from .train import load_checkpoint, seeded_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if data is None or str(data) == "bundled":
        imgs = [(n, im.bundled(n)) for n in im.bundled_names()]
        data_label = "bundled photos: " + ", ".join(n for n, _ in imgs)
    else:
        imgs = [(p.name, im.load_image(p)) for p in im.image_files(data)]
        data_label = f"{len(imgs)} images from {data}"
    if max_images:
        imgs = imgs[:max_images]
    runs = list(checkpoints) if checkpoints else [None]

    results = {k: [] for k in ("bpp", "psnr-rgb", "ms-ssim-rgb", "encoding_time", "decoding_time")}
    per_image = []
    with tempfile.TemporaryDirectory(prefix="hpcm-eval-") as tmp:
        for ck in runs:
            if ck is None:
                model, mname = seeded_model(model_name, size).to(device), model_name.lower()
                label = f"{mname} ({size}, untrained seeded weights)"
            else:
                model, mname, _ = load_checkpoint(ck, device=device)
                label = str(ck)
            rows = []
            for img_name, x in tqdm(imgs, desc=f"eval {Path(label).name if ck else mname}", disable=not progress):
                rec = evaluate_image(model, mname, x, Path(tmp) / "img.hpcm")
                rows.append({"checkpoint": label, "image": img_name, "size": list(x.shape[-2:]), **rec})
            per_image.extend(rows)
            for k in results:
                results[k].append(_mean(r[k] for r in rows))
            model_name = mname
    out = {"name": name or model_name,
           "description": description or (f"hpcm-triton {model_name}, real bitstreams, {data_label}; "
                                          "points are means over images, one per checkpoint"),
           "results": results}
    (out_dir / "results.json").write_text(json.dumps(out, indent=2))
    (out_dir / "per_image.json").write_text(json.dumps(per_image, indent=2))
    plot_rd(out, out_dir / "rd.png", data_label)
    bd, note = bd_rate_vs_vtm(results["bpp"], results["psnr-rgb"])
    return {**out, "bd_rate_vs_vtm": bd, "bd_rate_note": note, "per_image": per_image,
            "files": {"results": str(out_dir / "results.json"), "per_image": str(out_dir / "per_image.json"),
                      "plot": str(out_dir / "rd.png")}}
