"""A study worker: one task in a process of its own.

    python -m hpcm_triton.study.worker SPEC.json RESULT.json

``SPEC.json`` holds ``{"task": "measure" | "probe" | "breakdown", ...}`` (see
:func:`run_task`); the result is written to ``RESULT.json`` and progress lines go to stderr.
The worker ends itself when its parent dies. A CPU probe also watches its own size: past
1.25 × the limit + 256 MiB of growth over its size once the libraries are loaded, it records
"stopped" and exits, so that a probe far above
the limit does not exhaust the machine (the verdict "fits" itself comes from the allocator-level
peak, :mod:`hpcm_triton.study.memory`).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

TASKS = ("measure", "probe", "breakdown")


def _check_task(spec: dict) -> None:
    if spec.get("task") not in TASKS:
        raise ValueError(f"unknown study task {spec.get('task')!r}")


def run_task(spec: dict, save=None) -> dict:
    """Run one task: "measure" (:func:`~hpcm_triton.study.measure.measure`, which hands its row
    so far to ``save`` before each measurement), "probe"
    (:func:`~hpcm_triton.study.measure.probe`) or "breakdown"
    (:func:`~hpcm_triton.study.breakdown.breakdown`)."""
    _check_task(spec)
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec["task"] == "measure":
        from .measure import measure

        return measure(spec, save)
    if spec["task"] == "probe":
        from .measure import probe

        return probe(spec)
    from .breakdown import breakdown

    return breakdown(spec)


def _write(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _watch_parent() -> None:
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(143)

    threading.Thread(target=watch, name="study-parent", daemon=True).start()


def _watch_size(spec: dict, result_path: str) -> None:
    import psutil

    proc = psutil.Process()
    bound = proc.memory_info().rss + 1.25 * spec["limit"] + 256 * 2 ** 20

    def watch():
        while True:
            time.sleep(0.01)
            rss = proc.memory_info().rss
            if rss > bound:
                _write(result_path, {"side": spec["side"], "kind": spec["kind"], "fits": False, "peak_mib": None,
                                     "reason": f"stopped: the process grew past 1.25 × the limit + 256 MiB "
                                               f"({rss / 2 ** 20:,.0f} MiB resident)"})
                os._exit(0)

    threading.Thread(target=watch, name="study-size", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    spec_path, result_path = (argv if argv is not None else sys.argv[1:])[:2]
    with open(spec_path) as f:
        spec = json.load(f)
    _check_task(spec)  # before the heavy imports below
    _watch_parent()
    from . import measure  # noqa: F401  (torch and the models loaded before the size watch: not the probe's)

    if spec["task"] == "probe" and not str(spec["device"]).startswith("cuda"):
        _watch_size(spec, result_path)
    # a measure task's finished measurements are on disk before each next one starts: the
    # parent keeps them when the system kills this process (out of memory)
    save = (lambda row: _write(result_path, row)) if spec["task"] == "measure" else None
    _write(result_path, run_task(spec, save))
    return 0


if __name__ == "__main__":
    sys.exit(main())
