"""Training: designed initialisation, streamed data, exact resume, 2 Gloo processes = 1 process,
validation and best.pt, export, official starts, mixed precision, and one-line errors.
TINY widths, 128² crops, a few steps each."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpcm_triton import HPCM, HPCM_Phase2, HPCM_Phase3, cli, get_model
from hpcm_triton import images as im
from hpcm_triton.models.seeded import seeded_model
from hpcm_triton.models.zoo import load_checkpoint
from hpcm_triton.training.loop import rd_loss
from hpcm_triton.training import data as D
from hpcm_triton.training.loop import Precision, build_model, train

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
FAST = dict(model="phase3", size="tiny", batch_size=2, crop=128, workers=0, val_every=0, log_every=1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder (with a subfolder) of three 160×200 crops of bundled photos, one 50×50 image and
    one unreadable .png."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    c, a = im.bundled("chelsea"), im.bundled("astronaut")
    im.save_image(c[..., :160, :200], root / "a.png")
    im.save_image(c[..., 120:280, 200:400], root / "sub" / "b.png")
    im.save_image(a[..., 100:260, 150:350], root / "c.jpg")
    im.save_image(a[..., :50, :50], root / "small.png")
    (root / "junk.png").write_bytes(b"not an image")
    return root


def _lines(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines()]


def test_designed_initialisation_not_the_golden_rule():
    model, report = build_model({"model": "phase4", "size": "tiny", "seed": 0, "init_official": None})
    assert report["init"] == "designed"
    n_ln = n_gamma = n_shift = n_decay = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
            n_ln += 1
        if hasattr(m, "gamma1"):
            assert torch.equal(m.gamma1, torch.ones_like(m.gamma1)) and torch.equal(m.gamma2, torch.ones_like(m.gamma2))
            n_gamma += 1
        if type(m).__name__ == "OmniShift":
            assert m.alpha.tolist() == [1.0, 0.0, 0.0, 0.0]
            n_shift += 1
        if type(m).__name__ == "SpatialMix":
            assert torch.equal(m.decay.detach(), torch.linspace(0.0, 8.0, m.dim)) and not m.boost.any()
            n_decay += 1
    assert n_ln > 10 and n_gamma > 5 and n_shift > 10 and n_decay > 5
    # the same seed builds the same model; the golden rule gives negative LayerNorm gains
    again, _ = build_model({"model": "phase4", "size": "tiny", "seed": 0, "init_official": None})
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    seeded = seeded_model("phase4", "tiny")
    assert (seeded.attn_s1.ln_q.weight < 0).any()


def test_data_stream_is_a_function_of_seed_and_position(photos):
    sc = D.scan(photos, min_side=128)
    assert len(sc.sources) == 3 and len(sc.too_small) == 1 and len(sc.unreadable) == 1
    assert "smaller than the crop skipped" in sc.summary() and "unreadable" in sc.summary()
    ds, ds2 = D.CropStream(sc.sources, 128, seed=5), D.CropStream(sc.sources, 128, seed=5)
    assert torch.equal(ds[7], ds2[7]) and ds[7].shape == (3, 128, 128)
    assert not torch.equal(ds[7], D.CropStream(sc.sources, 128, seed=6)[7])
    # every epoch visits every image once
    assert sorted(ds.locate(p)[1] for p in range(3, 6)) == [0, 1, 2]
    # two ranks together cover exactly one process's positions, in order
    s0, s1, s = D.StreamSampler(4, 2, 0, 2), D.StreamSampler(4, 2, 1, 2), D.StreamSampler(4, 2)
    assert s0.positions(2) + s1.positions(2) == s.positions(2) == [8, 9, 10, 11]


def test_resume_is_exact_with_workers_and_scheduler(tmp_path, photos):
    common = dict(FAST, data=str(photos), workers=1, checkpoint_every=2, milestones=[3], gamma=0.5)
    straight = train(tmp_path / "s", steps=4, **common)
    part = train(tmp_path / "r", steps=2, **common)
    resumed = train(tmp_path / "r", resume=True, steps=4)
    assert part["history"]["loss"] + resumed["history"]["loss"] == straight["history"]["loss"]  # bit for bit
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the schedule ran across the resume, and the log was appended, never rewritten
    recs = [r for r in _lines(tmp_path / "r" / "log.jsonl") if r["event"] == "train"]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [r["lr"]["base"] for r in recs] == [1e-4, 1e-4, 5e-5, 5e-5]
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4 and ck["position"] == 8 and ck["run"]["milestones"] == [3]
    assert {"optimizer", "scheduler", "scaler", "rng", "config"} <= set(ck) and len(ck["rng"]["cpu"]) == 1
    start = _lines(tmp_path / "r" / "log.jsonl")[0]
    assert start["too_small"] == 1 and start["unreadable"] == 1


def test_two_gloo_processes_equal_one(tmp_path, photos):
    args = ["train", "--model", "phase3", "--size", "tiny", "--steps", "3", "--batch-size", "2", "--crop", "128",
            "--workers", "0", "--val-every", "0", "--log-every", "1", "--seed", "3", "--data", str(photos)]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         "-m", "hpcm_triton", *args, "--out", str(tmp_path / "k2")],
                        capture_output=True, text=True, env=ENV, timeout=400)
    assert r2.returncode == 0, r2.stderr[-3000:]
    one = train(tmp_path / "k1", steps=3, seed=3, data=str(photos), **FAST)
    two = torch.load(tmp_path / "k2" / "checkpoint.pt", weights_only=True)
    assert two["world_size"] == 2 and len(two["rng"]["cpu"]) == 2
    a = one["model"].state_dict()
    worst = max((a[k] - two["state_dict"][k]).abs().max().item()
                for k in a if a[k].is_floating_point() and a[k].numel())
    init, _ = build_model({"model": "phase3", "size": "tiny", "seed": 3, "init_official": None})
    moved = max((a[k] - v).abs().max().item() for k, v in init.state_dict().items()
                if v.is_floating_point() and v.numel() and "decay" not in k)
    assert worst < 1e-5 < moved, (worst, moved)  # equal up to reduction order, and training did move them
    # rank 0 alone wrote the log: one line per step
    steps = [r["step"] for r in _lines(tmp_path / "k2" / "log.jsonl") if r["event"] == "train"]
    assert steps == [1, 2, 3]


def test_validation_best_and_export(tmp_path, photos):
    train(tmp_path / "v", steps=2, val_every=1, val=str(photos), data=str(photos), checkpoint_every=5,
          **{k: v for k, v in FAST.items() if k not in ("val_every",)})
    vals = [r for r in _lines(tmp_path / "v" / "log.jsonl") if r["event"] == "val"]
    assert [v["step"] for v in vals] == [0, 1, 2] and vals[0]["images"] == 3
    for v in vals:  # real bytes: y and z separately, whole bytes per image
        assert v["bpp"] == pytest.approx(v["bpp_y"] + v["bpp_z"]) and v["bpp_z"] > 0 and 0 < v["psnr"] < 60
        assert v["loss"] == pytest.approx(0.0067 * 255 ** 2 * v["mse"] + v["bpp"])
    if importlib.util.find_spec("tensorboard") is not None:  # the optional extra
        assert list((tmp_path / "v" / "tb").glob("events.out.tfevents.*"))
    best = tmp_path / "v" / "best.pt"
    ck = torch.load(best, weights_only=True)
    assert ck["best_val"] == min(v["loss"] for v in vals) and ck["step"] == ck["best_step"]

    out = tmp_path / "model.pth"
    args = cli.build_parser().parse_args(["export", str(best), "-o", str(out)])
    assert args.func(args) == 0
    with pytest.raises(FileExistsError, match="--force"):
        args.func(args)
    m = HPCM.from_checkpoint(out)
    assert isinstance(m, HPCM_Phase3) and not m.training and m.quantized_cdf_y.numel()
    loaded, name, _ = load_checkpoint(out, name="phase3")
    assert name == "phase3"
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k
    with pytest.raises(ValueError, match="for model .phase3., not .phase2."):
        HPCM_Phase2.from_checkpoint(out)
    x = im.load_image(photos / "a.png")[..., :128, :128]
    assert m.decompress(m.compress(x))["x_hat"].shape == x.shape


def test_init_official_freeze_and_wrappers(tmp_path, photos):
    base = seeded_model("hpcm-base", "tiny")
    sd = {f"module.{k}": v for k, v in base.state_dict().items() if not k.startswith("adaptive_params_list")}
    official = tmp_path / "official.pth.tar"
    torch.save({"state_dict": sd, "epoch": 3}, official)
    with pytest.warns(UserWarning, match="adaptive_params_list"):
        res = train(tmp_path / "o", steps=2, init_official=str(official), freeze_inherited=1, data=str(photos), **FAST)
    start = _lines(tmp_path / "o" / "log.jsonl")[0]
    assert start["new_modules"] == ["attn_s1", "attn_s2", "attn_s3", "context_net.0", "context_net.1"]
    m = res["model"].state_dict()
    # inherited weights: loaded, then step 1 frozen, step 2 trained
    assert not torch.equal(m["g_a.branch.0.weight"], base.state_dict()["g_a.branch.0.weight"])
    frozen = train(tmp_path / "f", steps=1, init_official=str(official), freeze_inherited=1, data=str(photos),
                   **FAST)["model"]
    fs = frozen.state_dict()
    assert torch.equal(fs["g_a.branch.0.weight"], base.state_dict()["g_a.branch.0.weight"])
    fresh, _ = build_model({"model": "phase3", "size": "tiny", "seed": 0, "init_official": None})
    assert not torch.equal(fs["attn_s1.conv_out.weight"], fresh.attn_s1.conv_out.weight)  # new parts trained


def test_load_checkpoint_official_with_wrappers_and_fallback_name(tmp_path):
    """Official (full-size) HPCM-Base files: {"state_dict": ...} with DataParallel prefixes, named
    by --model (name=) or by the command's default (fallback_name=)."""
    torch.manual_seed(0)
    sd = get_model("hpcm-base").state_dict()
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    model, name, _ = load_checkpoint(path, fallback_name="hpcm-base")
    assert name == "hpcm-base" and torch.equal(model.g_a.branch[0].weight, sd["g_a.branch.0.weight"])
    with pytest.raises(ValueError, match="pass --model"):
        load_checkpoint(path)


def test_amp_bf16_keeps_the_rate_in_float32():
    """Precision's bf16 autocast of the transforms and RWKV blocks hands float32 to the
    quantisation and the rate (every wrapped module returns float32) and moves the estimated
    bpp by < 1 % at the same weights. Autocasting the whole forward instead hands them
    bfloat16 (g_a's latent, h_s's scales); how far that moves the rate depends on the CPU's
    bf16 arithmetic (0.07 % on an AMD EPYC with avx512_bf16, more on other CPUs), so the
    negative control checks the dtypes, not the rate."""
    x = im.bundled("chelsea")[..., :256, :256].contiguous()
    m = seeded_model("phase3", "tiny", rule="golden")  # weights with a non-trivial rate
    seen = {}

    def watch(names):
        for n in names:
            m.get_submodule(n).register_forward_hook(
                lambda mod, args, out, n=n: seen.setdefault(n, set()).add(out.dtype))

    watch(["g_a", "h_s"])
    with torch.no_grad():
        ref = float(rd_loss(m(x), x, 0.0067)["bpp"])
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x)
        plain = dict(seen)
        precision = Precision("cpu", "bf16", False).install(m)
        watch([n for n in precision.wrapped if n not in ("g_a", "h_s")])
        seen.clear()
        amp = float(rd_loss(m(x), x, 0.0067)["bpp"])
    assert abs(amp / ref - 1) < 0.01, (ref, amp)
    assert {n.split(".")[0] for n in precision.wrapped} == {"g_a", "g_s", "h_a", "h_s",
                                                            *m.config.rwkv_modules}
    assert set(seen) == set(precision.wrapped), (seen, precision.wrapped)
    assert all(d == {torch.float32} for d in seen.values()), seen
    assert plain["g_a"] == plain["h_s"] == {torch.bfloat16}, plain


def test_amp_and_checkpointing_train_step(tmp_path, photos):
    res = train(tmp_path / "a", steps=1, amp="bf16", grad_checkpointing=True, data=str(photos), **FAST)
    assert res["skipped"] == 0 and res["last"]["loss"] > 0
    assert all(m.use_checkpoint for m in res["model"].modules() if type(m).__name__ == "RWKVContextCell")


def _error(capsys, *args) -> str:
    assert cli.main(list(map(str, args))) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hpcm-triton: error: ") and "Traceback" not in err, err
    return lines[0]


def test_errors_are_one_line(tmp_path, photos, capsys):
    t = ["train", "--size", "tiny", "--out", tmp_path / "run", "--data", photos, "--val-every", "0"]
    assert "--batch-size must be" in _error(capsys, *t, "--batch-size", "0")
    assert "--checkpoint-every must be" in _error(capsys, *t, "--checkpoint-every", "0")
    assert "--lmbda must be > 0" in _error(capsys, *t, "--lmbda", "0")
    assert "--crop must be ≥ 64" in _error(capsys, *t, "--crop", "32")
    assert "--steps must be" in _error(capsys, *t, "--steps", "0")
    assert "--milestones" in _error(capsys, *t, "--milestones", "5,2")
    assert "--amp fp16 needs a CUDA device" in _error(capsys, *t, "--amp", "fp16")
    assert "--freeze-inherited needs --init-official" in _error(capsys, *t, "--freeze-inherited", "3")
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in _error(capsys, *t, "--device", "cuda")
    assert "does not exist" in _error(capsys, *t[:-4], "--data", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "no image files" in _error(capsys, *t[:-4], "--data", tmp_path / "empty")
    assert "no usable training images" in _error(capsys, *t, "--crop", "512")
    assert "no checkpoint to resume" in _error(capsys, *t, "--resume")
    with pytest.raises(SystemExit):
        cli.main(["train", "--model", "phase9"])
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_refuses_to_overwrite_a_run_and_to_change_lambda(tmp_path, photos, capsys):
    t = ["train", "--size", "tiny", "--out", tmp_path / "run", "--data", photos, "--val-every", "0", "--crop", "128",
         "--batch-size", "1", "--workers", "0", "--checkpoint-every", "1"]
    assert cli.main(list(map(str, t + ["--steps", "1"]))) == 0
    assert "step 1: loss" in capsys.readouterr().out  # plain progress lines when stdout is not a terminal
    assert "already holds a run" in _error(capsys, *t, "--steps", "2")
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 1
    assert "--override" in _error(capsys, *t, "--steps", "2", "--resume", "--lmbda", "0.013")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"module.g_a.branch.0.weight": torch.zeros(3)}}, other)
    assert "does not fit" in _error(capsys, *t, "--init-official", other, "--force")
    # an explicit --lr on resume takes effect and is logged
    assert cli.main(list(map(str, ["train", "--out", tmp_path / "run", "--resume", "--steps", "2",
                                   "--lr", "3e-4"]))) == 0
    recs = _lines(tmp_path / "run" / "log.jsonl")
    assert recs[-2]["event"] == "train" and recs[-2]["lr"]["base"] == 3e-4
    assert any("learning rates set" in n for n in [r for r in recs if r["event"] == "resume"][0]["notes"])


def test_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch, photos):
    from hpcm_triton.training import loop

    real, calls = loop.rd_loss, []

    def poisoned(out, x, lmbda, metric="mse"):
        t = real(out, x, lmbda, metric)
        calls.append(1)
        if len(calls) == 2:
            t["loss"] = t["loss"] * float("nan")
        return t

    monkeypatch.setattr(loop, "rd_loss", poisoned)
    res = train(tmp_path / "n", steps=2, data=str(photos), **FAST)
    monkeypatch.setattr(loop, "rd_loss", real)
    assert res["skipped"] == 1 and math.isnan(res["history"]["loss"][1])
    one = train(tmp_path / "one", steps=1, data=str(photos), **FAST)["model"].state_dict()
    assert all(torch.equal(v, one[k]) for k, v in res["model"].state_dict().items())  # no update at step 2


def test_ms_ssim_metric_step(tmp_path):
    res = train(tmp_path / "m", steps=1, metric="ms-ssim", lmbda=8.73, data="bundled",
                **{**FAST, "crop": 192, "batch_size": 1})
    assert res["skipped"] == 0 and math.isfinite(res["last"]["loss"])
    with pytest.raises(ValueError, match="crop > 160"):
        train(tmp_path / "m2", steps=1, metric="ms-ssim", **FAST)
