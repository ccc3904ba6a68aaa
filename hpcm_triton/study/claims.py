"""The phase design's expected effects (docs/architecture.md §5) and the verdict on each,
computed from a study's numbers. Torch-free.

Every claim is a change of one variant against another (HPCM-Base unless said): processing
time and memory in per cent (negative = less), PSNR in dB at equal rate (BD-PSNR, positive =
better), the parameter count in per cent. A claim "−30 to −45 %" holds where the measured change
is at least the smaller promised gain (≤ −30 %); a measured −60 % also holds (better than
promised). A claim is judged at every resolution measured and on every kind of time or memory;
its summary verdict is *confirmed* where every judged cell holds, *refuted* where none does,
*mixed* (naming the resolutions) otherwise, and *not measurable here*, with the reason, where no
cell could be judged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .variants import BASELINE

CONFIRMED, REFUTED, MIXED, NOT_MEASURABLE = "confirmed", "refuted", "mixed", "not measurable here"

# "The parameter count grows only a little": this study reads "a little" as at most +10 %.
LITTLE_GROWTH_PCT = 10.0


@dataclass(frozen=True)
class Claim:
    variant: str
    quantity: str              # "time", "memory", "psnr" or "params"
    promised: tuple            # (weakest, strongest) promised change, in ``unit``
    unit: str                  # "%" or "dB"
    against: str = BASELINE
    text: str = ""

    @property
    def lower_is_better(self) -> bool:
        return self.quantity != "psnr"

    def holds(self, change: float) -> bool:
        weakest = self.promised[0]
        return change <= weakest if self.lower_is_better else change >= weakest

    def promise(self) -> str:
        a, b = self.promised
        sign = "+" if a > 0 or (a == 0 and b > 0) else "−"
        unit = " dB" if self.unit == "dB" else " %"
        if self.quantity == "params":
            return f"\"grows only a little\" (read as ≤ +{a:g} %)"
        if a == b:
            return f"{sign}{abs(a):g}{unit}"
        return f"{sign}{abs(a):g} to {sign}{abs(b):g}{unit}"


# docs/architecture.md §5, "Expected effects claimed by the phase design".
CLAIMS = (
    Claim("phase2", "time", (-30, -45), "%", text="Phase 2 processing time −30 to −45 %"),
    Claim("phase3", "time", (-35, -50), "%", text="Phase 3 processing time −35 to −50 %"),
    Claim("phase2", "memory", (-34, -34), "%", text="Phase 2 memory −34 %"),
    Claim("phase3", "memory", (-35, -40), "%", text="Phase 3 memory −35 to −40 %"),
    Claim("phase2", "psnr", (0.2, 0.4), "dB", text="Phase 2 PSNR +0.2 to +0.4 dB"),
    Claim("phase3", "psnr", (0.25, 0.45), "dB", text="Phase 3 PSNR +0.25 to +0.45 dB"),
    Claim("phase4", "psnr", (0.05, 0.1), "dB", against="phase3", text="Phase 4 PSNR a further +0.05 to +0.1 dB"),
    *(Claim(f"phase{k}", "params", (LITTLE_GROWTH_PCT, LITTLE_GROWTH_PCT), "%",
            text=f"Phase {k} parameter count grows only a little") for k in (1, 2, 3, 4)),
)

# The study's numbers each quantity is judged on: (label, key of a measured row).
MEASURES = {
    "time": (("forward", "forward_s"), ("training step, batch 1", "train_b1_s"), ("compress", "compress_s"),
             ("decompress", "decompress_s")),
    "memory": (("forward", "forward_peak_mib"), ("training step, batch 1", "train_b1_peak_mib"),
               ("decompress", "decompress_peak_mib")),
}

LABELS = {"psnr": "BD-PSNR on the held-out images (study --train)", "params": "parameter count"}


def change_pct(value, reference) -> float | None:
    """(value / reference − 1)·100, or None where either is missing or not a positive number."""
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in (value, reference))
    return (value / reference - 1) * 100 if ok else None


def judge(claim: Claim, change: float | None, missing: str = "") -> dict:
    """The verdict on one measured change (None: not measured, ``missing`` says why)."""
    if change is None:
        return {"measured": None, "verdict": NOT_MEASURABLE, "reason": missing or "no number"}
    unit = " dB" if claim.unit == "dB" else " %"
    got = f"measured {change:+.2f}{unit}" if claim.unit == "dB" else f"measured {change:+.1f}{unit}"
    if not claim.holds(change):
        return {"measured": change, "verdict": REFUTED, "reason": f"{got}; promised {claim.promise()}"}
    strongest = claim.promised[1]
    beyond = change < strongest if claim.lower_is_better else change > strongest
    return {"measured": change, "verdict": CONFIRMED,
            "reason": f"{got}; promised {claim.promise()}" + (" (better than promised)" if beyond else "")}


def summarize(cells: list) -> dict:
    """One verdict from per-resolution cells ``[{"resolution", "verdict", "reason", ...}]``."""
    judged = [c for c in cells if c["verdict"] in (CONFIRMED, REFUTED)]
    if not judged:
        reasons = list(dict.fromkeys(c["reason"] for c in cells)) or ["nothing measured"]
        return {"verdict": NOT_MEASURABLE, "reason": "; ".join(reasons)}
    held = [c["resolution"] for c in judged if c["verdict"] == CONFIRMED]
    failed = [c["resolution"] for c in judged if c["verdict"] == REFUTED]
    if not failed:
        verdict = CONFIRMED
    elif not held:
        verdict = REFUTED
    else:
        verdict = MIXED
    parts = [f"{c['resolution']}: {c['reason']}" if c["resolution"] else c["reason"] for c in judged]
    if verdict == MIXED:
        parts.insert(0, f"holds at {', '.join(held)}; not at {', '.join(failed)}")
    return {"verdict": verdict, "reason": "; ".join(parts)}


def resolution_label(resolution) -> str:
    h, w = resolution
    return f"{h}²" if h == w else f"{h}×{w}"


def _rows_by_resolution(results: dict, variant: str) -> dict:
    v = results.get("variants", {}).get(variant) or {}
    return {resolution_label(r["resolution"]): r for r in v.get("sizes", [])}


def _why_missing(results: dict, variant: str, against: str, key: str, res: str | None) -> str:
    for name in (variant, against):
        v = results.get("variants", {}).get(name)
        if v is None:
            return f"{name} was not measured (not among the study's variants)"
        if res is not None:
            row = _rows_by_resolution(results, name).get(res)
            if row is None:
                return f"{name} was not measured at {res}"
            err = (row.get("errors") or {}).get(key) or row.get("error")
            if err:
                return f"{name} at {res}: {err}"
    return f"no {key} number"


def _widths_note(results: dict) -> str | None:
    size = results.get("study", {}).get("size")
    if size != "full":
        return (f"the study ran at {size or 'unknown'} widths; the claims are about the models at the official "
                "widths")
    return None


def evaluate_claims(results: dict) -> list:
    """Every claim of :data:`CLAIMS`, judged from ``results`` (the study's JSON): rows of
    ``{"claim", "variant", "against", "quantity", "measure", "promised", "cells", "verdict", "reason"}``."""
    rows = []
    widths = _widths_note(results)
    for claim in CLAIMS:
        measures = MEASURES[claim.quantity] if claim.quantity in MEASURES else ((LABELS[claim.quantity], None),)
        for label, key in measures:
            cells = _cells(results, claim, key, widths)
            rows.append({"claim": claim.text, "variant": claim.variant, "against": claim.against,
                         "quantity": claim.quantity, "measure": label, "promised": claim.promise(), "cells": cells,
                         **summarize(cells)})
    return rows


def _cells(results: dict, claim: Claim, key: str, widths: str | None) -> list:
    if claim.quantity == "psnr":
        return [_psnr_cell(results, claim, widths)]
    if claim.quantity == "params":
        vs = results.get("variants", {})
        a, b = (vs.get(n, {}).get("params") for n in (claim.variant, claim.against))
        change = change_pct(a, b)
        # Parameter counts do not depend on the widths' smallness in kind, but TINY counts differ.
        missing = _why_missing(results, claim.variant, claim.against, "params", None)
        if widths and change is not None:
            return [{"resolution": "", **judge(claim, None, widths), "change": change}]
        return [{"resolution": "", **judge(claim, change, missing)}]
    base_rows = _rows_by_resolution(results, claim.against)
    rows = _rows_by_resolution(results, claim.variant)
    cells = []
    for res in sorted(set(base_rows) | set(rows), key=_pixels_of):
        change = change_pct((rows.get(res) or {}).get(key), (base_rows.get(res) or {}).get(key))
        if widths:
            cells.append({"resolution": res, **judge(claim, None, widths), "change": change})
        else:
            cells.append({"resolution": res, **judge(claim, change,
                                                     _why_missing(results, claim.variant, claim.against, key, res))})
    return cells or [{"resolution": "", **judge(claim, None, "no resolution was measured")}]


def _psnr_cell(results: dict, claim: Claim, widths: str | None) -> dict:
    rd = results.get("rd")
    if not rd:
        return {"resolution": "", **judge(claim, None, "no rate–distortion run (hpcm-triton study --train STEPS)")}
    bd = (rd.get("bd") or {}).get(claim.variant, {}).get(claim.against) or {}
    if rd.get("size") != "full":
        why = (f"the RD run trained {rd.get('size')} widths for {rd.get('steps')} steps (a smoke run); the claim is "
               "about the trained models at the official widths")
        return {"resolution": "", **judge(claim, None, why), "change": bd.get("psnr_db")}
    if bd.get("psnr_db") is None:
        entry = rd.get("variants", {}).get(claim.variant) or rd.get("variants", {}).get(claim.against) or {}
        why = "; ".join(bd.get("notes") or []) or entry.get("error") or \
            f"no BD-PSNR of {claim.variant} against {claim.against} (both must be among the RD run's variants)"
        return {"resolution": "", **judge(claim, None, why)}
    return {"resolution": "", **judge(claim, bd["psnr_db"])}


def _pixels_of(label: str) -> int:
    if label.endswith("²"):
        s = int(label[:-1])
        return s * s
    h, w = label.split("×")
    return int(h) * int(w)


def ratios(results: dict) -> dict:
    """Change (%) of every measured number of every variant against HPCM-Base, per resolution:
    ``{variant: {resolution label: {key: change}}}`` (None where either side is missing)."""
    base = _rows_by_resolution(results, BASELINE)
    keys = [k for ms in MEASURES.values() for _, k in ms] + ["train_batch_s_per_image", "compress_peak_mib",
                                                              "macs_per_pixel"]
    out = {}
    for name in results.get("variants", {}):
        if name == BASELINE:
            continue
        rows = _rows_by_resolution(results, name)
        out[name] = {res: {k: change_pct(row.get(k), (base.get(res) or {}).get(k)) for k in keys}
                     for res, row in rows.items()}
        p = change_pct(results["variants"][name].get("params"), results["variants"].get(BASELINE, {}).get("params"))
        out[name]["params"] = p
    return out
