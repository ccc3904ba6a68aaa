"""The study's outputs: study.json (every number), report.md, and log–log plots of time and
memory against pixels (one line per variant), plus the RD curves of a ``--train`` run."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..outputs import atomic_write, atomic_write_bytes
from .claims import resolution_label
from .variants import BASELINE

OUTPUTS = ("report.md", "study.json", "time_vs_pixels.png", "memory_vs_pixels.png", "rd.png")
TIME_PLOTS = (("forward (eval)", "forward_s"), ("training step, batch 1", "train_b1_s"),
              ("training step per image, larger batch", "train_batch_s_per_image"), ("compress", "compress_s"),
              ("decompress", "decompress_s"))
MEMORY_PLOTS = (("forward (eval)", "forward_peak_mib"), ("training step, batch 1", "train_b1_peak_mib"),
                ("decompress", "decompress_peak_mib"))


def write(out: Path, results: dict) -> dict:
    """Write every output that has data; returns {name: path}."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    if any(v["sizes"] for v in results["variants"].values()):
        files["time plot"] = _plot(out / "time_vs_pixels.png", results, TIME_PLOTS, "seconds")
        files["memory plot"] = _plot(out / "memory_vs_pixels.png", results, MEMORY_PLOTS, "peak MiB")
    if results.get("rd") and any(e.get("results") for e in results["rd"]["variants"].values()):
        files["rd plot"] = _plot_rd(out / "rd.png", results["rd"])
    files["report"] = str(out / "report.md")
    files["json"] = str(out / "study.json")
    results = {**results, "files": {k: Path(v).name for k, v in files.items()}}
    atomic_write_bytes(out / "study.json", json.dumps(_clean(results), indent=1, allow_nan=False).encode())
    atomic_write_bytes(out / "report.md", markdown(results).encode())
    return files


def _clean(o):
    """JSON-ready: tuples as lists, non-finite floats as None."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


# ---------------------------------------------------------------- plots
def _series(results: dict, key: str):
    for name, v in results["variants"].items():
        pts = sorted((r["pixels"], r.get(key)) for r in v["sizes"] if isinstance(r.get(key), (int, float)))
        if pts:
            yield name, pts


def _plot(path: Path, results: dict, panels, ylabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a measurement no variant has (e.g. the larger batch under --batch 1) gets no empty panel
    panels = [(title, key) for title, key in panels if any(pts for _, pts in _series(results, key))] or panels[:1]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, key) in zip(axes.flat, panels):
        for i, (name, pts) in enumerate(_series(results, key)):
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], "-o", ms=4, color=f"C{i}", label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("pixels")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    st = results["study"]
    fig.suptitle(f"{st['machine']['gpu'] or st['machine']['cpu']}, {st['size']} widths, {st['threads']} threads",
                 fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return str(path)


def _plot_rd(path: Path, rd: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, e) in enumerate(rd["variants"].items()):
        r = e.get("results") or {}
        for ax, key, conv in ((axes[0], "psnr-rgb", float), (axes[1], "ms-ssim-rgb", _ms_ssim_db)):
            if key in r:
                pts = sorted(zip(r["bpp"], (conv(v) for v in r[key])))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=4, color=f"C{i}", label=name)
    axes[0].set_ylabel("PSNR-RGB (dB)")
    axes[1].set_ylabel("MS-SSIM-RGB (dB)")
    for ax in axes:
        ax.set_xlabel("bpp (y + z streams)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"held-out images, {rd['size']} widths, {rd['steps']} training steps per λ", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return str(path)


def _ms_ssim_db(v: float) -> float:
    return -10 * math.log10(1 - v) if v < 1 else float("nan")


# ---------------------------------------------------------------- markdown
def _f(v, fmt: str = "{:.3f}", none: str = "—") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return fmt.format(v)


def _pct(v) -> str:
    return _f(v, "{:+.1f} %")


def _table(head, rows) -> list:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def markdown(results: dict) -> str:
    st = results["study"]
    m = st["machine"]
    opts = st["options"]
    lines = ["# hpcm-triton study", ""]
    if st["size"] != "full":
        lines += [f"**A smoke run at {st['size']} widths**: it shows that the study runs end to end. Its numbers "
                  "say nothing about the phase design's claims, which concern the models at the official widths.", ""]
    load = lambda v: "/".join(f"{x:.1f}" for x in v) if v else "unknown"  # noqa: E731
    lines += [
        f"- command: `{st['command'] or 'run_study(...)'}`",
        f"- date: {st['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB; {m['os']}; python {m['python']}, "
        f"torch {m['torch']}" + (f"; GPU {m['gpu']}" if m["gpu"] else ""),
        f"- device: {m['device']}, {st['threads']} CPU threads; load average (1/5/15 min) at the start "
        f"{load(st['load_start'])}, at the end {load(st['load_end'])}",
        f"- widths: {st['size']}; weights: {st['weights']} (time and memory do not depend on training; the bitrate, "
        "and with it the entropy coder's share of compress and decompress, does)",
        f"- time: median of {opts['repeats']} runs after {opts['warmup']} warm-up run(s) (a training step: at least "
        "1 warm-up, so the optimiser state exists); " + ("each variant and size in its own process"
                                                         if opts["isolate"] else "all in one process (--in-process)"),
        "- MACs: torch.utils.flop_counter.FlopCounterMode (matrix products and convolutions) plus Bi-WKV4, "
        f"{st['biwkv4_flops']}" + (f" ({st['biwkv4_flops_per_element']} FLOPs per batch row, token and channel)"
                                   if st.get("biwkv4_flops_per_element") else "") + "; hpcm_triton/study/flops.py",
        f"- memory: {st['memory_method']}; a peak includes the tensors live at the start (weights, optimiser state, "
        "input)", ""]
    lines += _sizes_section(results)
    lines += _ratios_section(results)
    lines += _largest_section(results)
    if results.get("breakdown"):
        lines += _breakdown_section(results["breakdown"])
    if results.get("rd"):
        lines += _rd_section(results["rd"])
    lines += _claims_section(results)
    return "\n".join(lines) + "\n"


def _sizes_section(results: dict) -> list:
    if not any(v["sizes"] for v in results["variants"].values()):
        return []
    lines = ["## Per image size", ""]
    head = ["variant", "params", "MACs/pixel", "forward s", "train step s (batch 1)", "train s/image (batch)",
            "compress s", "decompress s", "forward MiB", "train MiB (batch 1)", "decompress MiB", "exact decode"]
    by_res = {}
    for name, v in results["variants"].items():
        for r in v["sizes"]:
            by_res.setdefault(resolution_label(r["resolution"]), []).append((name, v, r))
    for res, entries in by_res.items():
        rows = []
        for name, v, r in entries:
            if r.get("error"):
                rows.append([name, _f(v.get("params"), "{:,}"), f"failed: {r['error']}", *[""] * 9])
                continue
            batch = f"{_f(r['train_batch_s_per_image'])} ({r['train_batch']})" if r.get("train_batch") else "—"
            exact = {True: "yes", False: "NO", None: "—"}[r.get("exact_decode")]
            rows.append([name, _f(r["params"], "{:,}"), _f(r["macs_per_pixel"], "{:,.0f}"), _f(r["forward_s"]),
                         _f(r["train_b1_s"]), batch, _f(r["compress_s"]), _f(r["decompress_s"]),
                         _f(r["forward_peak_mib"], "{:,.0f}"), _f(r["train_b1_peak_mib"], "{:,.0f}"),
                         _f(r["decompress_peak_mib"], "{:,.0f}"), exact])
        pad = {tuple(r["padded"]) for _, _, r in entries if r.get("padded")}
        note = "" if len(pad) <= 1 else " (coded at " + ", ".join(sorted(f"{a}×{b}" for a, b in pad)) + ": padded)"
        lines += [f"### {res}{note}", "", *_table(head, rows), ""]
        errs = [f"- {name}: " + "; ".join(f"{k}: {e}" for k, e in r["errors"].items())
                for name, _, r in entries if r.get("errors")]
        if errs:
            lines += ["Failed or skipped measurements:", "", *errs, ""]
    lines += ["![time against pixels](time_vs_pixels.png)", "", "![memory against pixels](memory_vs_pixels.png)", ""]
    return lines


def _ratios_section(results: dict) -> list:
    rat = results.get("ratios") or {}
    if not any(res != "params" for per in rat.values() for res in per):
        return []
    lines = [f"## Against {BASELINE} (change in %, negative = less)", ""]
    head = ["variant", "size", "params", "MACs/pixel", "forward", "train step (b1)", "train per image (batch)",
            "compress", "decompress", "forward memory", "train memory (b1)", "decompress memory"]
    rows = []
    for name, per in rat.items():
        for res, c in per.items():
            if res == "params":
                continue
            rows.append([name, res, _pct(per.get("params")), _pct(c["macs_per_pixel"]), _pct(c["forward_s"]),
                         _pct(c["train_b1_s"]), _pct(c["train_batch_s_per_image"]), _pct(c["compress_s"]),
                         _pct(c["decompress_s"]), _pct(c["forward_peak_mib"]), _pct(c["train_b1_peak_mib"]),
                         _pct(c["decompress_peak_mib"])])
    return lines + _table(head, rows) + [""]


def _largest_section(results: dict) -> list:
    lg = results.get("largest") or {}
    if not lg:
        opts = results["study"]["options"]
        return [] if opts.get("memory_limit") or not opts.get("measure") else [
            "## Largest image within a memory limit", "", "Not run: no --memory-limit was given.", ""]
    first = next(iter(lg.values()))["train"]
    lines = [f"## Largest image within {first['limit_mib']:,.0f} MiB", "",
             "A doubling search from 256², then a bisection, over square sides (multiples of the variant's padding "
             "and of --probe-step), each probe in a process of its own; a probe fits when its peak (the training "
             "step at batch 1 with the optimiser state, or one decompress) stays within the limit.", ""]
    rows = []
    for name, kinds in lg.items():
        cells = []
        for kind in ("train", "decode"):
            f = kinds[kind]
            side = f"{f['largest']}²" if f["largest"] else "none"
            cells.append(side + (" or more (the search's cap)" if f["capped"] else ""))
        probes = "; ".join(f"{k}: " + ", ".join(f"{p['side']}{'✓' if p['fits'] else '✗'}" for p in kinds[k]["probes"])
                           for k in ("train", "decode"))
        rows.append([name, *cells, probes])
    return lines + _table(["variant", "train (batch 1)", "decode", "probes (✓ fits)"], rows) + [""]


def _breakdown_section(bd: dict) -> list:
    from .breakdown import ORDER, PASSES

    names = list(bd["variants"])
    ok = [n for n in names if "passes" in bd["variants"][n]]
    res = resolution_label(bd["resolution"])
    lines = [f"## Where the time goes ({res})", "",
             "Wall time per module group (median over the repeats, ms), and the change against "
             f"{BASELINE} where it was run. 'other' is the pass minus the groups (masks, quantisation, glue).", ""]
    for n in names:
        if n not in ok:
            lines += [f"- {n}: failed: {bd['variants'][n].get('error')}", ""]
    for p in PASSES:
        head = ["group", *[f"{n} ms" for n in ok], *[f"{n} Δ ms" for n in ok if n != BASELINE and BASELINE in ok]]
        rows = []
        for g in (*ORDER, "total"):
            vals = {n: (bd["variants"][n]["passes"][p]["total_s"] if g == "total"
                        else bd["variants"][n]["passes"][p]["groups"].get(g, 0.0)) for n in ok}
            if g != "total" and all(v < 5e-5 for v in vals.values()):
                continue
            deltas = [_f(1e3 * (vals[n] - vals[BASELINE]), "{:+.0f}") for n in ok if n != BASELINE and BASELINE in ok]
            rows.append([g, *[_f(1e3 * vals[n], "{:.0f}") for n in ok], *deltas])
        lines += [f"### {p}", "", *_table(head, rows), ""]
    head = ["group", *[f"{n} MACs/pixel" for n in ok]]
    groups = [g for g in ORDER if any(bd["variants"][n]["macs_by_group"].get(g) for n in ok)]
    rows = [[g, *[_f(bd["variants"][n]["macs_by_group"].get(g), "{:,.0f}") for n in ok]] for g in groups]
    return lines + ["### forward MACs per group", "", *_table(head, rows), ""]


def _rd_section(rd: dict) -> list:
    lines = ["## Rate–distortion at equal training", ""]
    if rd["size"] != "full":
        lines += [f"**A smoke run** ({rd['size']} widths, {rd['steps']} steps per λ): it shows that training, "
                  "real-bitstream evaluation and BD-rates run end to end; it says nothing about the PSNR claims.", ""]
    lines += [f"- data: {rd['data']}", f"- shared initialisation: {rd['init']}",
              f"- schedule: {rd['steps']} steps per λ, batch {rd['batch_size']}, crop {rd['crop']}², seed "
              f"{rd['seed']}; {rd['schedule']}", f"- λ: {', '.join(f'{v:g}' for v in rd['lambdas'])}", ""]
    rows = []
    for name, e in rd["variants"].items():
        r = e.get("results")
        if not r:
            rows.append([name, "—", e.get("error") or "no results", "", "", ""])
            continue
        for i, lam in enumerate(e["lambdas"]):
            missing = [None] * len(e["lambdas"])
            rows.append([name, f"{lam:g}", _f(r["bpp"][i], "{:.4f}"), _f((r.get("psnr-rgb") or missing)[i], "{:.2f}"),
                         _f((r.get("ms-ssim-rgb") or missing)[i], "{:.4f}"),
                         _f(e["training"][i]["final_loss"], "{:.4f}")])
    lines += _table(["variant", "λ", "bpp", "PSNR dB", "MS-SSIM", "final training loss"], rows) + [""]
    rows = []
    for test, anchors in rd["bd"].items():
        for anchor, b in anchors.items():
            rows.append([test, anchor, _pct(b["rate_psnr_pct"]), _pct(b["rate_msssim_pct"]),
                         _f(b["psnr_db"], "{:+.3f}"), "; ".join(b["notes"]) or ""])
    if rows:
        lines += _table(["test", "anchor", "BD-rate (PSNR)", "BD-rate (MS-SSIM)", "BD-PSNR dB", "notes"], rows) + [""]
    return lines + ["![RD curves](rd.png)", ""]


def _claims_section(results: dict) -> list:
    lines = ["## The phase design's expected effects, measured", "",
             "Claims from docs/architecture.md §5, against HPCM-Base (Phase 4's against Phase 3). A claim holds "
             "where the measured change is at least the smaller promised gain; judged at each size and on each "
             "kind of time and memory (hpcm_triton/study/claims.py).", ""]
    rows = []
    for c in results.get("claims", []):
        fmt = "{:+.2f} dB" if c["quantity"] == "psnr" else "{:+.1f} %"
        measured = ", ".join(
            f"{cell['resolution'] + ': ' if cell['resolution'] else ''}" + (
                _f(cell["measured"], fmt) if cell.get("measured") is not None
                else _f(cell.get("change"), fmt + " (not judged)"))
            for cell in c["cells"])
        rows.append([c["claim"], c["measure"], c["promised"], measured, f"**{c['verdict']}**", c["reason"]])
    return lines + _table(["claim", "measured on", "promised", "measured", "verdict", "reason"], rows) + [""]
