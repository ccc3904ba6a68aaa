"""Training (rate–distortion loss λ·255²·MSE + bpp, SPEC §3) and the checkpoint format.

A checkpoint is a plain dict that ``torch.load(path, weights_only=True)`` reads::

    {"model": "phase3", "config": asdict(model.config), "state_dict": ..., "optimizer": ...,
     "step": int, "lmbda": float, "history": {...}, "rng": {...}}

``load_checkpoint`` rebuilds the model from ``model`` + ``config`` and loads ``state_dict``
strictly, so no key surgery is ever needed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .models import TINY
from .outputs import atomic_write
from .models.config import HPCMConfig
from .models.seeded import seeded_init_
from .models.zoo import MODELS, get_model, param_groups

SIZES = ("tiny", "full")


# ---------------------------------------------------------------- building and loading models
def size_overrides(size: str) -> dict:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return dict(TINY) if size == "tiny" else {}


def seeded_model(name: str, size: str = "tiny", **overrides):
    """An untrained model whose weights depend only on parameter names (bit-identical in any
    process), eval mode, CDF tables built."""
    model = seeded_init_(get_model(name, **{**size_overrides(size), **overrides}))
    model.eval()
    model.update(force=True)
    return model


def load_checkpoint(path: str | os.PathLike, name: str | None = None, device: str | torch.device = "cpu"):
    """Load a training checkpoint (this module's format) or an official HPCM state_dict.

    Returns (model, name, checkpoint_dict) with the model in eval mode and its CDF tables
    rebuilt from the loaded weights. Official checkpoints need ``name``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a checkpoint (a {type(ckpt).__name__})")
    if "model" in ckpt and "config" in ckpt and "state_dict" in ckpt:
        ck_name = ckpt["model"]
        if name is not None and name.lower() != ck_name:
            raise ValueError(f"{path}: checkpoint is for model {ck_name!r}, not {name!r}")
        model = get_model(ck_name, **HPCMConfig.json_fields(ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"], strict=True)
        name = ck_name
    else:  # an official release: {"state_dict": ...} or the bare state_dict
        if name is None:
            raise ValueError(f"{path}: an official state_dict does not say which model it is; pass --model")
        sd = ckpt.get("state_dict", ckpt)
        model = MODELS[name.lower()].from_official_state_dict(sd)
        name = name.lower()
    model.to(device).eval()
    model.update(force=True)
    return model, name, ckpt


def _atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# ---------------------------------------------------------------- data
class RandomCrops:
    """Random ``crop``×``crop`` patches (with random horizontal flips) from a list of images.

    Images smaller than the crop are reflect-padded. ``sample(b)`` → (b, 3, crop, crop).
    Uses its own generator so a resumed run draws the same crops as an uninterrupted one.
    """

    def __init__(self, images: list[torch.Tensor], crop: int, seed: int = 0):
        if not images:
            raise ValueError("no training images")
        if crop < 64:
            raise ValueError(f"crop must be ≥ 64 (the models' minimum), got {crop}")
        self.images = [im[0] if im.dim() == 4 else im for im in images]
        self.crop = crop
        self.gen = torch.Generator().manual_seed(seed)

    def _patch(self, im: torch.Tensor) -> torch.Tensor:
        c = self.crop
        _, h, w = im.shape
        if h < c or w < c:
            ph, pw = max(0, c - h), max(0, c - w)
            mode = "reflect" if ph < h and pw < w else "replicate"
            im = F.pad(im[None], (0, pw, 0, ph), mode=mode)[0]
            _, h, w = im.shape
        top = int(torch.randint(0, h - c + 1, (1,), generator=self.gen))
        left = int(torch.randint(0, w - c + 1, (1,), generator=self.gen))
        p = im[:, top:top + c, left:left + c]
        if bool(torch.rand(1, generator=self.gen) < 0.5):
            p = p.flip(-1)
        return p

    def sample(self, batch_size: int) -> torch.Tensor:
        idx = torch.randint(0, len(self.images), (batch_size,), generator=self.gen).tolist()
        return torch.stack([self._patch(self.images[i]) for i in idx])


def load_dataset(data: str | os.PathLike | None) -> list[torch.Tensor]:
    """A folder of images, or ``None`` / ``"bundled"`` for the bundled photos (a tiny default set)."""
    from . import images as im

    if data is None or str(data) == "bundled":
        return [im.bundled(n) for n in im.bundled_names()]
    return [im.load_image(p) for p in im.image_files(data)]


# ---------------------------------------------------------------- loss and loop
def rd_loss(out: dict, x: torch.Tensor, lmbda: float) -> dict:
    """λ·255²·MSE + bpp, with bpp = Σ −log2(likelihoods) / (B·H·W) of the input size."""
    B, _, H, W = x.shape
    bpp = sum(torch.log(l).sum() for l in out["likelihoods"].values()) / (-math.log(2) * B * H * W)
    mse = F.mse_loss(out["x_hat"], x)
    return {"loss": lmbda * 255 ** 2 * mse + bpp, "bpp": bpp, "mse": mse}


def plot_history(history: dict, path: str | os.PathLike, title: str = "") -> None:
    """Loss / bpp / PSNR against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key, label in zip(axes, ("loss", "bpp", "psnr"), ("loss (λ·255²·MSE + bpp)", "bpp (estimated)",
                                                                "PSNR (dB, training crops)")):
        ax.plot(history["step"], history[key], lw=1)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(model, data, lmbda: float, steps: int, batch_size: int = 8, crop: int = 256, lr: float = 1e-4,
          rwkv_lr: float = 5e-5, grad_clip: float = 1.0, device: str | torch.device = "cpu",
          out_dir: str | os.PathLike = "runs/train", resume: bool | str | os.PathLike = False,
          model_name: str | None = None, checkpoint_every: int = 100, seed: int = 0,
          progress: bool = True) -> dict:
    """Train ``model`` for ``steps`` optimizer steps in total (a resumed run continues to ``steps``).

    data: a list of (1, 3, H, W) / (3, H, W) images, a folder path, or None for the bundled
    photos. Writes ``out_dir/checkpoint.pt`` every ``checkpoint_every`` steps and at the end,
    ``out_dir/curves.png`` and ``out_dir/history.json``. ``resume``: True (``out_dir``'s
    checkpoint) or a checkpoint path. Returns the history dict (step, loss, bpp, psnr lists).
    """
    from tqdm import tqdm

    name = (model_name or _name_of(model)).lower()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = data if isinstance(data, list) else load_dataset(data)
    sampler = RandomCrops(images, crop, seed=seed)
    torch.manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.Adam(param_groups(model, lr=lr, rwkv_lr=rwkv_lr))
    history = {"step": [], "loss": [], "bpp": [], "psnr": []}
    step = 0
    ckpt_path = out_dir / "checkpoint.pt"
    if resume:
        src = ckpt_path if resume is True else Path(resume)
        ck = torch.load(src, map_location="cpu", weights_only=True)
        if ck.get("model") != name:
            raise ValueError(f"{src}: checkpoint is for {ck.get('model')!r}, training {name!r}")
        if HPCMConfig.json_fields(ck["config"]) != dataclasses.asdict(model.config):
            raise ValueError(f"{src}: checkpoint config differs from the model being trained")
        model.load_state_dict(ck["state_dict"], strict=True)
        opt.load_state_dict(ck["optimizer"])
        step, history = int(ck["step"]), ck["history"]
        torch.set_rng_state(ck["rng"]["torch"])
        sampler.gen.set_state(ck["rng"]["data"])

    def save():
        _atomic_torch_save({"model": name, "config": dataclasses.asdict(model.config),
                            "state_dict": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                            "lmbda": lmbda, "history": history,
                            "rng": {"torch": torch.get_rng_state(), "data": sampler.gen.get_state()}}, ckpt_path)
        (out_dir / "history.json").write_text(json.dumps({"model": name, "lmbda": lmbda, **history}))
        if history["step"]:
            plot_history(history, out_dir / "curves.png", f"{name}, λ={lmbda}")

    bar = tqdm(total=steps, initial=step, desc=f"train {name}", disable=not progress, dynamic_ncols=True)
    while step < steps:
        x = sampler.sample(batch_size).to(device)
        out = model(x)
        terms = rd_loss(out, x, lmbda)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        step += 1
        mse = float(terms["mse"].detach())
        psnr = 10 * math.log10(1 / mse) if mse > 0 else float("inf")
        for k, v in (("step", step), ("loss", float(terms["loss"].detach())),
                     ("bpp", float(terms["bpp"].detach())), ("psnr", psnr)):
            history[k].append(v)
        bar.update(1)
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", bpp=f"{history['bpp'][-1]:.3f}", psnr=f"{psnr:.2f}")
        if step % checkpoint_every == 0 or step == steps:
            save()
    bar.close()
    if not ckpt_path.exists():  # resumed at or past `steps`: still leave a checkpoint behind
        save()
    model.eval()
    return history


def _name_of(model) -> str:
    for n, cls in MODELS.items():
        if type(model) is cls:
            return n
    raise ValueError("cannot tell the model's name from its class; pass model_name=")
