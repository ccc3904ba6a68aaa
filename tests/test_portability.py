"""Portable .hpcm files (docs/bitstream.md): machine-independent tables and demo weights, the
per-step index checks and the search that repairs flipped indexes, older formats decoded the old
way, and a few cross-environment encode → decode pairs in subprocesses (the full matrix is
``python bench/bench_portability.py matrix``)."""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcm_triton import bitstream
from hpcm_triton import images as im
from hpcm_triton.entropy import checks
from hpcm_triton.entropy.coder import ParameterMismatchError
from hpcm_triton.entropy.ggm import default_scale_table
from hpcm_triton.models.coding import perturbed_decoding
from hpcm_triton.models.seeded import seeded_model

DATA = Path(__file__).parent / "data"
BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_portability.py"
BOUNDARIES = default_scale_table()[:-1].numpy()


def _bench():
    spec = importlib.util.spec_from_file_location("bench_portability", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _indexes(scales):
    return (scales[:, None] > BOUNDARIES[None, :].astype(np.float64)).sum(1)


# ---------------------------------------------------------------- the check and the search
def test_check_depends_on_every_index_and_on_the_step():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 60, 5000)
    h = checks.index_check(idx, 3)
    assert 0 <= h >> 32 < checks.Q1 and 0 <= h & 0xFFFFFFFF < checks.Q2
    assert checks.index_check(idx, 4) != h
    for p in (0, 1, 2500, 4999):
        other = idx.copy()
        other[p] += 1 if other[p] < 59 else -1
        assert checks.index_check(other, 3) != h
    with pytest.raises(ValueError):
        checks.index_check(np.array([-1]), 0)


def _planted(n_flips, seed, n=4000):
    """Decoder-side scales and indexes, and the encoder's check after ``n_flips`` of the
    positions nearest a boundary flipped (spread over the nearest 40)."""
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.uniform(math.log(0.1), math.log(70), n))
    idx = _indexes(scales)
    pos, alt = checks.flip_candidates(scales, BOUNDARIES, idx, 40)
    chosen = rng.choice(40, n_flips, replace=False)
    enc = idx.copy()
    enc[pos[chosen]] = alt[chosen]
    return scales, idx, enc


@pytest.mark.parametrize("n_flips", [1, 2, 3, 4, 5, 6])
def test_search_repairs_planted_flips(n_flips):
    scales, idx, enc = _planted(n_flips, seed=n_flips)
    pos, alt = checks.flip_candidates(scales, BOUNDARIES, idx)
    assert np.all(np.abs(alt - idx[pos]) == 1)
    sel = checks.search_flips(idx, 7, checks.index_check(enc, 7), pos, alt)
    assert sel is not None and len(sel) == n_flips
    fixed = idx.copy()
    fixed[pos[sel]] = alt[sel]
    assert np.array_equal(fixed, enc)


def test_search_gives_up_beyond_its_budget():
    scales, idx, enc = _planted(checks.MAX_FLIPS + 1, seed=11)
    pos, alt = checks.flip_candidates(scales, BOUNDARIES, idx)
    assert checks.search_flips(idx, 0, checks.index_check(enc, 0), pos, alt) is None
    # one flip, but far from any boundary: not among the candidates
    enc = idx.copy()
    far = int(np.argmax(np.abs(np.log(scales[:, None]) - np.log(BOUNDARIES)[None]).min(1)))
    enc[far] += 1
    assert checks.search_flips(idx, 0, checks.index_check(enc, 0), pos, alt) is None


def test_false_match_probability_is_designed():
    assert checks.search_size() == sum(math.comb(checks.CANDIDATES, k) for k in range(1, checks.MAX_FLIPS + 1))
    assert checks.search_size() < 2 ** 27
    assert checks.false_match_bound() < 2e-11  # per searched step (docs/bitstream.md §4)


# ---------------------------------------------------------------- the decoder
@pytest.fixture(scope="module")
def tiny_file():
    torch.set_num_threads(1)
    model = seeded_model("phase3", "tiny")
    x = im.bundled("chelsea")[..., 60:188, 100:292].contiguous()
    data = bitstream.to_bytes("phase3", model, model.compress(x))
    ref = bitstream.decode(io.BytesIO(data), model, "phase3")
    return model, data, ref


def test_decoder_repairs_perturbed_entropy_parameters(tiny_file):
    model, data, ref = tiny_file
    info = bitstream.from_bytes(data)
    assert info["version"] == 3
    with perturbed_decoding(model, 1e-3, seed=3):
        out = bitstream.decompress(info, model, details=True)
    assert out["flips_total"] > 0 and len(out["flips"][0]) == 11
    assert "repaired" in bitstream.describe_flips(out["flips"])
    assert (im.to_uint8(out["x_hat"]).int() - im.to_uint8(ref).int()).abs().max() <= 1
    # the hook is gone after the block
    assert model.decoder_param_hook is None
    assert bitstream.decompress(info, model, details=True)["flips_total"] == 0


def test_unrepairable_step_fails_clearly(tiny_file):
    model, data, _ = tiny_file
    info = bitstream.from_bytes(data)
    with perturbed_decoding(model, 0.05, seed=0), pytest.raises(ParameterMismatchError) as e:
        bitstream.decompress(info, model)
    assert "search budget exhausted" in str(e.value) and "coding step" in str(e.value)


# ---------------------------------------------------------------- older formats and table authority
def test_version2_file_decodes_the_old_way():
    """A file written by format 2's writer (the golden rule's seeded weights, 1 thread, 16-bit
    step CRCs) decodes with today's demo model, which check() reseeds by the golden rule."""
    data = (DATA / "phase3_tiny_v2.hpcm").read_bytes()
    info = bitstream.from_bytes(data)
    assert info["version"] == 2 and info["threads"] == 1
    model = seeded_model("phase3", "tiny")
    assert model.seeded_rule == "portable"
    bitstream.check(info, model, "phase3")
    assert model.seeded_rule == "golden"
    x_hat = bitstream.decompress(info, model)
    x = im.bundled("chelsea")[..., 60:188, 100:292].contiguous()
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            fwd = model(x)["x_hat"].clamp(0, 1)
    finally:
        torch.set_num_threads(old)
    assert (im.to_uint8(x_hat).int() - im.to_uint8(fwd).int()).abs().max() <= 1


def test_older_files_get_rebuilt_tables_newer_ones_do_not(tiny_file):
    model, data, _ = tiny_file
    other = seeded_model("phase3", "tiny")
    other.quantized_cdf_z = other.quantized_cdf_z.flip(0).contiguous()  # stored tables that differ
    other.cdf_length_z, other.offset_z = other.cdf_length_z.flip(0), other.offset_z.flip(0)
    info = bitstream.from_bytes(data)
    with pytest.raises(bitstream.BitstreamError, match="different weights or CDF tables"):
        bitstream.check(info, other, "phase3")
    assert not torch.equal(other.quantized_cdf_z, model.quantized_cdf_z)  # left as it was
    bitstream.check({**info, "version": 2}, other, "phase3")  # version 2 writers rebuilt tables on loading
    assert torch.equal(other.quantized_cdf_z, model.quantized_cdf_z)


def test_checkpoint_tables_are_authoritative(tmp_path):
    from hpcm_triton.models.zoo import load_checkpoint

    m = seeded_model("hpcm-base", "tiny")
    sd = m.state_dict()
    sd["quantized_cdf_z"] = sd["quantized_cdf_z"].flip(0).contiguous()  # tables no rebuild would give
    ck = {"model": "hpcm-base", "config": dataclasses.asdict(m.config), "state_dict": sd}
    torch.save(ck, tmp_path / "export.pt")
    loaded, _, _ = load_checkpoint(tmp_path / "export.pt")
    assert torch.equal(loaded.quantized_cdf_z, sd["quantized_cdf_z"])
    torch.save({**ck, "optimizer": {}}, tmp_path / "train.pt")  # a training checkpoint: its tables may lag
    loaded, _, _ = load_checkpoint(tmp_path / "train.pt")
    assert torch.equal(loaded.quantized_cdf_z, m.quantized_cdf_z)


# ---------------------------------------------------------------- across environments (subprocesses)
def test_tables_and_demo_weights_are_the_same_under_every_instruction_set():
    b = _bench()
    job = [{"op": "tables", "models": [["hpcm-base", "tiny"], ["phase4", "tiny"]]}]
    got = {env: b.run_worker(b.Config(env, t), job)[0]
           for env, t in (("native", 1), ("aten-default", 2), ("aten-avx2", 3))}
    assert got["aten-default"]["env"]["cpu"] == "DEFAULT"
    for env, res in got.items():
        for k, v in res.items():
            if "golden" in k or "computed here" in k or k == "env":
                continue  # the official arithmetic and the golden rule may differ; nothing codes with them
            assert v == got["native"][k], f"{k} differs under {env}"
    # the stored y tables are the official arithmetic's result on this machine
    assert got["native"]["y tables (used)"] == got["native"]["y tables (computed here)"]


def test_files_travel_between_environments(tmp_path):
    """Phase 3 at full widths, 256²: written under the scalar ATen kernels with the PyTorch scan,
    read with oneDNN limited to SSE4.1, the C kernels built for x86-64-v2 (no FMA) and 3 threads,
    and the other way round; every step's check matched (after repairs), the symbols re-encode
    to the file, and the pixels are within one level of the encoder's own reconstruction."""
    b = _bench()
    a_cfg, b_cfg = b.Config("aten-default", 1, "torch"), b.Config("kernels-x86-64-v2", 3, "cpu", also="onednn-sse41")
    pairs = [(a_cfg, "astronaut", [b_cfg]), (b_cfg, "coffee", [a_cfg])]
    rows = b.cross_decode(pairs, ["phase3"], 256, tmp_path, log=lambda s: None)
    assert len(rows) == 2
    for r in rows:
        assert r["error"] is None, r
        assert len(r["flips"][0]) == 11 and r["max_level_diff"] <= 1, r
