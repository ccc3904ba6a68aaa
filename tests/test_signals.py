"""Interrupts end the whole command, and the decode worker never outlives it (real signals)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from hpcm_triton import bitstream
from hpcm_triton import images as im
from hpcm_triton.models.seeded import seeded_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """A 1024² image with TINY widths: its decode keeps the worker busy for seconds."""
    path = tmp_path_factory.mktemp("big") / "big.hpcm"
    model = seeded_model("phase2", "tiny")
    x = F.interpolate(im.bundled("astronaut"), size=(1024, 1024), mode="bilinear", align_corners=False)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bitstream.write(path, "phase2", model, model.compress(x.clamp(0, 1).contiguous()))
    finally:
        torch.set_num_threads(old)
    return path


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start_decode(big_file, out):
    p = subprocess.Popen([sys.executable, "-m", "hpcm_triton", "decompress", str(big_file), "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        kids = _children(p.pid)
        if kids and p.poll() is None:
            time.sleep(0.3)  # let it get into the decode
            kids = [k for k in _children(p.pid) if _alive(k)]
            if kids:
                return p, kids
        if p.poll() is not None:
            pytest.fail(f"decompress ended before its worker was seen: {p.stderr.read()}")
        time.sleep(0.02)
    p.kill()
    pytest.fail("no decode worker appeared")


def _gone_within(pids, seconds) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(_alive(k) for k in pids):
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_ends_the_whole_command(big_file, tmp_path, sig, code):
    out = tmp_path / "out.png"
    p, workers = _start_decode(big_file, out)
    t0 = time.monotonic()
    os.killpg(p.pid, sig)  # what Ctrl-C does: the whole foreground process group
    try:
        rc = p.wait(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    dt = time.monotonic() - t0
    err = p.stderr.read()
    print(f"{signal.Signals(sig).name}: exit {rc} after {dt:.2f} s")
    assert rc == code, err
    assert dt < 2.0, f"took {dt:.2f} s"  # a second, plus slack for a loaded 2-core CI machine
    assert "Traceback" not in err and err.strip().splitlines() == ["hpcm-triton: interrupted"], err
    assert _gone_within(workers, 2.0), "decode worker outlived the command"
    assert not out.exists() and [f for f in os.listdir(tmp_path) if f.startswith(".out.png")] == []


def test_killing_the_main_process_kills_the_worker(big_file, tmp_path):
    p, workers = _start_decode(big_file, tmp_path / "out.png")
    os.kill(p.pid, signal.SIGKILL)  # no handler can run: the worker must die with its parent
    p.wait(timeout=30)
    try:
        assert _gone_within(workers, 2.0), "orphaned decode worker"
    finally:
        for k in workers:
            if _alive(k):
                os.kill(k, signal.SIGKILL)
