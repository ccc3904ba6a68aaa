"""One variant at one image size: parameters, MACs, times and peak memory (a worker's task).

Weights are the seeded untrained ones (``hpcm_triton.models.seeded``): time and memory do not
depend on training, but the bitrate does, and with it the entropy coder's share of compress and
decompress (untrained weights code several bpp).

Order within a task: the eval-mode measurements (MACs, forward, compress, decompress) first, then
the training steps, which change the weights. Every timing is the median of ``repeats`` runs
after ``warmup`` untimed ones; every peak is measured in a run of its own
(:mod:`hpcm_triton.study.memory`).
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time

import torch

from .. import images as im
from ..models.seeded import seeded_model
from ..models.zoo import param_groups
from . import variants
from .flops import ForwardMacs
from .memory import PeakMemory

MIB = 2 ** 20
TRAIN_LAMBDA = 0.0067  # the trainer's default λ; the loss value does not change the step's cost
MEASURED = ("forward", "compress", "decompress", "train_b1", "train_batch")
# Every key of a measured row (None where a measurement failed or was not run).
ROW_KEYS = ("resolution", "pixels", "padded", "params", "macs_per_pixel", "biwkv4_macs_per_pixel", "biwkv4_counting",
            "macs_by_module",
            "forward_s", "compress_s", "decompress_s", "train_b1_s", "train_batch", "train_batch_s",
            "train_batch_s_per_image", *(f"{k}_peak_mib" for k in MEASURED), *(f"{k}_start_mib" for k in MEASURED),
            "runs_s", "bpp_untrained", "exact_decode", "load_before", "load_after", "errors", "error")


def empty_row(resolution, error: str | None = None) -> dict:
    """A row with every key; ``error`` says why the whole task failed (None: it ran)."""
    row = dict.fromkeys(ROW_KEYS)
    row.update(resolution=list(resolution), pixels=resolution[0] * resolution[1], runs_s={}, errors={}, error=error)
    return row


def say(text: str) -> None:
    """A progress line on stderr (the parent shows it above its progress bar)."""
    print(text, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def image(resolution) -> torch.Tensor:
    """The astronaut photo (512²) resized to ``resolution`` (H, W), (1, 3, H, W) in [0, 1]."""
    h, w = resolution
    x = im.bundled("astronaut")
    if (h, w) != tuple(x.shape[-2:]):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).contiguous()


def timed(fn, device: torch.device, warmup: int, repeats: int) -> list:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def build(variant: str, size: str, device) -> torch.nn.Module:
    """The study variant with seeded weights, eval mode, CDF tables built, on ``device``."""
    name, overrides = variants.resolve(variant)
    return seeded_model(name, size, **overrides).to(device)


def padded(variant: str, resolution) -> list:
    """The size the variant codes ``resolution`` at (padded to ``HPCMConfig.pad_multiple``)."""
    m = variants.pad_multiple(variant)
    return [-(-s // m) * m for s in resolution]


def memory_budget(device: torch.device, limit: int | None) -> int:
    """``limit``, or without one: half the free memory (CPU) / 90 % of the free GPU memory."""
    if limit:
        return int(limit)
    if device.type == "cuda":
        return int(0.9 * torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(0.5 * psutil.virtual_memory().available)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _attempt(row: dict, key: str, device: torch.device, fn):
    """Run one measurement; on failure record one line in ``row["errors"][key]`` and return None."""
    try:
        return fn()
    except Exception as e:  # a measurement that fails (e.g. out of GPU memory) must not end the others
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row["errors"][key] = "out of memory" if is_oom(e) else f"{e.__class__.__name__}: {' '.join(str(e).split())[:200]}"
        say(f"  {key}: failed ({row['errors'][key]})")
        return None


def _median(row: dict, key: str, runs) -> float | None:
    if runs is None:
        return None
    row["runs_s"][key] = runs
    return statistics.median(runs)


def _peak(row: dict, key: str, device, fn, live, release=None) -> None:
    """Peak memory of one ``fn()``; ``release()`` first drops what the previous call left (its
    output, gradients), which the CPU measure would not see being freed (memory.py)."""
    def run():
        if release is not None:
            release()
        with PeakMemory(device, live=live) as m:
            fn()
        return m

    m = _attempt(row, f"{key} memory", device, run)
    if m is not None:
        row[f"{key}_peak_mib"] = m.peak / MIB
        row[f"{key}_start_mib"] = m.start / MIB


def train_step_fn(model, opt):
    """One training step as the trainer runs it: RD loss (λ·255²·MSE + bpp), backward, gradient
    clipping at 1.0, Adam step."""
    from ..training.loop import rd_loss

    def step(x):
        opt.zero_grad(set_to_none=True)
        loss = rd_loss(model(x), x, TRAIN_LAMBDA)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def _stage(save, row: dict, key: str) -> None:
    """Before the measurement ``key``: hand the row measured so far to ``save`` (the worker
    writes it to its result file), so that a worker the system kills in ``key`` (out of memory)
    still reports what it finished."""
    if save is not None:
        save({**row, "unfinished": key})


def measure(spec: dict, save=None) -> dict:
    """Every measurement of one variant at one resolution; ``spec``: variant, size, device,
    resolution, warmup, repeats, batch, memory_limit (bytes or None). ``save(row)`` receives the
    row so far, marked ``"unfinished": key``, before each measurement ``key``."""
    dev = torch.device(spec["device"])
    res = tuple(spec["resolution"])
    label = f"{spec['variant']} {res[0]}×{res[1]}"
    row = empty_row(res)
    row["padded"] = padded(spec["variant"], res)
    row["load_before"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    model = build(spec["variant"], spec["size"], dev)
    row["params"] = sum(p.numel() for p in model.parameters())
    x = image(res).to(dev)
    W, R = spec["warmup"], spec["repeats"]
    pixels = res[0] * res[1]

    # ---- eval mode
    def count():
        with torch.no_grad(), ForwardMacs(model) as c:
            model(x)
        return c

    c = _attempt(row, "macs", dev, count)
    if c is not None:
        row["macs_per_pixel"] = c.macs / pixels
        row["biwkv4_macs_per_pixel"] = c.biwkv4_macs / pixels
        row["macs_by_module"] = {k: v / pixels for k, v in c.by_module.items()}
        row["biwkv4_counting"] = c.biwkv4
        say(f"{label}: {row['macs_per_pixel']:,.0f} MACs/pixel")
    fwd_out = {}

    def forward():
        with torch.no_grad():
            fwd_out["x_hat"] = model(x)["x_hat"]

    _stage(save, row, "forward")
    row["forward_s"] = _median(row, "forward", _attempt(row, "forward", dev, lambda: timed(forward, dev, W, R)))
    _peak(row, "forward", dev, forward, (model, x), fwd_out.clear)
    comp = {}

    def compress():
        comp["out"] = model.compress(x)

    _stage(save, row, "compress")
    row["compress_s"] = _median(row, "compress", _attempt(row, "compress", dev, lambda: timed(compress, dev, W, R)))
    _peak(row, "compress", dev, compress, (model, x), comp.clear)
    if "out" in comp:
        strings = comp["out"]["strings"]
        row["bpp_untrained"] = 8 * sum(len(s) for ss in strings for s in ss) / pixels
        dec = {}

        def decompress():
            dec["x_hat"] = model.decompress(comp["out"])["x_hat"]

        _stage(save, row, "decompress")
        row["decompress_s"] = _median(row, "decompress",
                                      _attempt(row, "decompress", dev, lambda: timed(decompress, dev, W, R)))
        _peak(row, "decompress", dev, decompress, (model,), dec.clear)
        if "x_hat" in dec and "x_hat" in fwd_out:
            row["exact_decode"] = bool(torch.equal(dec["x_hat"], fwd_out["x_hat"].clamp(0, 1)))
    say(f"{label}: forward {_fmt(row['forward_s'])}, compress {_fmt(row['compress_s'])}, decompress "
        f"{_fmt(row['decompress_s'])}; peaks {_fmt(row['forward_peak_mib'], 'MiB')} / "
        f"{_fmt(row['decompress_peak_mib'], 'MiB')} (forward / decompress)")
    fwd_out.clear()
    comp.clear()

    # ---- training steps
    model.train()
    opt = torch.optim.Adam(param_groups(model))
    step = train_step_fn(model, opt)
    _stage(save, row, "train_b1")
    row["train_b1_s"] = _median(row, "train_b1",
                                _attempt(row, "train_b1", dev, lambda: timed(lambda: step(x), dev, max(W, 1), R)))
    release = lambda: opt.zero_grad(set_to_none=True)  # noqa: E731
    _peak(row, "train_b1", dev, lambda: step(x), (model, opt, x), release)
    _stage(save, row, "train_batch")
    _train_batch(row, spec, dev, step, (model, opt), x, release)
    batch = (f"{_fmt(row['train_batch_s_per_image'])} per image at batch {row['train_batch']}"
             if row.get("train_batch") else f"no larger batch ({row['errors'].get('train_batch', '--batch 1')})")
    say(f"{label}: training step {_fmt(row['train_b1_s'])} (batch 1, peak {_fmt(row['train_b1_peak_mib'], 'MiB')}), "
        + batch)
    row["load_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return row


def _train_batch(row, spec, dev, step, state, x, release) -> None:
    """The training step at the largest batch ≤ spec["batch"] (halving) whose estimated peak
    (tensors live at the start + batch × the batch-1 step's rise) fits the memory budget; on CUDA
    a batch that still runs out of memory is halved again."""
    if row["train_b1_peak_mib"] is None or spec["batch"] <= 1:  # failed, or --batch 1: nothing more to try
        return
    budget = memory_budget(dev, spec.get("memory_limit")) / MIB
    start, rise = row["train_b1_start_mib"], row["train_b1_peak_mib"] - row["train_b1_start_mib"]
    B = spec["batch"]
    while B > 1 and start + B * rise > budget:
        B //= 2
    if B <= 1:
        row["errors"]["train_batch"] = f"no batch above 1 fits {budget:,.0f} MiB (estimated)"
        return
    W, R = spec["warmup"], spec["repeats"]
    while B > 1:
        xb = x.expand(B, -1, -1, -1).contiguous()
        runs = _attempt(row, "train_batch", dev, lambda: timed(lambda: step(xb), dev, max(W, 1), R))
        if runs is not None:
            row["errors"].pop("train_batch", None)
            row["train_batch"] = B
            row["train_batch_s"] = _median(row, "train_batch", runs)
            row["train_batch_s_per_image"] = row["train_batch_s"] / B
            _peak(row, "train_batch", dev, lambda: step(xb), (*state, xb), release)
            return
        if row["errors"].get("train_batch") != "out of memory":
            return
        B //= 2


def probe(spec: dict) -> dict:
    """Does one training step (``kind`` "train", batch 1, Adam state included) or one decompress
    (``kind`` "decode") of a side² image fit ``limit`` bytes? ``{"side", "kind", "fits",
    "peak_mib", "reason"}``."""
    dev = torch.device(spec["device"])
    side, kind, limit = spec["side"], spec["kind"], spec["limit"]
    out = {"side": side, "kind": kind, "fits": False, "peak_mib": None, "reason": ""}
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), dev)
    try:
        model = build(spec["variant"], spec["size"], dev)
        x = image((side, side)).to(dev)
        if kind == "train":
            model.train()
            opt = torch.optim.Adam(param_groups(model))
            step = train_step_fn(model, opt)
            with PeakMemory(dev, live=(model, opt, x)) as m:
                step(x)
        else:
            comp = model.compress(x)
            del x
            with PeakMemory(dev, live=(model,)) as m:
                model.decompress(comp)
    except Exception as e:  # out of memory where the device enforces the limit
        out["reason"] = "out of memory" if is_oom(e) else f"{e.__class__.__name__}: {' '.join(str(e).split())[:200]}"
        return out
    out["peak_mib"] = m.peak / MIB
    out["fits"] = m.peak <= limit
    out["reason"] = f"peak {m.peak / MIB:,.0f} MiB {'≤' if out['fits'] else '>'} limit {limit / MIB:,.0f} MiB"
    return out


def _fmt(v, unit: str = "s") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:,.0f} {unit}" if unit == "MiB" else f"{v:.3f} {unit}"
