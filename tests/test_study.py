"""The study's plumbing (hpcm_triton/study, docs/study.md) at TINY widths and small sizes:
it runs end to end, its JSON has every field, verdicts follow the numbers, the largest-image
search, and the Bi-WKV4 MAC count. Speed and memory are reported by the study, never asserted."""
import json

import pytest
import torch

from hpcm_triton.study import claims, flops, search
from hpcm_triton.study.measure import ROW_KEYS


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


# ---------------------------------------------------------------- Bi-WKV4 MACs
def test_biwkv4_flop_formula():
    from kernels_triton.custom_op import FWD_FLOPS_PER_ELEMENT

    assert FWD_FLOPS_PER_ELEMENT == 17  # docs/biwkv4.md §2, tallied in kernels_triton/custom_op.py
    assert flops.biwkv4_flops(2, 15, 8) == 17 * 2 * 15 * 8


@pytest.mark.parametrize("counting", [flops.REGISTERED, flops.ANALYTIC])
def test_forward_macs_count_biwkv4_once_per_call(monkeypatch, counting):
    """Either way of counting gives Bi-WKV4's 8.5 MACs per element, once per SpatialMix call,
    also where blocks and cells call SpatialMix through forward_tokens (no module hook fires)."""
    from hpcm_triton.rwkv import RWKVContextCell, RWKVFusionBlock, SpatialMix

    if flops.biwkv4_counting() != flops.REGISTERED:
        pytest.skip("the Bi-WKV4 operator has no flop formula here")
    monkeypatch.setattr(flops, "biwkv4_counting", lambda: counting)
    B, C, H, W = 2, 8, 3, 5
    T = H * W
    m = SpatialMix(C).eval()
    with torch.no_grad(), flops.ForwardMacs(m) as c:
        m(torch.randn(B, C, H, W))
    assert c.biwkv4 == counting and c.biwkv4_macs == 8.5 * B * T * C
    if counting == flops.REGISTERED:  # 4 Linear C→C, the fused depthwise 5×5 OmniShift (eval), Bi-WKV4
        assert c.macs == 4 * B * T * C * C + 25 * B * C * T + 8.5 * B * T * C
    else:
        assert "_mix" not in vars(m)  # the counting wrapper is gone after the block
    for mod in (RWKVFusionBlock(C, 2).eval(), RWKVContextCell(C, 2).eval()):
        args = [torch.randn(B, C, H, W)] * (2 if isinstance(mod, RWKVContextCell) else 1)
        with torch.no_grad(), flops.ForwardMacs(mod) as c:
            mod(*args)
        assert c.biwkv4_macs == 8.5 * B * T * C


# ---------------------------------------------------------------- the largest-image search
@pytest.mark.parametrize("threshold,start,step,limit,want,capped", [
    (1000, 256, 128, 4096, 896, False),   # doubles 256 → 512 → 1024 (fails), bisects to 896
    (10_000, 256, 128, 1000, 896, True),  # every probe fits: the cap (snapped to the step) is the answer
    (100, 256, 128, 4096, None, False),   # nothing fits
    (130, 256, 64, 4096, 128, False),     # start fails: bisect below it
    (256, 256, 256, 8192, 256, False),
])
def test_largest_fitting(threshold, start, step, limit, want, capped):
    calls = []

    def fits(s):
        calls.append(s)
        return s <= threshold

    r = search.largest_fitting(fits, start=start, step=step, limit=limit)
    assert r["largest"] == want and r["capped"] is capped
    assert [p[0] for p in r["probes"]] == calls and len(set(calls)) == len(calls)  # no side probed twice
    assert all(s % step == 0 for s in calls) and len(calls) <= 12
    with pytest.raises(ValueError):
        search.largest_fitting(fits, start=64, step=128, limit=1024)


# ---------------------------------------------------------------- verdicts from numbers
def _results(fwd_changes, size="full", params=(100, 130)):
    """Synthetic study results: hpcm-base and phase3, forward time 1.0 s for the base."""
    def rows(change):
        return [{"resolution": [s, s], "forward_s": None if c is None else 1.0 * (1 + c / 100), "errors": {}}
                for s, c in change.items()]

    return {"study": {"size": size},
            "variants": {"hpcm-base": {"params": params[0], "sizes": rows({s: 0 for s in fwd_changes})},
                         "phase3": {"params": params[1], "sizes": rows(fwd_changes)}}}


def _verdict(results, claim, measure):
    return next(r for r in claims.evaluate_claims(results) if r["claim"] == claim and r["measure"] == measure)


@pytest.mark.parametrize("changes,verdict", [
    ({256: -40.0, 1024: -36.0}, claims.CONFIRMED),
    ({256: -60.0}, claims.CONFIRMED),            # better than promised still holds
    ({256: -20.0, 1024: 15.0}, claims.REFUTED),
    ({256: 10.0, 1024: -40.0}, claims.MIXED),
    ({256: None}, claims.NOT_MEASURABLE),
])
def test_time_verdict_follows_the_numbers(changes, verdict):
    row = _verdict(_results(changes), "Phase 3 processing time −35 to −50 %", "forward")
    assert row["verdict"] == verdict
    if verdict == claims.MIXED:
        assert "holds at 1024²" in row["reason"] and "not at 256²" in row["reason"]
    for cell in row["cells"]:
        if cell["measured"] is not None:
            assert cell["measured"] == pytest.approx(changes[int(cell["resolution"][:-1])])


def test_verdicts_need_full_widths_and_the_measured_variants():
    tiny = _verdict(_results({256: -40.0}, size="tiny"), "Phase 3 processing time −35 to −50 %", "forward")
    assert tiny["verdict"] == claims.NOT_MEASURABLE and "widths" in tiny["reason"]
    p2 = _verdict(_results({256: -40.0}), "Phase 2 processing time −30 to −45 %", "forward")
    assert p2["verdict"] == claims.NOT_MEASURABLE and "phase2 was not measured" in p2["reason"]
    grows = "Phase 3 parameter count grows only a little"
    assert _verdict(_results({256: 0}, params=(100, 130)), grows, "parameter count")["verdict"] == claims.REFUTED
    assert _verdict(_results({256: 0}, params=(100, 105)), grows, "parameter count")["verdict"] == claims.CONFIRMED


def test_psnr_verdict_from_bd_psnr():
    res = _results({256: 0})
    claim = "Phase 3 PSNR +0.25 to +0.45 dB"
    assert _verdict(res, claim, claims.LABELS["psnr"])["verdict"] == claims.NOT_MEASURABLE
    for value, verdict in ((0.3, claims.CONFIRMED), (0.1, claims.REFUTED), (-0.5, claims.REFUTED)):
        res["rd"] = {"size": "full", "steps": 10, "variants": {},
                     "bd": {"phase3": {"hpcm-base": {"psnr_db": value, "notes": []}}}}
        assert _verdict(res, claim, claims.LABELS["psnr"])["verdict"] == verdict
    res["rd"]["size"] = "tiny"
    row = _verdict(res, claim, claims.LABELS["psnr"])
    assert row["verdict"] == claims.NOT_MEASURABLE and row["cells"][0]["change"] == -0.5


def test_change_pct():
    assert claims.change_pct(1.2, 1.0) == pytest.approx(20.0)
    assert claims.change_pct(None, 1.0) is None and claims.change_pct(1.0, 0) is None


# ---------------------------------------------------------------- the command line
@pytest.mark.parametrize("argv,msg", [
    (["--resolutions", "10"], "each side must be between 64"),
    (["--memory-limit", "3Q"], "not a memory size"),
    (["--variants", "phase9"], "invalid choice"),
    (["--repeats", "0"], "must be at least 1"),
    (["--lambdas", "-1"], "must be a positive number"),
])
def test_bad_flags_end_in_one_line(capsys, argv, msg):
    from hpcm_triton.cli import main

    with pytest.raises(SystemExit) as e:
        main(["study", *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and msg in err and err.startswith("hpcm-triton: error:")


def test_nothing_to_do_is_a_one_line_error(capsys, tmp_path):
    from hpcm_triton.cli import main

    assert main(["study", "--no-measure", "--out", str(tmp_path)]) == 2
    assert "leaves nothing to do" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end
STUDY_KEYS = {"version", "date", "command", "machine", "size", "threads", "load_start", "load_end", "weights",
              "options", "biwkv4_flops", "memory_method"}


def test_study_end_to_end_tiny(tmp_path):
    """Measurements, the search, the breakdown and a 1-step RD run of HPCM-Base and the fork-cell
    Phase 3 at TINY widths, in this process; the JSON has every field, the report every section."""
    from hpcm_triton import images as im
    from hpcm_triton.study import run_study
    from hpcm_triton.study.args import DEFAULT_LAMBDAS

    for sub, name, box in (("train", "astronaut", (0, 0, 96, 96)), ("held", "chelsea", (100, 150, 64, 96))):
        (tmp_path / sub).mkdir()
        t, left, h, w = box
        im.save_image(im.bundled(name)[..., t:t + h, left:left + w], tmp_path / sub / f"{name}.png")
    opts = {"variants": ["hpcm-base", "phase3-forkcell"], "size": "tiny", "resolutions": [[128, 128]],
            "device": "cpu", "threads": 1, "repeats": 1, "warmup": 0, "batch": 2, "memory_limit": 256 * 2 ** 20,
            "probe_max": 128, "probe_step": 128, "breakdown": [128, 128], "measure": True, "train": 1,
            "lambdas": list(DEFAULT_LAMBDAS[:2]), "crop": 64, "train_batch": 1, "train_data": str(tmp_path / "train"),
            "heldout": str(tmp_path / "held"), "init_official": None, "seed": 0, "max_images": 1,
            "out": str(tmp_path / "out"), "force": False, "isolate": False}
    run_study(opts)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"report.md", "study.json", "time_vs_pixels.png", "memory_vs_pixels.png",
                                               "rd.png", "rd"}
    d = json.loads((out / "study.json").read_text())
    assert set(d) >= {"study", "variants", "largest", "breakdown", "rd", "ratios", "claims", "files"}
    assert set(d["study"]) >= STUDY_KEYS and d["study"]["biwkv4_flops"] == flops.biwkv4_counting()
    for name, v in d["variants"].items():
        assert set(v) >= {"model", "overrides", "config", "params", "sizes"}
        (row,) = v["sizes"]
        assert set(row) >= set(ROW_KEYS), set(ROW_KEYS) - set(row)
        assert not row["errors"], row["errors"]
        for k in ("macs_per_pixel", "forward_s", "compress_s", "decompress_s", "train_b1_s", "forward_peak_mib",
                  "train_b1_peak_mib", "decompress_peak_mib"):
            assert isinstance(row[k], (int, float)) and row[k] > 0, (name, k)
        assert row["exact_decode"] is True and row["train_batch"] == 2
    assert d["variants"]["phase3-forkcell"]["config"]["cells"] == ["rwkv-fork"] * 3
    assert d["variants"]["phase3-forkcell"]["sizes"][0]["biwkv4_macs_per_pixel"] > 0
    for name in opts["variants"]:
        for kind in ("train", "decode"):
            f = d["largest"][name][kind]
            assert set(f) >= {"largest", "capped", "probes", "limit_mib", "step"} and f["probes"]
            assert all(set(p) >= {"side", "fits", "peak_mib", "reason"} for p in f["probes"])
        bd = d["breakdown"]["variants"][name]
        assert set(bd["passes"]) == {"forward", "compress", "decompress"}
        assert bd["passes"]["compress"]["groups"]["entropy coding"] > 0
    rd = d["rd"]
    assert set(rd["variants"]["hpcm-base"]["results"]) >= {"bpp", "psnr-rgb"}
    assert "not trained" in rd["variants"]["phase3-forkcell"]["error"]
    assert set(d["ratios"]["phase3-forkcell"]["128²"]) >= {"forward_s", "train_b1_peak_mib"}
    assert len(d["claims"]) == sum(len(claims.MEASURES.get(c.quantity, [0])) for c in claims.CLAIMS)
    assert {c["verdict"] for c in d["claims"]} == {claims.NOT_MEASURABLE}  # TINY widths: nothing is judged
    report = (out / "report.md").read_text()
    for section in ("## Per image size", "## Against hpcm-base", "## Largest image within 256 MiB",
                    "## Where the time goes (128²)", "## Rate–distortion at equal training",
                    "## The phase design's expected effects, measured", "A smoke run"):
        assert section in report, section
    with pytest.raises(FileExistsError):
        run_study(opts)  # an earlier study's files are kept without force


def test_a_probe_runs_in_a_process_of_its_own():
    from hpcm_triton.progress import StepProgress
    from hpcm_triton.study.run import Runner

    runner = Runner({"isolate": True, "threads": 1}, StepProgress(1, "test"))
    r = runner.run({"task": "probe", "kind": "decode", "variant": "phase2", "size": "tiny", "device": "cpu",
                    "side": 128, "limit": 256 * 2 ** 20})
    assert r["fits"] is True and 0 < r["peak_mib"] < 256, r
    r = runner.run({"task": "no-such-task", "variant": "phase2", "size": "tiny", "device": "cpu"})
    assert r["error"].startswith("worker ended with status 1") and "unknown study task" in r["error"]


def test_a_worker_killed_in_the_training_step_keeps_what_it_measured():
    """The system kills a worker (SIGKILL, as the out-of-memory killer does) once it has begun
    its training step: the forward, compress and decompress numbers stand, and the training
    step is the one measurement recorded as failed."""
    import glob
    import os
    import signal
    import tempfile
    import threading
    import time

    import psutil

    from hpcm_triton.progress import StepProgress
    from hpcm_triton.study.run import Runner

    runner = Runner({"isolate": True, "threads": 1}, StepProgress(1, "test"))
    spec = {"task": "measure", "variant": "hpcm-base", "size": "tiny", "device": "cpu", "resolution": [64, 64],
            "warmup": 1, "repeats": 5, "batch": 1, "memory_limit": None}
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "hpcm-study-*", "result.json")))
    out, killed = {}, []
    worker = threading.Thread(target=lambda: out.update(row=runner.run(spec)))
    worker.start()
    deadline = time.monotonic() + 300
    while worker.is_alive() and not killed and time.monotonic() < deadline:
        for path in set(glob.glob(os.path.join(tempfile.gettempdir(), "hpcm-study-*", "result.json"))) - before:
            try:
                unfinished = json.loads(open(path).read()).get("unfinished")
            except (OSError, ValueError):
                continue
            if unfinished == "train_b1":
                for child in psutil.Process().children():
                    if "hpcm_triton.study.worker" in " ".join(child.cmdline()):
                        child.send_signal(signal.SIGKILL)
                        killed.append(child.pid)
        time.sleep(0.01)
    worker.join(timeout=60)
    assert killed, "the worker never reached its training step"
    row = out["row"]
    assert row["error"] is None and "unfinished" not in row
    for k in ("forward_s", "compress_s", "decompress_s", "forward_peak_mib", "decompress_peak_mib"):
        assert isinstance(row[k], float) and row[k] > 0, k
    assert row["exact_decode"] is True and row["train_b1_s"] is None
    assert row["errors"] == {"train_b1": "worker ended with killed by the system (out of memory?)"}


def test_a_worker_result_without_a_file_is_one_error(tmp_path):
    from hpcm_triton.study.run import read_result

    assert read_result(tmp_path / "none.json", -9, "last line") == {
        "error": "worker ended with killed by the system (out of memory?): last line"}
    (tmp_path / "r.json").write_text(json.dumps({"forward_s": 1.0, "errors": {}, "error": None,
                                                 "unfinished": "compress"}))
    r = read_result(tmp_path / "r.json", 1, "RuntimeError: boom")
    assert r == {"forward_s": 1.0, "error": None, "errors": {"compress": "worker ended with status 1: RuntimeError: boom"}}
