"""The whole study: workers per variant and size, the largest-image searches, the breakdown,
the RD run, then the report (``hpcm-triton study``)."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from ..models.config import PRESETS
from ..outputs import temporary_folder
from ..progress import StepProgress
from . import claims, report, variants
from .search import largest_fitting

SEARCH_START = 256  # the first side each largest-image search probes


class Runner:
    """Runs worker tasks (:mod:`hpcm_triton.study.worker`) in processes of their own, or in this
    process (``isolate=False``); worker progress lines go through ``bar``."""

    def __init__(self, opts: dict, bar: StepProgress):
        self.isolate, self.threads, self.bar = opts["isolate"], opts.get("threads"), bar

    def run(self, spec: dict) -> dict:
        spec = {**spec, "threads": self.threads}
        if not self.isolate:
            from .worker import run_task

            return run_task(spec)
        with temporary_folder("hpcm-study-") as tmp:  # removed also when SIGINT/SIGTERM end the command
            spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
            spec_path.write_text(json.dumps(spec))
            env = dict(os.environ)
            if self.threads:
                env["OMP_NUM_THREADS"] = str(self.threads)
            proc = subprocess.Popen([sys.executable, "-m", "hpcm_triton.study.worker", str(spec_path),
                                     str(result_path)], stderr=subprocess.PIPE, text=True, env=env)
            last = ""
            for line in proc.stderr:
                line = line.rstrip()
                if line:
                    last = line
                    self.bar.write(f"  {line}")
            return read_result(result_path, proc.wait(), last)


def read_result(path: Path, rc: int, last: str = "") -> dict:
    """A worker's result after it exited with status ``rc`` (``last``: its last progress line).
    A worker killed during a measurement leaves the row it had finished, marked
    ``"unfinished": key``: that measurement is recorded as failed and the others stand."""
    killed = rc in (-9, 137)  # SIGKILL: the out-of-memory killer; its last line says nothing about it
    why = "killed by the system (out of memory?)" if killed else f"status {rc}"
    error = f"worker ended with {why}" + (f": {last[:200]}" if last else "")
    if not path.exists():
        return {"error": error}
    result = json.loads(path.read_text())
    key = result.pop("unfinished", None)
    if key is not None:
        result["errors"][key] = f"worker ended with {why}" if killed else error
    return result


def machine(device: str) -> dict:
    """What the numbers were measured on (no host name)."""
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2 ** 30,
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": device, "gpu": None}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _check(opts: dict) -> None:
    import torch

    try:
        dev = torch.device(opts["device"])
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {opts['device']}: not a device name (cpu, cuda, cuda:1, …)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {opts['device']}: no CUDA GPU is available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {opts['device']}: only cpu and cuda are supported")
    for v in opts["variants"]:
        variants.resolve(v)
    if not (opts["measure"] or opts.get("breakdown") or opts.get("train")):
        raise ValueError("--no-measure without --breakdown or --train leaves nothing to do")


def run_study(opts: dict) -> dict:
    """Run the study ``opts`` describes (:func:`hpcm_triton.study.args.to_options`); write
    report.md, study.json and the plots to ``opts["out"]``; return the results."""
    import torch

    from ..outputs import check_output, check_output_folder

    _check(opts)
    out = check_output_folder(opts["out"])
    if out.is_dir():
        for f in report.OUTPUTS:
            check_output(out / f, force=opts["force"])
    threads = opts.get("threads") or torch.get_num_threads()
    results = {
        "study": {"version": 1, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(["hpcm-triton", *sys.argv[1:]]) if sys.argv[1:2] == ["study"] else None,
                  "machine": machine(opts["device"]), "size": opts["size"], "threads": threads,
                  "load_start": os.getloadavg() if hasattr(os, "getloadavg") else None, "load_end": None,
                  "weights": "seeded, untrained (hpcm_triton.models.seeded)",
                  "options": {k: v for k, v in opts.items() if k not in ("out", "force")}},
        "variants": {}, "largest": {}, "breakdown": None, "rd": None,
    }
    from .flops import FWD_FLOPS_PER_ELEMENT, biwkv4_counting
    from .memory import method

    results["study"]["biwkv4_flops"] = biwkv4_counting()
    results["study"]["biwkv4_flops_per_element"] = FWD_FLOPS_PER_ELEMENT
    results["study"]["memory_method"] = method(opts["device"])
    sizes = [tuple(r) for r in opts["resolutions"]] if opts["measure"] else []
    total = len(opts["variants"]) * (len(sizes) + (1 if opts.get("breakdown") else 0))
    bar = StepProgress(total, "study")
    runner = Runner(opts, bar)
    done = 0
    try:
        for v in opts["variants"]:
            name, overrides = variants.resolve(v)
            entry = {"model": name, "overrides": overrides,
                     "config": dataclasses.asdict(PRESETS[name].with_(**overrides)),
                     "params": _params(v, opts["size"]), "sizes": []}
            results["variants"][v] = entry
            for res in sizes:
                bar.write(f"study: {v} at {res[0]}×{res[1]} ({opts['size']} widths)")
                row = runner.run({"task": "measure", "variant": v, "size": opts["size"], "device": opts["device"],
                                  "resolution": list(res), "warmup": opts["warmup"], "repeats": opts["repeats"],
                                  "batch": opts["batch"], "memory_limit": opts.get("memory_limit")})
                if "error" in row and "forward_s" not in row:
                    from .measure import empty_row

                    row = empty_row(res, row["error"])
                entry["sizes"].append(row)
                done += 1
                bar.update_to(done)
        if opts["measure"] and opts.get("memory_limit"):
            for v in opts["variants"]:
                results["largest"][v] = {kind: _search(runner, bar, opts, v, kind) for kind in ("train", "decode")}
        if opts.get("breakdown"):
            results["breakdown"] = {"resolution": list(opts["breakdown"]), "variants": {}}
            for v in opts["variants"]:
                bar.write(f"study: breakdown of {v} at {opts['breakdown'][0]}×{opts['breakdown'][1]}")
                results["breakdown"]["variants"][v] = runner.run(
                    {"task": "breakdown", "variant": v, "size": opts["size"], "device": opts["device"],
                     "resolution": list(opts["breakdown"]), "warmup": opts["warmup"], "repeats": opts["repeats"]})
                done += 1
                bar.update_to(done)
    finally:
        bar.close()
    if opts.get("train"):
        from .rd import run_rd

        results["rd"] = run_rd(opts, out / "rd", say=lambda s: print(s, file=sys.stderr))
    results["study"]["load_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["ratios"] = claims.ratios(results)
    results["claims"] = claims.evaluate_claims(results)
    results["files"] = report.write(out, results)
    return results


def _params(variant: str, size: str) -> int:
    """The variant's parameter count, from a model built on the meta device (shapes only)."""
    import torch

    from ..models.config import size_overrides
    from ..models.zoo import get_model

    name, overrides = variants.resolve(variant)
    with torch.device("meta"):
        model = get_model(name, **{**size_overrides(size), **overrides})
    return sum(p.numel() for p in model.parameters())


def _search(runner: Runner, bar: StepProgress, opts: dict, variant: str, kind: str) -> dict:
    """The largest square side ``variant`` trains on (batch 1) or decodes within the memory limit."""
    step = max(opts["probe_step"], variants.pad_multiple(variant))
    details = {}

    def fits(side: int) -> bool:
        bar.write(f"study: {variant}: does a {kind} at {side}² fit {opts['memory_limit'] / 2 ** 20:,.0f} MiB?")
        r = runner.run({"task": "probe", "kind": kind, "variant": variant, "size": opts["size"],
                        "device": opts["device"], "side": side, "limit": opts["memory_limit"]})
        details[side] = r
        bar.write(f"  {side}²: {'fits' if r.get('fits') else 'does not fit'} ({r.get('reason') or r.get('error')})")
        return bool(r.get("fits"))

    found = largest_fitting(fits, start=max(SEARCH_START, step), step=step, limit=max(opts["probe_max"], step))
    found["probes"] = [{"side": s, "fits": ok, "peak_mib": details[s].get("peak_mib"),
                        "reason": details[s].get("reason") or details[s].get("error")} for s, ok in found["probes"]]
    found["limit_mib"] = opts["memory_limit"] / 2 ** 20
    found["step"] = step
    return found
