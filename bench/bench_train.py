"""Benchmark (not a test): training throughput and peak memory of each variant.

One optimizer step is what ``hpcm-triton train`` runs (designed initialisation, per-sample noise,
RD loss, backward, clipping, Adam), timed over ``--steps`` steps after ``--warmup`` steps, for
every (variant, precision, gradient checkpointing) combination; a markdown table with date,
machine and torch version.

    python bench/bench_train.py                                        # TINY widths, CPU, batch 2, crop 128
    python bench/bench_train.py --device cuda --size full              # the issue's table: batch 8, crop 256,
                                                                       # fp32/bf16 × checkpointing on/off

Peak memory: CUDA ``max_memory_allocated`` during the timed steps above what was allocated
before them (model and optimizer state included in the base); CPU: RSS growth over warm-up and
timed steps above the RSS with the model built (so Adam's state is included), sampled by a
thread (coarse: short peaks can be missed), each combination in its own subprocess (memory
freed by an earlier one would be reused).
A combination that runs out of memory is reported as OOM and the table goes on.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import subprocess
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from hpcm_triton.models.config import MODEL_NAMES, SIZES  # noqa: E402
from hpcm_triton.training import data as D  # noqa: E402
from hpcm_triton.training.loop import Precision, build_model, rd_loss, sample_noise  # noqa: E402
from hpcm_triton.models.zoo import param_groups  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench_one(name: str, size: str, amp: str, ckpt: bool, dev: torch.device, batch: int, crop: int, warmup: int,
              steps: int) -> dict:
    model, _ = build_model({"model": name, "size": size, "seed": 0, "init_official": None})
    model.to(dev).train()
    Precision(dev.type, amp, ckpt).install(model)
    opt = torch.optim.Adam(param_groups(model))
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(batch, 3, crop, crop, generator=g) for _ in range(2)]

    def step(i):
        x = batches[i % 2].to(dev, non_blocking=True)
        with sample_noise([D.mix_seed(0, i, b) for b in range(batch)]):
            out = model(x)
        loss = rd_loss(out, x, 0.0067)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    if dev.type == "cuda":
        for i in range(warmup):
            step(i)
        _sync(dev)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        t = time.perf_counter()
        for i in range(steps):
            step(warmup + i)
        _sync(dev)
        dt = time.perf_counter() - t
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
    else:
        from bench_models import _RssPeak

        gc.collect()
        with _RssPeak() as m:  # base: the RSS with the model built, before the first step
            for i in range(warmup):
                step(i)
            t = time.perf_counter()
            for i in range(steps):
                step(warmup + i)
            dt = time.perf_counter() - t
        peak = m.mib
    return {"images_per_s": steps * batch / dt, "step_s": dt / steps, "peak_mib": peak,
            "params": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default=None, choices=SIZES, help="default: tiny on CPU, full on CUDA")
    p.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    p.add_argument("--batch-size", type=int, default=None, help="default: 2 on CPU, 8 on CUDA")
    p.add_argument("--crop", type=int, default=None, help="default: 128 on CPU, 256 on CUDA")
    p.add_argument("--amp", nargs="+", default=["none", "bf16"], choices=("none", "bf16", "fp16"))
    p.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=("off", "on"))
    p.add_argument("--warmup", type=int, default=None, help="default: 2 on CUDA, 1 on CPU")
    p.add_argument("--steps", type=int, default=None, help="default: 5 on CUDA, 3 on CPU")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one combination, JSON out
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench_train: --device cuda but no GPU is available", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    size = a.size or ("full" if cuda else "tiny")
    batch = a.batch_size or (8 if cuda else 2)
    crop = a.crop or (256 if cuda else 128)
    a.warmup = a.warmup if a.warmup is not None else (2 if cuda else 1)
    a.steps = a.steps or (5 if cuda else 3)
    if a.one:
        name, amp, ck = a.one.split(",")
        print(json.dumps(bench_one(name, size, amp, ck == "on", dev, batch, crop, a.warmup, a.steps)))
        return 0
    machine = (torch.cuda.get_device_name(dev) if cuda
               else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"### hpcm-triton training benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}\n")
    print(f"machine: {machine}; torch {torch.__version__}; python {platform.python_version()}  ")
    print(f"widths: {size}; batch {batch}, crop {crop}²; designed initialisation; time: {a.steps} steps after "
          f"{a.warmup} warm-up steps; peak memory: "
          f"{'CUDA max_memory_allocated above model+optimizer' if cuda else 'RSS growth (coarse)'}\n")
    print("| model | params | precision | grad checkpointing | images/s | s/step | peak MiB |")
    print("|---|---:|---|---|---:|---:|---:|")
    t0 = time.perf_counter()
    for name in a.models:
        for amp in a.amp:
            for ck in a.checkpointing:
                try:
                    if cuda:
                        r = bench_one(name, size, amp, ck == "on", dev, batch, crop, a.warmup, a.steps)
                    else:
                        cmd = [sys.executable, __file__, "--one", f"{name},{amp},{ck}", "--device", a.device,
                               "--size", size, "--batch-size", str(batch), "--crop", str(crop), "--warmup",
                               str(a.warmup), "--steps", str(a.steps)]
                        cmd += ["--threads", str(a.threads)] if a.threads else []
                        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                        r = json.loads(res.stdout.splitlines()[-1])
                    row = f"{r['params']:,} | {amp if amp != 'none' else 'fp32'} | {ck} | {r['images_per_s']:.2f} | " \
                          f"{r['step_s']:.3f} | {r['peak_mib']:.0f}"
                except torch.cuda.OutOfMemoryError:
                    row = f"– | {amp} | {ck} | OOM | – | –"
                    torch.cuda.empty_cache()
                print(f"| {name} | {row} |", flush=True)
                gc.collect()
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
