"""The command line: real files through subprocesses, clear one-line errors, no partial outputs."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from hpcm_triton import bitstream, cli
from hpcm_triton import images as im
from hpcm_triton.models.seeded import seeded_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # 1 thread: robust on a shared 2-core box


def run(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "hpcm_triton", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def _one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("hpcm-triton: error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "small.png"
    im.save_image(im.bundled("chelsea")[..., 60:188, 100:292], p)  # 128×192
    return p


@pytest.fixture(scope="module")
def hpcm_file(png, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "small.hpcm"
    r = run("compress", png, "-o", out, "--model", "phase3", "--size", "tiny")
    assert r.returncode == 0, r.stderr
    assert "bpp" in r.stdout
    return out


def test_compress_decompress_round_trip(hpcm_file, png, tmp_path):
    out = tmp_path / "rec.png"
    r = run("decompress", hpcm_file, "-o", out)
    assert r.returncode == 0, r.stderr
    rec = im.load_image(out)
    # The same decode in this process, from the same file, with an independently built seeded
    # model, at the subprocess's thread count: CPU convolutions round differently with 1 and 2
    # threads (seen: one pixel off by one level in g_s), while ŷ and the bytes are identical.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = seeded_model("phase3", "tiny")
        ref = bitstream.decode(hpcm_file, model, "phase3")
        with torch.no_grad():
            fwd = model(im.load_image(png))["x_hat"].clamp(0, 1)
        again = model.compress(im.load_image(png))
    finally:
        torch.set_num_threads(threads)
    assert rec.shape == (1, 3, 128, 192)
    assert torch.equal(im.to_uint8(rec), im.to_uint8(ref))
    # the file decodes to the eval-mode forward reconstruction of the original, and its
    # payload is what an in-process compress writes
    assert torch.equal(ref, fwd)
    assert bitstream.read(hpcm_file)["strings"] == again["strings"]


def test_missing_input_subprocess(tmp_path):
    out = tmp_path / "x.hpcm"
    r = run("compress", tmp_path / "nope.png", "-o", out, "--size", "tiny")
    assert r.returncode == 2
    assert "no such file" in _one_line_error(r.stderr)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_corrupted_bitstream_subprocess(hpcm_file, tmp_path):
    bad = tmp_path / "bad.hpcm"
    data = bytearray(hpcm_file.read_bytes())
    data[-3] ^= 0xFF
    bad.write_bytes(bytes(data))
    out = tmp_path / "out.png"
    r = run("decompress", bad, "-o", out)
    assert r.returncode == 2
    assert "CRC32" in _one_line_error(r.stderr)
    assert not out.exists()


def _main_error(capsys, *args) -> str:
    rc = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc == 2, err
    return _one_line_error(err)


def test_not_an_image(tmp_path, capsys):
    src = tmp_path / "text.png"
    src.write_text("hello, not a PNG")
    msg = _main_error(capsys, "compress", src, "-o", tmp_path / "o.hpcm", "--size", "tiny")
    assert "not a readable image" in msg
    assert sorted(os.listdir(tmp_path)) == ["text.png"]


def test_too_small_image(tmp_path, capsys):
    src = tmp_path / "tiny.png"
    im.save_image(torch.rand(1, 3, 32, 80), src)
    assert "at least 64" in _main_error(capsys, "compress", src, "-o", tmp_path / "o.hpcm", "--size", "tiny")
    assert not (tmp_path / "o.hpcm").exists()


def test_truncated_and_garbage_bitstreams(hpcm_file, tmp_path, capsys):
    out = tmp_path / "o.png"
    cut = tmp_path / "cut.hpcm"
    cut.write_bytes(hpcm_file.read_bytes()[:-10])
    assert "truncated" in _main_error(capsys, "decompress", cut, "-o", out)
    junk = tmp_path / "junk.hpcm"
    junk.write_bytes(b"\x00" * 100)
    assert "not an HPCM file" in _main_error(capsys, "decompress", junk, "-o", out)
    assert "no such file" in _main_error(capsys, "decompress", tmp_path / "missing.hpcm", "-o", out)
    assert not out.exists()


def test_wrong_model_checkpoint(hpcm_file, tmp_path, capsys):
    # a checkpoint in the training format, for another variant
    ck = tmp_path / "phase2.pt"
    m = seeded_model("phase2", "tiny")
    import dataclasses

    torch.save({"model": "phase2", "config": dataclasses.asdict(m.config), "state_dict": m.state_dict()}, ck)
    out = tmp_path / "o.png"
    msg = _main_error(capsys, "decompress", hpcm_file, "-o", out, "--checkpoint", ck)
    assert "phase2" in msg and "phase3" in msg
    assert not out.exists()
    # compress without --model takes the checkpoint's own model; an explicit other --model is refused
    enc = tmp_path / "p2.hpcm"
    assert cli.main(["compress", "chelsea", "-o", str(enc), "--checkpoint", str(ck)]) == 0
    assert bitstream.read(enc)["model"] == "phase2"
    assert "not 'phase3'" in _main_error(capsys, "compress", "chelsea", "-o", tmp_path / "x.hpcm",
                                         "--checkpoint", ck, "--model", "phase3")
    bad_ck = tmp_path / "bad.pt"
    bad_ck.write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in _main_error(capsys, "decompress", hpcm_file, "-o", out,
                                                      "--checkpoint", bad_ck)


def test_missing_output_dir(png, tmp_path, capsys):
    assert "does not exist" in _main_error(capsys, "compress", png, "-o", tmp_path / "no" / "x.hpcm", "--size",
                                           "tiny")


def test_demo_subprocess(png):
    r = run("demo", "--size", "tiny", "--models", "hpcm-base", "phase3", "--image", png)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "UNTRAINED" in out
    rows = [ln.split() for ln in out.splitlines() if ln.split() and ln.split()[0] in ("hpcm-base", "phase3")]
    assert [row[0] for row in rows] == ["hpcm-base", "phase3"]
    assert all(row[-1] == "yes" for row in rows), out  # exact decode
    for row in rows:
        nbytes, bpp_file = int(row[2].replace(",", "")), float(row[3])
        assert bpp_file == pytest.approx(8 * nbytes / (128 * 192), abs=1e-4)
    # off a terminal, progress is plain lines (a tqdm bar would fill logs with carriage returns)
    assert "\r" not in r.stderr and "variants: 2/2 phase3" in r.stderr


def test_default_command_is_demo():
    args = cli.build_parser().parse_args(["demo"])
    assert args.func is cli.cmd_demo and args.image == "chelsea" and len(args.models) == 6
    with pytest.raises(SystemExit):
        cli.main(["demo", "--models", "nonsense"])


def test_info_tiny(capsys):
    assert cli.main(["info", "--size", "tiny"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.split()}
    assert "none" in lines["hpcm-base"] and "none" in lines["hpcm-large"]
    assert "attn_s3" in lines["phase1"] and "attn_s1" not in lines["phase1"]
    assert "context_net" in lines["phase3"] and "y_spatial_prior_s3" in lines["phase4"]


# ---------------------------------------------------------------- issue 8/9: safe outputs, clear errors, fast answers
def _make_hpcm(png, out, *extra):
    assert cli.main(["compress", str(png), "-o", str(out), "--size", "tiny", "--model", "phase2", *extra]) == 0


def test_compress_never_overwrites_its_input_or_an_existing_file(png, tmp_path, capsys):
    src = tmp_path / "photo.png"
    src.write_bytes(png.read_bytes())
    before = src.read_bytes()
    for force in ([], ["--force"]):
        assert "is the input" in _main_error(capsys, "compress", src, "-o", src, "--size", "tiny", *force)
    link = tmp_path / "link.hpcm"
    link.symlink_to(src)
    hard = tmp_path / "hard.hpcm"
    os.link(src, hard)
    for same in (link, hard):  # the same file through a link, even with --force
        assert "is the input" in _main_error(capsys, "compress", src, "-o", same, "--size", "tiny", "--force")
    assert src.read_bytes() == before
    out = tmp_path / "existing.hpcm"
    out.write_bytes(b"precious")
    assert "already exists" in _main_error(capsys, "compress", src, "-o", out, "--size", "tiny")
    assert out.read_bytes() == b"precious"
    _make_hpcm(src, out, "--force")
    assert out.read_bytes()[:4] == b"HPCM"


def test_decompress_never_overwrites(png, tmp_path, capsys):
    enc = tmp_path / "a.hpcm"
    _make_hpcm(png, enc)
    capsys.readouterr()
    data = enc.read_bytes()
    assert "is the input" in _main_error(capsys, "decompress", enc, "-o", enc, "--force")
    out = tmp_path / "a.png"
    out.write_bytes(b"precious")
    assert "already exists" in _main_error(capsys, "decompress", enc, "-o", out)
    assert out.read_bytes() == b"precious" and enc.read_bytes() == data
    assert cli.main(["decompress", str(enc), "-o", str(out), "--force"]) == 0
    assert im.load_image(out).shape == (1, 3, 128, 192)


def test_demo_keep_and_evaluate_out_never_overwrite(png, tmp_path, capsys):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "small.phase2.hpcm").write_bytes(b"precious")
    assert "already exists" in _main_error(capsys, "demo", "--size", "tiny", "--models", "phase2", "--image", png,
                                           "--keep", keep)
    assert (keep / "small.phase2.hpcm").read_bytes() == b"precious"
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "results.json").write_text("{}")
    assert "already exists" in _main_error(capsys, "evaluate", "--size", "tiny", "--out", ev, "--max-images", "1")
    assert (ev / "results.json").read_text() == "{}"
    assert "is the input" in _main_error(capsys, "evaluate", "--size", "tiny", "--data", ev, "--out", ev, "--force")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu(png, hpcm_file, tmp_path, capsys):
    for args in (("compress", png, "-o", tmp_path / "x.hpcm", "--size", "tiny"),
                 ("decompress", hpcm_file, "-o", tmp_path / "x.png"),
                 ("evaluate", "--size", "tiny", "--out", tmp_path / "ev"),
                 ("demo", "--size", "tiny", "--models", "phase2", "--image", png)):
        assert "no CUDA GPU" in _main_error(capsys, *args, "--device", "cuda")
    assert os.listdir(tmp_path) == []


def test_mistyped_command_directory_and_bad_checkpoint(hpcm_file, tmp_path, capsys):
    assert "unknown command 'compres' (did you mean 'compress'?)" in _main_error(capsys, "compres", "a.png", "-o",
                                                                                 "b.hpcm")
    assert "is a directory" in _main_error(capsys, "decompress", tmp_path, "-o", tmp_path / "o.png")
    # a training-format checkpoint whose state_dict does not fit: load_state_dict raised a RuntimeError
    ck = tmp_path / "broken.pt"
    torch.save({"model": "phase3", "config": dict(M=32, N=32, transform_widths=[16, 24, 32], attention_heads=4),
                "state_dict": {"g_a.nonsense": torch.zeros(1)}}, ck)
    msg = _main_error(capsys, "decompress", hpcm_file, "-o", tmp_path / "o.png", "--checkpoint", ck)
    assert "state_dict does not fit phase3" in msg and "broken.pt" in msg and "\n" not in msg
    assert "no such checkpoint" in _main_error(capsys, "decompress", hpcm_file, "-o", tmp_path / "o.png",
                                               "--checkpoint", tmp_path / "nope.pt")
    assert not (tmp_path / "o.png").exists()
    assert "--threads 0" in _main_error(capsys, "compress", "chelsea", "-o", tmp_path / "t.hpcm", "--threads", "0")


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["compress"])
    assert e.value.code == 2
    assert "required" in _one_line_error(capsys.readouterr().err)


def test_help_shows_every_default_and_meaning():
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction)).choices
    for name in ("demo", "compress", "decompress", "evaluate", "info"):
        sp = subs[name]
        sp.format_help()  # renders
        fmt = sp._get_formatter()
        for a in sp._actions:
            if not a.option_strings or a.dest == "help":
                continue
            assert a.help, f"{name} {a.option_strings}: no help"
            if a.default not in (None, False, cli.argparse.SUPPRESS):
                assert "%(default)" in fmt._get_help_string(a), f"{name} {a.option_strings}: default not shown"
    assert "else phase3" in " ".join(subs["compress"].format_help().split())
    assert "--force" in subs["compress"].format_help() and "--max-pixels" in subs["decompress"].format_help()


def test_fast_answers_import_no_torch(tmp_path):
    """--help, --version, argument errors and a missing file answer without importing torch
    (which takes seconds and ~0.9 GB here)."""
    code = ("import sys, contextlib, io\nfrom hpcm_triton import cli\nfor argv in {argvs!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "        try: cli.main(argv)\n        except SystemExit: pass\n"
            "print('torch' in sys.modules)")
    argvs = [["--help"], ["--version"], ["compress", "--help"], ["compress"], ["compres"],
             ["compress", str(tmp_path / "nope.png"), "-o", str(tmp_path / "o.hpcm")],
             ["decompress", str(tmp_path / "nope.hpcm"), "-o", str(tmp_path / "o.png")]]
    r = subprocess.run([sys.executable, "-c", code.format(argvs=argvs)], capture_output=True, text=True, env=ENV)
    assert r.stdout.strip() == "False", r.stdout + r.stderr
    for args in (["--help"], ["--version"], ["compres"], ["compress", tmp_path / "nope.png", "-o", "x.hpcm"]):
        t0 = time.perf_counter()
        r = run(*args)
        dt = time.perf_counter() - t0
        assert r.returncode in (0, 2) and dt < 2.0, (args, dt)


def test_outputs_honour_the_umask(png, tmp_path):
    enc, dec, keep = tmp_path / "a.hpcm", tmp_path / "a.png", tmp_path / "keep"
    old = os.umask(0o027)
    try:
        for args in (("compress", png, "-o", enc, "--size", "tiny", "--model", "phase2"),
                     ("decompress", enc, "-o", dec),
                     ("demo", "--size", "tiny", "--models", "phase2", "--image", png, "--keep", keep)):
            assert cli.main([str(a) for a in args]) == 0
    finally:
        os.umask(old)
    for p in (enc, dec, keep / "small.phase2.hpcm"):
        assert oct(p.stat().st_mode & 0o777) == oct(0o640), p


def test_info_describes_a_file_without_a_model(hpcm_file, capsys, monkeypatch):
    import hpcm_triton.models.zoo as zoo

    monkeypatch.setattr(zoo, "get_model", lambda *a, **k: pytest.fail("info built a model"))
    assert cli.main(["info", str(hpcm_file)]) == 0
    out = capsys.readouterr().out
    info = bitstream.read(hpcm_file)
    for s in ("phase3", "128×192", "'M': 32", info["weights_fingerprint"].hex(), info["config_fingerprint"].hex(),
              f"{len(info['strings'][0][0]):,}", "encoder threads"):
        assert s in out, s
