"""Benchmark (not a test): do ``.hpcm`` files travel between machines? (docs/bitstream.md)

Every run happens in subprocesses whose environment emulates another machine before torch is
imported: ATen's instruction set (``ATEN_CPU_CAPABILITY``), oneDNN's (``ONEDNN_MAX_CPU_ISA``),
the C Bi-WKV4 kernels built for x86-64-v2, without FMA (``HPCM_TRITON_CPU_MARCH``), or the
PyTorch scan instead of them (``HPCM_TRITON_CPU_KERNEL=0``), and 1, 2 or 3 threads.

    python bench/bench_portability.py tables            # CDF tables and seeded weights per environment
    python bench/bench_portability.py matrix            # encode in one environment, decode in others
    python bench/bench_portability.py curve             # robustness to perturbed entropy parameters
    python bench/bench_portability.py rate              # bytes the checks add
    python bench/bench_portability.py speed --baseline DIR   # decode time against DIR's code

Each prints a markdown section for bench/RESULTS.md. ``worker`` is the subprocess entry.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The emulated machines: environment variables set before torch is imported.
ENVIRONMENTS = {
    "native": {},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "onednn-sse41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "kernels-x86-64-v2": {"HPCM_TRITON_CPU_MARCH": "x86-64-v2"},
}
# glibc's libm without its FMA/AVX2 variants (x86 ifunc selection), for the tables.
GLIBC_NO_FMA = {"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2,-FMA,-AVX512F,-AVX"}
BACKENDS = {"cpu": {}, "torch": {"HPCM_TRITON_CPU_KERNEL": "0"}}
IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "hubble", "grace_hopper")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def header(title: str, command: str) -> str:
    import torch

    return (f"## {title}, {datetime.date.today().isoformat()}\n\n`{command}`, on {cpu_model()} "
            f"({os.cpu_count()} cores, shared with other jobs), torch {torch.__version__}, "
            f"{torch.backends.cpu.get_cpu_capability()}.")


# ---------------------------------------------------------------- subprocesses
class Config(dict):
    """One emulated decoder or encoder: environment name(s) (``env``, and ``also`` merged into
    it), thread count, Bi-WKV4 backend."""

    def __init__(self, env: str, threads: int, backend: str = "cpu", also: str | None = None):
        super().__init__(env=env, threads=threads, backend=backend, also=also)

    @property
    def label(self) -> str:
        env = self["env"] + (f"+{self['also']}" if self["also"] else "")
        return f"{env}/{self['threads']}t/{self['backend']}"

    def environ(self, extra: dict | None = None) -> dict:
        e = {k: v for k, v in os.environ.items()
             if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "HPCM_TRITON_CPU_MARCH",
                          "HPCM_TRITON_CPU_KERNEL", "GLIBC_TUNABLES", "OMP_NUM_THREADS")}
        e.update(ENVIRONMENTS[self["env"]])
        e.update(ENVIRONMENTS[self["also"]] if self["also"] else {})
        e.update(BACKENDS[self["backend"]])
        e.update(extra or {})
        e["OMP_NUM_THREADS"] = str(self["threads"])
        e["PYTHONWARNINGS"] = "ignore"
        return e


def run_worker(config: Config, jobs: list, extra_env: dict | None = None, pythonpath: str | None = None,
               timeout: float = 1800) -> list:
    """Run ``jobs`` in one subprocess under ``config``; their results, in order."""
    env = config.environ(extra_env)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", json.dumps({"threads": config["threads"],
                                                                               "jobs": jobs})]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    results = [json.loads(line[7:]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode or len(results) != len(jobs):
        raise RuntimeError(f"worker {config.label} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return results


def crop(name: str, side: int):
    from hpcm_triton import images as im

    x = im.bundled(name)
    H, W = x.shape[-2:]
    if min(H, W) < side:
        import torch.nn.functional as F

        s = side / min(H, W)
        x = F.interpolate(x, size=(max(side, round(H * s)), max(side, round(W * s))), mode="bilinear",
                          align_corners=False).clamp(0, 1)
        H, W = x.shape[-2:]
    top, left = (H - side) // 2, (W - side) // 2
    return x[..., top:top + side, left:left + side].contiguous()


def _worker(spec: dict) -> None:
    import hashlib

    import numpy as np
    import torch

    torch.set_num_threads(int(spec["threads"]))
    from hpcm_triton import bitstream
    from hpcm_triton import images as im
    from hpcm_triton.coding_env import environment
    from hpcm_triton.models.seeded import seeded_model

    models = {}

    def model_for(name, config=None, rule="portable"):
        key = (name, repr(config), rule)
        if key not in models:
            if config is None:
                models[key] = seeded_model(name, "full", rule=rule)
            else:
                import dataclasses

                models[key] = seeded_model(name, "full", rule=rule, **dataclasses.asdict(config))
        return models[key]

    def sha(*arrays) -> str:
        h = hashlib.sha256()
        for a in arrays:
            h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
        return h.hexdigest()[:16]

    for job in spec["jobs"]:
        op, res = job["op"], {}
        if op == "encode":
            model = model_for(job["model"], rule=job.get("rule", "portable"))
            x = crop(job["image"], job["side"])
            t0 = time.perf_counter()
            comp = model.compress(x)
            res["enc_s"] = time.perf_counter() - t0
            res["bytes"] = bitstream.write(job["file"], job["model"], model, comp)
            info = bitstream.read(job["file"], model, job["model"])
            x_hat = bitstream.decompress(info, model)
            np.save(job["recon"], im.to_uint8(x_hat).numpy())
            res["env"] = environment("cpu", None, model)
        elif op == "decode":
            info = bitstream.read(job["file"])
            model = model_for(info["model"], info["config"], job.get("rule", "portable"))
            try:
                bitstream.check(info, model, info["model"])
                t0 = time.perf_counter()
                out = bitstream.decompress(info, model, details=True)
                res["dec_s"] = time.perf_counter() - t0
                res["flips"] = out["flips"]
                np.save(job["recon"], im.to_uint8(out["x_hat"]).numpy())
            except Exception as e:  # reported, not raised: the parent tabulates failures
                res["error"] = f"{type(e).__name__}: {e}"
            res["env"] = environment("cpu", None, model)
        elif op == "time-decode":  # the golden rule's weights: the same model as an older checkout's
            if ("golden", job["model"]) not in models:
                models["golden", job["model"]] = seeded_model(job["model"], "full", rule="golden")
            model = models["golden", job["model"]]
            x = crop(job["image"], job["side"])
            comp = model.compress(x)
            times = []
            for _ in range(job["repeats"]):
                t0 = time.perf_counter()
                model.decompress(comp["strings"], comp["shape"], image_size=comp["image_size"], threads=None)
                times.append(time.perf_counter() - t0)
            res["times"] = times
        elif op == "tables":
            from hpcm_triton.entropy import ggm

            g = ggm.GeneralizedGaussian()
            st = ggm.default_scale_table()
            res["scale_table (used)"] = sha(st.numpy())
            res["scale_table (computed here)"] = sha(ggm.computed_scale_table().numpy())
            m = seeded_model("phase3", "tiny")
            res["y tables (used)"] = sha(m.quantized_cdf_y, m.cdf_length_y, m.offset_y)
            res["y tables (computed here)"] = sha(*(t.numpy() for t in g.quantized_cdfs(st)))
            for name, size in job["models"]:
                for rule in ("portable", "golden"):
                    m = seeded_model(name, size, rule=rule)
                    res[f"{name} {size} {rule}: weights"] = sha(*(p.detach().numpy() for p in m.parameters()))
                    res[f"{name} {size} {rule}: z tables"] = sha(m.quantized_cdf_z, m.cdf_length_z, m.offset_z)
            res["env"] = environment("cpu")
        else:
            raise ValueError(op)
        print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------- comparisons
def compare(enc_recon: str, dec_recon: str) -> dict:
    """Pixels of a decode against the encoder's own reconstruction (8-bit levels)."""
    import numpy as np

    a, b = np.load(enc_recon).astype(np.int16), np.load(dec_recon).astype(np.int16)
    d = np.abs(a - b)
    return {"max_level_diff": int(d.max()), "frac_off_by_1": float((d == 1).mean()), "pixels": int(d.size)}


def _run_all(jobs_by_config: dict, key: str, verb: str, log) -> dict:
    """Run each config's jobs in one subprocess; results by each job's ``key``."""
    out = {}
    for label, (cfg, jobs) in jobs_by_config.items():
        t0 = time.perf_counter()
        for job, res in zip(jobs, run_worker(cfg, jobs)):
            out[job[key]] = res
        log(f"  {verb} in {label} ({time.perf_counter() - t0:.0f} s)")
    return out


def cross_decode(pairs, models, side: int, workdir: Path, log=print, rule: str = "portable") -> list:
    """Encode with each pair's encoder, decode with its decoders; one row per (file, decoder).

    ``pairs``: [(encoder Config, image name, [decoder Config, …]), …]. Each distinct config
    runs once per phase (all its jobs in one subprocess). ``rule``: the seeded weights'."""
    enc_jobs, dec_jobs, rows = {}, {}, []
    for i, (enc, image, decs) in enumerate(pairs):
        for model in models:
            stem = workdir / f"{i}-{model}"
            enc_jobs.setdefault(enc.label, (enc, []))[1].append(
                {"op": "encode", "model": model, "image": image, "side": side, "file": f"{stem}.hpcm",
                 "recon": f"{stem}-enc.npy", "rule": rule})
            for j, dec in enumerate(decs):
                dec_jobs.setdefault(dec.label, (dec, []))[1].append(
                    {"op": "decode", "file": f"{stem}.hpcm", "recon": f"{stem}-dec{j}.npy", "rule": rule})
                rows.append({"model": model, "image": image, "encoder": enc.label, "decoder": dec.label,
                             "enc_recon": f"{stem}-enc.npy", "dec_recon": f"{stem}-dec{j}.npy",
                             "file": f"{stem}.hpcm"})
    by_file = _run_all(enc_jobs, "file", "encoded", log)
    results = _run_all(dec_jobs, "recon", "decoded", log)
    for row in rows:
        res = results[row["dec_recon"]]
        row["bytes"] = by_file[row["file"]]["bytes"]
        row["error"] = res.get("error")
        row["flips"] = res.get("flips")
        row["dec_s"] = res.get("dec_s")
        if not row["error"]:
            row.update(compare(row["enc_recon"], row["dec_recon"]))
    return rows


# ---------------------------------------------------------------- commands
def cmd_tables(args) -> str:
    configs = [("machine default", Config("native", 1), {}), ("ATEN_CPU_CAPABILITY=default", Config("aten-default", 1), {}),
               ("ATEN_CPU_CAPABILITY=avx2", Config("aten-avx2", 1), {}),
               ("glibc libm without FMA/AVX", Config("native", 1), GLIBC_NO_FMA),
               ("ATEN default + glibc without FMA, 3 threads", Config("aten-default", 3), GLIBC_NO_FMA)]
    models = [[m, "tiny"] for m in ("hpcm-base", "phase3", "phase4")] + [[m, "full"] for m in args.full]
    cols = []
    for label, cfg, extra in configs:
        (res,) = run_worker(cfg, [{"op": "tables", "models": models}], extra_env=extra)
        cols.append((label, res))
    keys = [k for k in cols[0][1] if k != "env"]
    out = [header("Portable CDF tables and seeded weights", "python bench/bench_portability.py tables"), "",
           "sha256 (first 16 hex digits) of each item, computed in a subprocess per environment. "
           "'used' is what the models code with; 'computed here' is the official arithmetic run on "
           "that machine. A cell reads '=' where it equals the first column.", "",
           "| item | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for k in keys:
        first = cols[0][1][k]
        out.append(f"| {k} | `{first}` | " + " | ".join("=" if c[1][k] == first else f"`{c[1][k]}`"
                                                         for c in cols[1:]) + " |")
    out.append("")
    out.append("capabilities seen: " + ", ".join(f"{c[0]}: {c[1]['env'].get('cpu')}" for c in cols))
    return "\n".join(out)


def matrix_pairs(images=IMAGES):
    """Every environment encodes once and decodes twice (from two other environments), with
    thread counts 1–3 and both Bi-WKV4 backends spread over the pairs."""
    envs = list(ENVIRONMENTS)
    n = len(envs)
    backends = ["cpu", "torch"]
    pairs = []
    for i, env in enumerate(envs):
        enc = Config(env, 1 + i % 3, "cpu" if env == "kernels-x86-64-v2" else backends[i % 2])
        decs = []
        for step in (1, 3):
            d_env = envs[(i + step) % n]
            d_backend = "cpu" if d_env == "kernels-x86-64-v2" else backends[(i + step) % 2]
            decs.append(Config(d_env, 1 + (i + step + 1) % 3, d_backend))
        pairs.append((enc, images[i % len(images)], decs))
    return pairs


def fan_out_pairs(images):
    """Each image encoded on the machine's defaults (2 threads, C kernels) and decoded in every
    other environment (threads 1–3 and both backends spread over them)."""
    decs = [Config(env, 1 + i % 3, "cpu" if env == "kernels-x86-64-v2" else ("torch", "cpu")[i % 2])
            for i, env in enumerate(e for e in ENVIRONMENTS if e != "native")]
    decs.append(Config("aten-avx2", 2, "cpu", also="onednn-sse41"))
    return [(Config("native", 2, "cpu"), image, decs) for image in images]


def _matrix_table(rows) -> list[str]:
    out = ["| model | image | encoder | decoder | bytes | decodes | flips repaired (per step) | max Δ level "
           "| pixels off by 1 |", "|---|---|---|---|---:|---|---|---:|---:|"]
    for r in rows:
        if r["error"]:
            out.append(f"| {r['model']} | {r['image']} | {r['encoder']} | {r['decoder']} | {r['bytes']:,} | "
                       f"**no**: {r['error'][:120]} | | | |")
            continue
        flips = r["flips"][0]
        out.append(f"| {r['model']} | {r['image']} | {r['encoder']} | {r['decoder']} | {r['bytes']:,} | yes | "
                   f"{sum(flips)} ({' '.join(map(str, flips))}) | {r['max_level_diff']} | "
                   f"{r['frac_off_by_1']:.2e} |")
    return out


def cmd_matrix(args) -> str:
    t0 = time.perf_counter()
    pairs = fan_out_pairs(args.images) if args.fan_out else matrix_pairs(args.images)
    with tempfile.TemporaryDirectory() as d:
        rows = cross_decode(pairs, args.models, args.side, Path(d), log=lambda s: print(s, file=sys.stderr),
                            rule=args.rule)
    ok = [r for r in rows if not r["error"] and r["max_level_diff"] <= 1]
    command = "python bench/bench_portability.py " + " ".join(sys.argv[1:])
    out = [header("Portable .hpcm files: cross-environment decoding", command), "",
           f"Full widths, seeded (untrained) weights by the {args.rule} rule, {args.side}² centre crops. "
           "Environment/threads/Bi-WKV4 "
           "backend (cpu = C kernels, torch = PyTorch scan). A decode counts when every y step's check "
           "matched (after repairs) and the decoded symbols re-encode to the file's bytes; pixels are "
           "compared with the encoder's own reconstruction in 8-bit levels.", ""]
    out += _matrix_table(rows)
    off = [r["frac_off_by_1"] for r in rows if not r["error"]]
    out += ["", f"{len(ok)} of {len(rows)} decodes succeeded with every pixel within ±1 level; flips repaired: "
            f"{sum(sum(r['flips'][0]) for r in rows if not r['error'])} in total; fraction of pixels off by 1: "
            f"mean {statistics.mean(off) if off else 0:.2e}, max {max(off) if off else 0:.2e}. "
            f"(total {time.perf_counter() - t0:.0f} s)"]
    return "\n".join(out)


def cmd_curve(args) -> str:
    import numpy as np
    import torch

    from hpcm_triton import bitstream
    from hpcm_triton import images as im
    from hpcm_triton.models.coding import perturbed_decoding
    from hpcm_triton.models.seeded import seeded_model

    torch.set_num_threads(args.threads)
    from hpcm_triton.entropy import coder

    checked = coder.DecodeSession._checked
    spent = [0.0]

    def timed(self, *a):  # the step checks and, where needed, the search: what portability adds to a decode
        t0 = time.perf_counter()
        try:
            return checked(self, *a)
        finally:
            spent[-1] += time.perf_counter() - t0

    coder.DecodeSession._checked = timed
    files = []
    for name in args.models:
        model = seeded_model(name, "full")
        for image in args.images:
            comp = model.compress(crop(image, args.side))
            info = bitstream.from_bytes(bitstream.to_bytes(name, model, comp))
            ref = im.to_uint8(bitstream.decompress(info, model)).numpy().astype(np.int16)
            files.append((name, image, model, info, ref))
        print(f"  encoded {name}", file=sys.stderr)
    rows = []
    for eps in args.eps:
        flips, times, failed, worst_px, checks_s = [], [], [], 0, []
        for i, (name, image, model, info, ref) in enumerate(files):
            with perturbed_decoding(model, eps, seed=1000 + i):
                spent.append(0.0)
                t0 = time.perf_counter()
                try:
                    out = bitstream.decompress(info, model, details=True)
                except Exception as e:
                    failed.append(f"{name}/{image}: {type(e).__name__}")
                    continue
                finally:
                    times.append(time.perf_counter() - t0)
                    checks_s.append(spent[-1])
            flips.append(out["flips_total"])
            worst_px = max(worst_px, int(np.abs(im.to_uint8(out["x_hat"]).numpy().astype(np.int16) - ref).max()))
        rows.append({"eps": eps, "ok": len(files) - len(failed), "n": len(files), "flips": flips, "times": times,
                     "failed": failed, "worst_px": worst_px, "checks_s": checks_s})
        print(f"  eps {eps:g}: {len(files) - len(failed)}/{len(files)}, flips {flips}", file=sys.stderr)
    coder.DecodeSession._checked = checked
    good = [r["eps"] for r in rows if r["ok"] == r["n"]]
    out = [header("Portable .hpcm files: robustness to perturbed entropy parameters",
                  "python bench/bench_portability.py curve"), "",
           f"{len(args.images)} images ({', '.join(args.images)}; {args.side}² centre crops) × {len(args.models)} "
           f"variants ({', '.join(args.models)}), full widths, seeded weights, {args.threads} threads. The decoder "
           "multiplies every y step's scales and means by (1 + ε·N(0, 1)) (seeded; "
           "`hpcm_triton.models.coding.perturbed_decoding`); a file counts when it decodes with every step's "
           "check matched and its symbols re-encoding to the file's bytes.", "",
           "'checks + search' is the time spent checking each step's indexes and, where they miss, ranking "
           "candidates and searching (per file, mean and max), against the whole decode; the machine is shared, "
           "so decode times drift from row to row, the checks' share does not.", "",
           "| ε | files decoded | flips repaired per file: mean | worst | decode s (mean) | checks + search ms: "
           "mean | max | share of decode | max Δ level | failures |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        f = r["flips"] or [0]
        t, c = statistics.mean(r["times"]), r["checks_s"]
        out.append(f"| {r['eps']:g} | {r['ok']}/{r['n']} | {statistics.mean(f):.1f} | {max(f)} | {t:.2f} | "
                   f"{1e3 * statistics.mean(c):.1f} | {1e3 * max(c):.1f} | {100 * statistics.mean(c) / t:.2f} % | "
                   f"{r['worst_px']} | {'; '.join(r['failed']) or '—'} |")
    out += ["", f"Largest ε with every file decoded: {max(good) if good else 'none'} (of those tried)."]
    return "\n".join(out)


def cmd_rate(args) -> str:
    import torch

    from hpcm_triton import bitstream
    from hpcm_triton.models.seeded import seeded_model

    torch.set_num_threads(args.threads)
    check_bytes = 2 + 8 * bitstream._CHECKED["y"]  # step counts + one u64 per y step
    v2_bytes = 2 + 2 * (bitstream._STEPS["y"] + bitstream._STEPS["z"])
    out = [header("Portable .hpcm files: bytes the index checks add", "python bench/bench_portability.py rate"), "",
           f"Per image, format 3 spends {check_bytes} bytes on the step checks (format 2: {v2_bytes}). "
           "Files of the seeded full-width models (untrained: their rate is far above a trained model's):", "",
           "| model | image | file bytes | bpp | checks / file |", "|---|---|---:|---:|---:|"]
    for name in args.models:
        model = seeded_model(name, "full")
        for image, side in (("astronaut", 256), ("astronaut", 512)):
            x = crop(image, side)
            n = len(bitstream.to_bytes(name, model, model.compress(x)))
            out.append(f"| {name} | {image} {side}² | {n:,} | {8 * n / side ** 2:.3f} | {100 * check_bytes / n:.3f} % |")
    out += ["", "At a trained model's rate (the checks do not change with the rate):", "",
            "| bpp | 256² file | checks / file | 512² file | checks / file |", "|---:|---:|---:|---:|---:|"]
    for bpp in (0.1, 0.2, 0.3, 0.5):
        a, b = bpp * 256 ** 2 / 8, bpp * 512 ** 2 / 8
        out.append(f"| {bpp} | {a:,.0f} | {100 * check_bytes / a:.2f} % | {b:,.0f} | {100 * check_bytes / b:.2f} % |")
    return "\n".join(out)


def cmd_speed(args) -> str:
    """Decode time of this tree and of ``--baseline`` (another checkout), alternating subprocesses."""
    times = {"before": {}, "after": {}}
    cfg = Config("native", args.threads)
    for rnd in range(args.rounds):
        for which, path in (("before", args.baseline), ("after", str(ROOT))):
            for name in args.models:
                job = {"op": "time-decode", "model": name, "image": "astronaut", "side": args.side,
                       "repeats": args.repeats}
                if which == "after":
                    (res,) = run_worker(cfg, [job], pythonpath=path, timeout=3600)
                else:
                    (res,) = _baseline_worker(cfg, job, path)
                times[which].setdefault(name, []).extend(res["times"])
            print(f"  round {rnd + 1}: " + ", ".join(f"{w} {n} {min(v):.3f}" for w in times
                                                   for n, v in times[w].items()), file=sys.stderr)
    out = [header("Portable .hpcm files: decode time before/after", "python bench/bench_portability.py speed"), "",
           f"`model.decompress` of one {args.side}² astronaut crop, full widths, {args.threads} threads, no flips; "
           f"{args.rounds} alternating subprocess rounds × {args.repeats} decodes per code base. 'before' is "
           f"{args.baseline_label}.", "",
           "| model | before: min s | median s | after: min s | median s | after/before (min) | (median) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name in args.models:
        b, a = times["before"][name], times["after"][name]
        out.append(f"| {name} | {min(b):.3f} | {statistics.median(b):.3f} | {min(a):.3f} | {statistics.median(a):.3f} "
                   f"| {min(a) / min(b):.3f} | {statistics.median(a) / statistics.median(b):.3f} |")
    out += ["", "What the step checks themselves cost per decode (full widths: 2 + 3 + 6 steps of 1/32, 1/16 and 1/8 "
            "of the (side/16)²·320 positions; min of 20, in this process):", "",
            "| image | format 2: CRC32 per step | format 3: 62-bit check per step |", "|---|---:|---:|"]
    for side in (256, 512):
        crc, new = _check_costs(side)
        out.append(f"| {side}² | {1e3 * crc:.2f} ms | {1e3 * new:.2f} ms |")
    return "\n".join(out)


def _check_costs(side: int, repeats: int = 20) -> tuple[float, float]:
    """(CRC32, 62-bit check) seconds for one decode's 11 y steps at full widths."""
    import numpy as np

    from hpcm_triton.entropy import checks

    total = (side // 16) ** 2 * 320
    sizes = [total // 32] * 2 + [total // 16] * 3 + [total // 8] * 6
    rng = np.random.default_rng(0)
    steps = [rng.integers(0, 60, n).astype(np.int32) for n in sizes]
    best = []
    for check in (lambda idx, k: checks.index_crc(idx), checks.index_check):
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for k, idx in enumerate(steps):
                check(idx, k)
            ts.append(time.perf_counter() - t0)
        best.append(min(ts))
    return best[0], best[1]


_BASELINE_WORKER = r"""
import json, sys, time, torch
sys.path.insert(0, {bench!r})
torch.set_num_threads({threads})
from bench_portability import crop
sys.path.insert(0, {root!r})  # ahead of the tree bench_portability put first
import hpcm_triton
assert hpcm_triton.__file__.startswith({root!r}), hpcm_triton.__file__
from hpcm_triton.models.seeded import seeded_model
job = json.loads({job!r})
model = seeded_model(job["model"], "full")
comp = model.compress(crop(job["image"], job["side"]))
times = []
for _ in range(job["repeats"]):
    t0 = time.perf_counter()
    model.decompress(comp["strings"], comp["shape"], image_size=comp["image_size"], threads=None)
    times.append(time.perf_counter() - t0)
print("RESULT " + json.dumps({{"times": times}}))
"""


def _baseline_worker(cfg: Config, job: dict, path: str):
    """The timing job on another checkout (its own seeded_model; ``crop`` from this file)."""
    code = _BASELINE_WORKER.format(root=path, bench=str(Path(__file__).resolve().parent), threads=cfg["threads"],
                                   job=json.dumps(job))
    env = cfg.environ()
    env["PYTHONPATH"] = path
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600,
                       cwd=path)
    res = [json.loads(line[7:]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode or not res:
        raise RuntimeError(f"baseline worker failed:\n{r.stderr[-3000:]}")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("spec")
    t = sub.add_parser("tables")
    t.add_argument("--full", nargs="*", default=["hpcm-base", "phase3"], help="variants also built at full widths")
    m = sub.add_parser("matrix")
    m.add_argument("--models", nargs="+", default=["hpcm-base", "phase3"])
    m.add_argument("--side", type=int, default=256)
    m.add_argument("--images", nargs="+", default=list(IMAGES))
    m.add_argument("--rule", default="portable", choices=["portable", "golden"])
    m.add_argument("--fan-out", action="store_true", help="encode each image on the machine's defaults and decode "
                   "it in every other environment")
    c = sub.add_parser("curve")
    c.add_argument("--models", nargs="+", default=["hpcm-base", "phase3"])
    c.add_argument("--images", nargs="+", default=list(IMAGES))
    c.add_argument("--side", type=int, default=256)
    c.add_argument("--eps", nargs="+", type=float, default=[0, 1e-6, 1e-5, 3e-5, 5e-5, 7e-5, 1e-4])
    c.add_argument("--threads", type=int, default=os.cpu_count())
    r = sub.add_parser("rate")
    r.add_argument("--models", nargs="+", default=["hpcm-base", "phase3"])
    r.add_argument("--threads", type=int, default=os.cpu_count())
    s = sub.add_parser("speed")
    s.add_argument("--baseline", required=True, help="a checkout of the code to compare with")
    s.add_argument("--baseline-label", default="the baseline checkout")
    s.add_argument("--models", nargs="+", default=["hpcm-base", "phase3"])
    s.add_argument("--side", type=int, default=256)
    s.add_argument("--threads", type=int, default=os.cpu_count())
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.cmd == "worker":
        _worker(json.loads(args.spec))
        return 0
    print({"tables": cmd_tables, "matrix": cmd_matrix, "curve": cmd_curve, "rate": cmd_rate,
           "speed": cmd_speed}[args.cmd](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
