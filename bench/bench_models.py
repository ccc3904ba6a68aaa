"""Benchmark (not a test): the phase design's Phase 2 vs Phase 3 "compare" mode, measured.

Parameters, peak memory and forward / compress / decompress wall time of Phase 2 vs Phase 3
(or any variants) at 256² and 512², as a markdown table with date, machine and torch version.
Weights are the seeded untrained ones: time and memory do not depend on training, bitrates do.

    python bench/bench_models.py                         # phase2 vs phase3, TINY widths, CPU
    python bench/bench_models.py --size full --models hpcm-base phase2 phase3 --sides 256
    python bench/bench_models.py --device cuda --size full --models all

Peak memory of one call: CUDA ``max_memory_allocated`` (tensors only) above what was allocated
before it; CPU: the process's RSS sampled every 2 ms by a thread (psutil) during the call, minus
the RSS once the model is built
(torch's CPU allocator is invisible to tracemalloc). Short CPU peaks can be missed. Memory freed
by an earlier run would be reused without RSS growth, so each (variant, size) runs in its own
subprocess unless ``--no-isolate``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import subprocess
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hpcm_triton import images as im  # noqa: E402
from hpcm_triton.models.config import MODEL_NAMES, SIZES  # noqa: E402
from hpcm_triton.models.seeded import seeded_model  # noqa: E402


class _RssPeak:
    """Context manager: peak RSS growth (MiB) of this process while inside."""

    def __init__(self, base: int | None = None):
        import psutil

        self.proc = psutil.Process()
        self.base = base

    def __enter__(self):
        gc.collect()
        rss = self.proc.memory_info().rss
        self.peak = rss
        self.base = rss if self.base is None else self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.mib = (self.peak - self.base) / 2 ** 20
        return False


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, dev, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _peak(fn, dev, base_rss: int | None = None) -> float:
    """Peak memory (MiB) of one call of ``fn``, above ``base_rss`` on CPU (default: RSS before the call)."""
    if dev.type == "cuda":
        _sync(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        _sync(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
    with _RssPeak(base_rss) as m:
        fn()
    return m.mib


def _image(side: int) -> torch.Tensor:
    """The astronaut photo (512²), resized to side²."""
    x = im.bundled("astronaut")
    if side != 512:
        x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    return x.clamp(0, 1)


@torch.no_grad()
def bench(name: str, size: str, sides: list[int], dev: torch.device, repeats: int) -> list[dict]:
    model = seeded_model(name, size).to(dev)
    params = sum(p.numel() for p in model.parameters())
    gc.collect()
    base_rss = None if dev.type == "cuda" else _RssPeak().proc.memory_info().rss  # model loaded, nothing run
    rows = []
    for side in sides:
        x = _image(side).to(dev)
        # memory first, on cold calls: the numbers are peaks above the loaded model
        mem = {k: _peak(fn, dev, base_rss) for k, fn in (("fwd", lambda: model(x)), ("enc", lambda: model.compress(x)))}
        comp = model.compress(x)
        mem["dec"] = _peak(lambda: model.decompress(comp), dev, base_rss)
        exact = torch.equal(model.decompress(comp)["x_hat"], model(x)["x_hat"].clamp(0, 1))
        row = {"model": name, "side": side, "params": params, "exact": exact,
               "bpp": 8 * sum(len(s) for ss in comp["strings"] for s in ss) / side ** 2}
        for key, fn in (("fwd", lambda: model(x)), ("enc", lambda: model.compress(x)),
                        ("dec", lambda: model.decompress(comp))):
            row[key] = _time(fn, dev, repeats)
            row[key + "_mem"] = mem[key]
        rows.append(row)
    del model
    gc.collect()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["phase2", "phase3"],
                   help=f"variants, or 'all' ({', '.join(MODEL_NAMES)})")
    p.add_argument("--size", default="tiny", choices=SIZES)
    p.add_argument("--sides", nargs="+", type=int, default=[256, 512])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-isolate", action="store_true", help="run everything in this process")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # one (model, side) in a fresh process: print its row as JSON
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(bench(args.models[0], args.size, args.sides, torch.device(args.device), args.repeats)))
        return 0
    models = list(MODEL_NAMES) if args.models == ["all"] else [m.lower() for m in args.models]
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    t0 = time.perf_counter()
    if args.no_isolate:
        rows = [r for m in models for r in bench(m, args.size, args.sides, dev, args.repeats)]
    else:
        rows = []
        for m in models:
            for side in args.sides:
                cmd = [sys.executable, __file__, "--worker", "--models", m, "--size", args.size, "--sides", str(side),
                       "--device", args.device, "--repeats", str(args.repeats)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"benchmark of {m} at {side}² failed:\n{out.stderr}")
                rows += json.loads(out.stdout.strip().splitlines()[-1])

    mem = "CUDA allocated" if dev.type == "cuda" else "RSS growth"
    print(f"### hpcm-triton model benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}\n")
    print(f"machine: {machine}, {platform.system()} {platform.release()}, device {dev}, "
          f"{torch.get_num_threads()} CPU threads; torch {torch.__version__}; python {platform.python_version()}  ")
    print(f"widths: {args.size}; weights: seeded, untrained; image: skimage astronaut resized; time: median of "
          f"{args.repeats} after 1 warm-up; peak memory: {mem} during one call above the loaded model, MiB\n")
    print("| model | image | params | forward s | compress s | decompress s | fwd MiB | enc MiB | dec MiB "
          "| bpp (untrained) | exact decode |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['model']} | {r['side']}² | {r['params']:,} | {r['fwd']:.3f} | {r['enc']:.3f} | {r['dec']:.3f} "
              f"| {r['fwd_mem']:.0f} | {r['enc_mem']:.0f} | {r['dec_mem']:.0f} | {r['bpp']:.3f} "
              f"| {'yes' if r['exact'] else 'NO'} |")
    by = {(r["model"], r["side"]): r for r in rows}
    if "phase2" in models and "phase3" in models:
        print("\nPhase 3 relative to Phase 2 (the phase design's 'compare' mode; its expected time −35~50 % and "
              "memory −35~40 % were never measured):\n")
        for side in args.sides:
            a, b = by[("phase2", side)], by[("phase3", side)]
            pct = lambda k: f"{100 * (b[k] / a[k] - 1):+.1f} %" if a[k] else "n/a"  # noqa: E731
            print(f"- {side}²: params {pct('params')}, forward {pct('fwd')} (memory {pct('fwd_mem')}), "
                  f"compress {pct('enc')}, decompress {pct('dec')}")
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
