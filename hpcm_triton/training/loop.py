"""The trainer: one process, or K processes under ``torchrun`` (DistributedDataParallel).

``run(given, out=..., resume=..., override=..., force=...)`` is what ``hpcm-triton train`` calls;
``given`` holds the run-configuration options (``training.config.DEFAULTS`` keys; None = not given).

Determinism, and why K processes equal one:

* the model is built under ``torch.manual_seed(seed)`` with the modules' designed
  initialisation (never the golden files' seeding rule), identically on every rank;
* the samples are a function of (seed, epoch, position) (``data.py``); the global batch is
  split over the ranks, each rank's loss is its local mean, and DDP averages gradients, so the
  update is the one of the global-batch mean;
* the additive quantisation noise of training is drawn per *sample*, from a generator seeded by
  (seed, stream position, call): the same noise whichever process, batch split or resume;
* CPU and CUDA RNG states of every rank are saved anyway, and restored on resume.

One run per folder: a run holds an ``fcntl.flock`` on ``OUT/train.lock`` for its lifetime, so a
second run into the same folder is refused, and a run that does not resume refuses a folder
holding any of an earlier run's files (:data:`ARTIFACTS`) unless forced. The first SIGINT or
SIGTERM (which cluster schedulers send some time before SIGKILL) lets the current step finish,
then the run saves ``checkpoint.pt`` at that step, stops its data workers and raises
:class:`~hpcm_triton.outputs.Interrupted`; a second one interrupts at once (the temporary file
of a checkpoint being written is removed). The checkpoint resumes exactly, like any other.
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from .. import images as im
from ..models.config import HPCMConfig, size_overrides
from ..models.weights import (check_finite, is_hpcm_triton_format, load_official, read_checkpoint,
                              strip_module_prefix, unwrap_state_dict)
from ..models.zoo import MODELS, get_model, param_groups
from ..outputs import Interrupted
from ..progress import StepProgress
from . import data as D
from .checkpoint import TRAIN_FORMAT, save_atomic
from .config import resolve_config, validate_config


# ---------------------------------------------------------------- distributed
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False

    @classmethod
    def from_env(cls, device_type: str) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as td

        created = False
        if not td.is_initialized():
            td.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
            created = True
        return cls(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), created)

    def all_gather(self, obj):
        if self.world == 1:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as td

            td.all_reduce(t)
        return t

    def close(self):
        if self.world > 1:
            import torch.distributed as td

            td.barrier()
            if self.created:
                td.destroy_process_group()


def resolve_device(cfg: dict, dist: Dist) -> torch.device:
    try:
        dev = torch.device(cfg["device"])
    except (RuntimeError, TypeError):
        raise ValueError(f"--device: unknown device {cfg['device']!r} (use cpu or cuda)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {cfg['device']}: no CUDA GPU is available here")
        if dist.world > 1 or dev.index is None:
            dev = torch.device("cuda", dist.local_rank if dist.world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ValueError(f"--device {cfg['device']}: only cpu and cuda are supported")
    if cfg["amp"] == "fp16" and dev.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (on CPU use --amp bf16)")
    if cfg["amp"] == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--amp bf16: {torch.cuda.get_device_name(dev)} does not support bfloat16 (use --amp fp16)")
    return dev


# ---------------------------------------------------------------- the model
def build_model(cfg: dict) -> tuple[torch.nn.Module, dict]:
    """The variant with the modules' designed initialisation, under ``torch.manual_seed(seed)``;
    with ``init_official``, the official checkpoint's shared parts loaded over it."""
    torch.manual_seed(cfg["seed"])
    model = get_model(cfg["model"], **size_overrides(cfg["size"]))
    report = {"init": "designed", "new_modules": [], "dropped_official_modules": []}
    src = cfg.get("init_official")
    if src:
        ck = read_checkpoint(src)
        if is_hpcm_triton_format(ck):
            raise ValueError(f"{src}: is a hpcm-triton checkpoint, not an official HPCM release "
                             "(continue a training run with --resume)")
        try:
            sd = unwrap_state_dict(ck)
            rep = load_official(model, sd, strict_shared=MODELS[cfg["model"]].strict_official)
        except ValueError as e:
            raise ValueError(f"{src}: does not fit {cfg['model']} ({e})") from None
        check_finite(sd, f"checkpoint {src}")
        report = {"init": f"official:{src}", "new_modules": rep["new_modules"],
                  "dropped_official_modules": rep["dropped_official_modules"],
                  "filled_adaptive_params": rep["filled_adaptive_params"]}
    return model, report


class Precision:
    """Autocast and activation checkpointing around the transforms and RWKV blocks only.

    Each wrapped module's output is cast back to float32, so the quantisation, the likelihoods
    and the rate term — computed by HPCM outside these modules — stay float32. ``active=False``
    turns both off (validation and real coding run in float32)."""

    def __init__(self, device_type: str, amp: str, grad_checkpointing: bool):
        self.device_type = device_type
        self.dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.checkpointing = grad_checkpointing
        self.active = True
        self.wrapped = []

    def install(self, model) -> "Precision":
        from ..rwkv import RWKVContextCell, RWKVFusionBlock

        for m in model.modules():
            if isinstance(m, (RWKVContextCell, RWKVFusionBlock)):
                m.use_checkpoint = self.checkpointing
        if self.dtype is None and not self.checkpointing:
            return self
        targets = [(n, True) for n in ("g_a", "g_s", "h_a", "h_s")]
        for n in model.config.rwkv_modules:
            mod = getattr(model, n)
            if isinstance(mod, torch.nn.ModuleList):
                targets += [(f"{n}.{i}", False) for i in range(len(mod))]
            else:
                targets.append((n, False))
        for name, ckpt in targets:
            self._wrap(model.get_submodule(name), ckpt and self.checkpointing)
            self.wrapped.append(name)
        return self

    def _wrap(self, module, checkpoint_it: bool):
        orig = module.forward
        settings = self

        def inner(*args):
            if settings.dtype is None or not settings.active:
                return orig(*args)
            with torch.autocast(settings.device_type, dtype=settings.dtype):
                out = orig(*args)
            return out.float()

        def forward(*args):
            if checkpoint_it and settings.active and module.training and torch.is_grad_enabled():
                return _checkpoint(inner, *args, use_reentrant=False)
            return inner(*args)

        module.forward = forward


@contextlib.contextmanager
def sample_noise(model, keys: list):
    """Training's additive U(−½, ½) noise drawn per sample: sample b of each noise call gets a
    generator seeded by (keys[b], call index), so the noise does not depend on how the batch
    is split over processes or on what ran before."""
    calls = [0]

    def noise(x: torch.Tensor) -> torch.Tensor:
        c = calls[0]
        calls[0] += 1
        if x.shape[0] != len(keys):
            raise RuntimeError(f"noise for a batch of {x.shape[0]}, keys for {len(keys)}")
        parts = []
        for k in keys:
            g = torch.Generator(device=x.device).manual_seed(D.mix_seed(k, c))
            parts.append(torch.rand(x.shape[1:], generator=g, device=x.device, dtype=x.dtype))
        return x + (torch.stack(parts) - 0.5)

    old, model.quantization_noise = model.quantization_noise, noise
    try:
        yield
    finally:
        model.quantization_noise = old


# ---------------------------------------------------------------- loss and validation
def rd_loss(out: dict, x: torch.Tensor, lmbda: float, metric: str = "mse") -> dict:
    """λ·255²·MSE + bpp (or λ·(1 − MS-SSIM) + bpp); bpp = Σ −log2(likelihoods) / (B·H·W), y and z
    separately. Computed in float32."""
    B, _, H, W = x.shape
    denom = -math.log(2) * B * H * W
    lik = out["likelihoods"]
    bpp_y = torch.log(lik["y"].float()).sum() / denom
    bpp_z = torch.log(lik["z"].float()).sum() / denom if "z" in lik else torch.zeros_like(bpp_y)
    bpp = bpp_y + bpp_z
    x_hat = out["x_hat"].float()
    mse = F.mse_loss(x_hat, x)
    res = {"bpp": bpp, "bpp_y": bpp_y, "bpp_z": bpp_z, "mse": mse}
    if metric == "mse":
        res["loss"] = lmbda * 255 ** 2 * mse + bpp
    elif metric == "ms-ssim":
        from pytorch_msssim import ms_ssim

        res["ms_ssim"] = ms_ssim(x_hat, x, data_range=1.0, size_average=True)
        res["loss"] = lmbda * (1 - res["ms_ssim"]) + bpp
    else:
        raise ValueError(f"unknown metric {metric!r}")
    return res


@torch.no_grad()
def validate(model, images: list, lmbda: float, metric: str, device, precision: Precision | None = None) -> dict:
    """Mean over ``images`` of: the loss with the *real* bitrate (λ·D + bytes·8/pixels), bpp of
    the y and z streams from ``compress``, the eval-mode estimated bpp, MSE and PSNR.
    Runs in float32 and eval mode, leaves the RNG states and the training mode as they were."""
    was_training = model.training
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None
    if precision is not None:
        precision.active = False
    model.eval()
    model.update(force=True)
    rows = []
    try:
        for label, x in images:
            x = x.to(device)
            H, W = x.shape[-2:]
            out = model(x)
            est = rd_loss(out, x, lmbda, metric)
            comp = model.compress(x)
            by, bz = len(comp["strings"][0][0]), len(comp["strings"][1][0])
            bpp_y, bpp_z = 8 * by / (H * W), 8 * bz / (H * W)
            dist = 255 ** 2 * float(est["mse"]) if metric == "mse" else 1 - float(est["ms_ssim"])
            rows.append({"loss": lmbda * dist + bpp_y + bpp_z, "bpp": bpp_y + bpp_z, "bpp_y": bpp_y,
                         "bpp_z": bpp_z, "bpp_est": float(est["bpp"]), "mse": float(est["mse"]),
                         "psnr": im.psnr(x, out["x_hat"].clamp(0, 1))})
    finally:
        if precision is not None:
            precision.active = True
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
    res = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    res["images"] = len(rows)
    return res


# ---------------------------------------------------------------- logs
class RunLog:
    """log.jsonl (one JSON object per line, appended, never rewritten), TensorBoard events when
    the package is installed, and progress on stdout (:class:`~hpcm_triton.progress.StepProgress`).
    Only rank 0 writes."""

    def __init__(self, out: Path, enabled: bool, total: int, start: int, label: str):
        self.path = out / "log.jsonl"
        self.enabled = enabled
        self.tb = None
        self.bar = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except Exception:  # tensorboard is an optional extra
            self.tb = None
        self.bar = StepProgress(total, label, initial=start, file=sys.stdout)

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None and "step" in rec:
            prefix = rec.get("event", "train")
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{prefix}/{k}", v, rec["step"])
                elif isinstance(v, dict):
                    for kk, vv in v.items():
                        if isinstance(vv, (int, float)):
                            self.tb.add_scalar(f"{prefix}/{k}_{kk}", vv, rec["step"])

    def say(self, msg: str) -> None:
        if self.enabled:
            self.bar.write(msg)

    def progress(self, step: int, rec: dict | None) -> None:
        if not self.enabled:
            return
        if rec:
            self.bar.update_to(step, loss=f"{rec['loss']:.4f}", bpp=f"{rec['bpp']:.4f}", psnr=f"{rec['psnr']:.2f}")
            self.bar.line(f"step {rec['step']}: loss {rec['loss']:.4f} bpp {rec['bpp']:.4f} (y {rec['bpp_y']:.4f}, "
                          f"z {rec['bpp_z']:.4f}) PSNR {rec['psnr']:.2f} dB, lr " +
                          "/".join(f"{v:.3g}" for v in rec["lr"].values()) +
                          f", |g| {rec['grad_norm']:.3g}, skipped {rec['skipped']}, {rec['images_per_s']:.2f} img/s")
        else:
            self.bar.update_to(step)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------- the run folder
LOCK_NAME = "train.lock"
# What a run writes in its folder (tb: TensorBoard events, when the package is installed).
ARTIFACTS = ("checkpoint.pt", "best.pt", "log.jsonl", "tb")


def run_artifacts(out: Path) -> list[str]:
    """The names of :data:`ARTIFACTS` present in ``out``."""
    return [n for n in ARTIFACTS if os.path.lexists(out / n)]


def _refuse_earlier_run(out: Path, resume: bool, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    found = [] if resume or force else run_artifacts(out)
    if found:
        raise FileExistsError(f"{out}: already holds a run ({', '.join(found)}); pass --resume to continue it or "
                              "--force to start afresh")


@contextlib.contextmanager
def hold_folder(out: Path):
    """Hold an exclusive ``fcntl.flock`` on ``out/train.lock`` (holding this process's pid) while
    the block runs. Raises ValueError at once if another process holds it. Without fcntl (not
    POSIX) there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise ValueError(f"{out}: another training run is using this folder"
                             + (f" (pid {holder})" if holder.isdigit() else "")
                             + "; wait for it to end, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


class StopOnSignal:
    """While active (main thread only): the first SIGINT or SIGTERM is recorded in ``signum``
    for the loop to stop after its step; a second one raises :class:`Interrupted` at once."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum


# ---------------------------------------------------------------- the run
def _scheduler_state(sched) -> dict:
    sd = sched.state_dict()
    sd["milestones"] = dict(sd["milestones"])  # a Counter: keep the checkpoint weights_only-loadable
    return sd


def _set_lrs(opt, sched, cfg: dict, step: int) -> None:
    """Base learning rates from cfg, current ones = base·γ^(milestones passed) (MultiStepLR)."""
    sched.milestones = collections.Counter(cfg["milestones"])
    sched.gamma = cfg["gamma"]
    passed = bisect.bisect_right(sorted(cfg["milestones"]), step)
    bases = []
    for g in opt.param_groups:
        base = cfg["rwkv_lr"] if g.get("name") == "rwkv" else cfg["lr"]
        g["initial_lr"] = base
        g["lr"] = base * cfg["gamma"] ** passed
        bases.append(base)
    sched.base_lrs = bases
    sched._last_lr = [g["lr"] for g in opt.param_groups]


def _inherited_params(model, new_modules: list) -> list:
    def is_new(name):
        return any(name == m or name.startswith(m + ".") for m in new_modules)

    return [p for n, p in model.named_parameters() if not is_new(n)]


def run(given: dict, out: str | os.PathLike = "runs/train", resume: bool = False, override: bool = False,
        force: bool = False) -> dict:
    """Train. ``given``: run options (see ``training.config.DEFAULTS``; missing or None = default, or
    the saved value on resume). Returns a summary dict (rank, last, history, val, …)."""
    given = {k: v for k, v in given.items() if v is not None}
    out = Path(out)
    ckpt_path, best_path = out / "checkpoint.pt", out / "best.pt"
    saved = None
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"{ckpt_path}: no checkpoint to resume")
        saved = read_checkpoint(ckpt_path)
        if not (is_hpcm_triton_format(saved) and isinstance(saved.get("run"), dict) and "optimizer" in saved):
            raise ValueError(f"{ckpt_path}: not a hpcm-triton training checkpoint (cannot resume it)")
        check_finite(strip_module_prefix(saved["state_dict"]), f"checkpoint {ckpt_path}")
    cfg, changed = resolve_config(given, saved["run"] if saved else None, override)
    cfg = validate_config(cfg)
    dev_type = str(cfg["device"]).split(":")[0]
    if dev_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg['device']}: no CUDA GPU is available here")
    dist = Dist.from_env(dev_type)
    try:
        with contextlib.ExitStack() as held:  # the folder's lock and the signal handlers, until the run ends
            return _run(cfg, changed, given, saved, out, ckpt_path, best_path, resume, force, dist, held)
    finally:
        dist.close()


def _run(cfg, changed, given, saved, out, ckpt_path, best_path, resume, force, dist: Dist,
         held: contextlib.ExitStack) -> dict:
    device = resolve_device(cfg, dist)
    rank0 = dist.rank == 0
    locked = rank0 and out.is_dir()
    if locked:  # refuse a second run before the work; a new folder is locked when it is made
        held.enter_context(hold_folder(out))
    _refuse_earlier_run(out, resume, force)
    if cfg["batch_size"] % dist.world:
        raise ValueError(f"--batch-size {cfg['batch_size']} (the global batch) is not divisible by the "
                         f"{dist.world} processes")

    train_scan = D.scan(cfg["data"], min_side=cfg["crop"], what="training")
    val_images, val_scan = ([], None)
    if cfg["val_every"]:
        val_images, val_scan = D.load_validation(cfg["val"], cfg["val_crop"], cfg["val_max_images"])
        if cfg["metric"] == "ms-ssim" and any(min(x.shape[-2:]) <= 160 for _, x in val_images):
            raise ValueError("--metric ms-ssim: validation images must be larger than 160 px a side")

    # ---- model, optimizer, schedule
    if saved is not None and saved["model"] == cfg["model"]:
        model = get_model(cfg["model"], **size_overrides(cfg["size"]))
        report = saved.get("init_report", {"init": "designed", "new_modules": []})
    else:
        model, report = build_model(cfg)
    cfg_model = dataclasses.asdict(model.config)
    if saved is not None and saved["model"] == cfg["model"]:
        if HPCMConfig.json_fields(saved["config"]) != HPCMConfig.json_fields(cfg_model):
            raise ValueError(f"{ckpt_path}: the checkpoint's model configuration differs from {cfg['model']} at "
                             f"--size {cfg['size']}")
        model.load_state_dict(strip_module_prefix(saved["state_dict"]), strict=True)
    model.to(device).train()
    precision = Precision(device.type, cfg["amp"], cfg["grad_checkpointing"]).install(model)
    opt = torch.optim.Adam(param_groups(model, lr=cfg["lr"], rwkv_lr=cfg["rwkv_lr"]))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg["milestones"], gamma=cfg["gamma"])
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16")
    step, skipped, best_val, best_step = 0, 0, None, None
    notes = []
    if saved is not None:
        step = int(saved["step"])
        skipped = int(saved.get("skipped", 0))
        best_val, best_step = saved.get("best_val"), saved.get("best_step")
        if saved["model"] == cfg["model"]:
            opt.load_state_dict(saved["optimizer"])
            sd = dict(saved["scheduler"])
            sd["milestones"] = collections.Counter({int(k): v for k, v in sd["milestones"].items()})
            sched.load_state_dict(sd)
            if "scaler" in saved and saved["scaler"]:
                scaler.load_state_dict(saved["scaler"])
        else:  # --override with another model: carry the weights that fit, restart the optimizer
            own = model.state_dict()
            fit = {k: v for k, v in strip_module_prefix(saved["state_dict"]).items()
                   if k in own and tuple(v.shape) == tuple(own[k].shape)}
            model.load_state_dict(fit, strict=False)
            _set_lrs(opt, sched, cfg, step)
            sched.last_epoch = step
            notes.append(f"model changed {saved['model']} → {cfg['model']} (--override): {len(fit)} tensors carried "
                         "over, optimizer restarted")
        if any(k in given for k in ("lr", "rwkv_lr", "milestones", "gamma")):
            _set_lrs(opt, sched, cfg, step)
            notes.append("learning rates set from the command line: " +
                         ", ".join(f"{g.get('name')} {g['lr']:.3g}" for g in opt.param_groups))
        rng = saved.get("rng", {})
        if dist.rank < len(rng.get("cpu", [])) and saved.get("world_size", 1) == dist.world:
            torch.set_rng_state(rng["cpu"][dist.rank])
            cuda_states = rng.get("cuda") or []
            if device.type == "cuda" and dist.rank < len(cuda_states) and cuda_states[dist.rank] is not None:
                torch.cuda.set_rng_state(cuda_states[dist.rank], device)
        elif saved.get("world_size", 1) != dist.world:
            notes.append(f"world size changed {saved.get('world_size', 1)} → {dist.world}: RNG states not restored "
                         "(samples and noise do not depend on them)")
    elif cfg["init_official"] is None:
        notes.append("initialisation: the modules' designed initialisation (seed %d)" % cfg["seed"])
    new_modules = report.get("new_modules", [])
    inherited = _inherited_params(model, new_modules) if cfg["init_official"] else []

    net = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    # ---- data
    dataset = D.CropStream(train_scan.sources, cfg["crop"], cfg["seed"])
    sampler = D.StreamSampler(cfg["batch_size"], start_step=step, rank=dist.rank, world_size=dist.world)
    loader = torch.utils.data.DataLoader(dataset, batch_size=sampler.local, sampler=sampler,
                                         num_workers=cfg["workers"], pin_memory=device.type == "cuda",
                                         persistent_workers=False,
                                         worker_init_fn=functools.partial(D.worker_init, parent_pid=os.getpid()))

    # ---- output
    if rank0:
        if not locked:
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(hold_folder(out))
            _refuse_earlier_run(out, resume, force)  # another run may have written here meanwhile
        if not resume:
            for stale in (out / "log.jsonl", best_path):
                if stale.exists():
                    stale.unlink()
    log = RunLog(out, rank0, cfg["steps"], step, f"train {cfg['model']}")
    start_rec = {"event": "resume" if resume else "start", "step": step, "time": time.time(), "world_size": dist.world,
                 "device": str(device), "run": cfg, "data": train_scan.summary(),
                 "too_small": len(train_scan.too_small), "unreadable": len(train_scan.unreadable),
                 "val": val_scan.summary() if val_scan else None, "init": report.get("init"),
                 "new_modules": new_modules, "changed": changed, "notes": notes}
    log.write(start_rec)
    log.say(f"{'resuming' if resume else 'training'} {cfg['model']} ({cfg['size']}) at step {step}/{cfg['steps']} on "
            f"{dist.world}×{device}, global batch {cfg['batch_size']}; data: {train_scan.summary()}")
    if cfg["init_official"]:
        log.say(f"inherited from {cfg['init_official']}; new (untrained) parts: {', '.join(new_modules) or 'none'}")
    for n in notes:
        log.say(n)

    saved_at = step if saved is not None else None  # the step checkpoint.pt holds

    def save(path: Path, step: int):
        nonlocal saved_at
        if path == ckpt_path:
            saved_at = step
        rng_cpu = dist.all_gather(torch.get_rng_state())
        rng_cuda = dist.all_gather(torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        if not rank0:
            return
        save_atomic({"format": TRAIN_FORMAT, "model": cfg["model"], "config": cfg_model,
                     "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": _scheduler_state(sched), "scaler": scaler.state_dict(), "step": step,
                     "epoch": step * cfg["batch_size"] // len(dataset), "position": step * cfg["batch_size"],
                     "lmbda": cfg["lmbda"], "run": cfg, "rng": {"cpu": rng_cpu, "cuda": rng_cuda},
                     "world_size": dist.world, "skipped": skipped, "best_val": best_val, "best_step": best_step,
                     "init_report": {k: v for k, v in report.items() if isinstance(v, (str, list))}}, path)

    def run_validation(step: int):
        nonlocal best_val, best_step
        is_best = False
        if rank0:
            v = validate(model, val_images, cfg["lmbda"], cfg["metric"], device, precision)
            is_best = best_val is None or v["loss"] < best_val
            if is_best:
                best_val, best_step = v["loss"], step
            log.write({"event": "val", "step": step, **v, "best": is_best, "time": time.time()})
            log.say(f"validation at step {step}: loss {v['loss']:.4f}, bpp {v['bpp']:.4f} (y {v['bpp_y']:.4f}, "
                    f"z {v['bpp_z']:.4f}), PSNR {v['psnr']:.2f} dB{' (best)' if is_best else ''}")
            history["val"].append({"step": step, **v})
        flag = dist.all_gather(is_best)[0]
        if flag:
            save(best_path, step)

    history = {"loss": [], "val": []}
    if cfg["val_every"] and step == 0:
        run_validation(0)

    # ---- the loop
    last = None
    window = collections.defaultdict(float)
    t_window = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    inherited_ids = {id(p) for p in inherited}
    stop = held.enter_context(StopOnSignal())
    stopping = False
    data_iter = iter(loader)
    while step < cfg["steps"] and not stopping:
        x = next(data_iter).to(device, non_blocking=True)
        keys = [D.mix_seed(cfg["seed"], 3, p) for p in sampler.positions(step)]
        with sample_noise(model, keys):
            o = net(x)
        terms = rd_loss(o, x, cfg["lmbda"], cfg["metric"])
        opt.zero_grad(set_to_none=True)
        scaler.scale(terms["loss"]).backward()
        scaler.unscale_(opt)
        freeze = step < cfg["freeze_inherited"]
        params = trainable
        if freeze:
            for p in inherited:
                p.grad = None
            params = [p for p in trainable if id(p) not in inherited_ids]
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] if cfg["grad_clip"] > 0 else float("inf"))
        stats = torch.stack([terms["loss"].detach(), terms["bpp_y"].detach(), terms["bpp_z"].detach(),
                             terms["mse"].detach()]).float()
        stats = torch.cat([stats, (~torch.isfinite(stats[:1])).float(), stats.new_tensor([stop.signum is not None])])
        stats = dist.all_reduce_sum(stats)  # every rank learns of a signal to any, and stops at the same step
        loss_v, bpp_y, bpp_z, mse = (float(v) / dist.world for v in stats[:4])
        finite = float(stats[4]) == 0 and math.isfinite(float(gnorm))
        stopping = float(stats[5]) > 0
        if finite:
            scaler.step(opt)
        else:
            skipped += 1
        scaler.update()
        sched.step()
        step += 1
        history["loss"].append(loss_v)
        for k, v in (("loss", loss_v), ("bpp_y", bpp_y), ("bpp_z", bpp_z), ("mse", mse), ("grad_norm", float(gnorm))):
            if math.isfinite(v):
                window[k] += v
                window["n_" + k] += 1
        window["steps"] += 1
        if step % cfg["log_every"] == 0 or step == cfg["steps"]:
            dt = time.perf_counter() - t_window
            mean = {k: window[k] / window["n_" + k] if window["n_" + k] else float("nan")
                    for k in ("loss", "bpp_y", "bpp_z", "mse", "grad_norm")}
            last = {"event": "train", "step": step, "epoch": step * cfg["batch_size"] // len(dataset),
                    "loss": mean["loss"], "bpp": mean["bpp_y"] + mean["bpp_z"], "bpp_y": mean["bpp_y"],
                    "bpp_z": mean["bpp_z"], "mse": mean["mse"],
                    "psnr": 10 * math.log10(1 / mean["mse"]) if mean["mse"] > 0 else float("inf"),
                    "lr": {g.get("name", str(i)): g["lr"] for i, g in enumerate(opt.param_groups)},
                    "grad_norm": mean["grad_norm"], "skipped": skipped, "frozen_inherited": freeze,
                    "images_per_s": window["steps"] * cfg["batch_size"] / dt if dt > 0 else 0.0,
                    "steps_in_mean": int(window["steps"]), "time": time.time()}
            log.write(last)
            log.progress(step, last)
            window.clear()
            t_window = time.perf_counter()
        t_aside = time.perf_counter()
        if cfg["val_every"] and step % cfg["val_every"] == 0:
            run_validation(step)
        if step % cfg["checkpoint_every"] == 0 or step == cfg["steps"]:
            save(ckpt_path, step)
        t_window += time.perf_counter() - t_aside  # images/s counts training time only
    if stopping and step < cfg["steps"]:  # (a signal during the last step changes nothing)
        if saved_at != step:
            save(ckpt_path, step)
        log.write({"event": "interrupted", "step": step, "signal": signal.Signals(stop.signum or signal.SIGTERM).name,
                   "time": time.time()})
        log.close()
        del data_iter  # stops the workers
        raise Interrupted(stop.signum or signal.SIGTERM,
                          f"stopped after step {step}; checkpoint saved: {ckpt_path} (continue with --resume)")
    if saved is not None and step == int(saved["step"]):  # resumed at or past --steps: nothing to do
        log.say(f"already at step {step} ≥ --steps {cfg['steps']}: nothing to train")
    log.write({"event": "end", "step": step, "skipped": skipped, "best_val": best_val, "best_step": best_step,
               "time": time.time()})
    log.close()
    del data_iter
    model.eval()
    return {"rank": dist.rank, "last": last, "skipped": skipped, "best_val": best_val, "best_step": best_step,
            "best_path": str(best_path), "checkpoint": str(ckpt_path), "log": str(log.path), "history": history,
            "model": model, "config": cfg}


def train(out: str | os.PathLike = "runs/train", resume: bool = False, override: bool = False, force: bool = False,
          **options) -> dict:
    """Python entry point: ``train(out, model="phase3", size="tiny", steps=100, ...)``."""
    return run(options, out=out, resume=resume, override=override, force=force)
