"""Decoding does not depend on the CPU thread count, and a decoder whose floats differ from the
encoder's by more than the repairs cover stops early with a precise error.

What differs (measured on this project's CPU machines, torch 2.14 with oneDNN 3.12 and MKL):
oneDNN's 1×1 convolutions and MKL's GEMMs split their reductions by the number of threads,
so h_s, the context cells and the spatial priors round differently with 1, 2 and 3 threads
(a 16→64-channel 1×1 convolution already differs in the last bit). The encoder records its
thread count in the file as information; any count decodes the same symbols (each coding
step's indexes are checked, flipped ones repaired: docs/bitstream.md §4) and pixels within one
level of the encoder's own reconstruction.
"""
from __future__ import annotations

import time

import pytest
import torch

from hpcm_triton import bitstream
from hpcm_triton import images as im
from hpcm_triton.entropy.coder import BitstreamError, ParameterMismatchError
from hpcm_triton.models.seeded import seeded_model


@pytest.fixture(scope="module")
def astronaut256():
    return im.bundled("astronaut")[..., 128:384, 128:384].contiguous()


def _at(threads, fn, *a, **kw):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return fn(*a, **kw)
    finally:
        torch.set_num_threads(old)


def _levels(x):
    return im.to_uint8(x).int()


@pytest.mark.parametrize("name", ["hpcm-base", "phase3"])
def test_thread_count_does_not_change_the_decode_full_widths(name, astronaut256):
    model = seeded_model(name, "full")
    x = astronaut256
    for enc, decs in ((1, (2, 3)), (2, (1,))):
        comp = _at(enc, model.compress, x)
        info = bitstream.from_bytes(bitstream.to_bytes(name, model, comp))
        assert info["threads"] == enc and info["version"] == 3
        ref = _at(enc, model, x)["x_hat"].clamp(0, 1)  # the encoder's own reconstruction
        for dec in decs:  # the decoder's own count: every step checked (repaired where needed)
            out = _at(dec, bitstream.decompress, info, model, details=True)
            assert len(out["flips"][0]) == 11
            assert (_levels(out["x_hat"]) - _levels(ref)).abs().max() <= 1, f"{name}: {enc} → {dec} threads"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = seeded_model("phase2", "tiny")
    x = im.bundled("chelsea")[..., :128, :192].contiguous()
    return model, bitstream.to_bytes("phase2", model, _at(1, model.compress, x))


def _other_floats(model):
    """The same model with h_s's last bias nudged: the decoder's entropy parameters differ in
    the low bits, as on a machine that rounds differently (fingerprints are not checked)."""
    other = seeded_model("phase2", "tiny")
    with torch.no_grad():
        list(other.h_s.parameters())[-1].add_(0.05)
    return other


def test_other_floats_stop_at_the_first_step_and_name_the_machine(tiny):
    model, data = tiny
    info = bitstream.from_bytes(data)
    info["encoder"] = {**info["encoder"], "device": "cuda", "gpu": "NVIDIA H200"}
    t0 = time.perf_counter()
    with pytest.raises(ParameterMismatchError) as e:
        bitstream.decompress(info, _other_floats(model))
    assert time.perf_counter() - t0 < 30
    msg = str(e.value)
    assert "coding step 1 of 11" in msg  # stopped before decoding the other ten steps
    assert "device: file 'cuda', here 'cpu'" in msg and "NVIDIA H200" in msg
    assert "corrupted" not in msg


def test_other_floats_same_environment(tiny):
    model, data = tiny
    with pytest.raises(ParameterMismatchError, match="environment matches this one"):
        bitstream.decompress(bitstream.from_bytes(data), _other_floats(model))


def test_other_floats_without_checksums_still_end_in_an_error(tiny):
    # a version-1 style stream (no per-step checksums): the re-encode check still refuses it
    model, data = tiny
    info = bitstream.from_bytes(data)
    info["strings"] = [[bytes(s) for s in ss] for ss in info["strings"]]
    t0 = time.perf_counter()
    with pytest.raises(BitstreamError):
        bitstream.decompress(info, _other_floats(model))
    assert time.perf_counter() - t0 < 60


def test_coding_path_chooses_kernels_by_shape_alone(tiny):
    """compress/decompress run under kernels_triton.shape_only_selection() (no timing-based
    autotune choice that an encoder and a decoder could make differently); forward does not."""
    from kernels_triton import ops as kb

    model, _ = tiny
    seen = []
    hook = model.attn_s1.register_forward_hook(lambda *a: seen.append(kb._SHAPE_ONLY))
    try:
        x = im.bundled("chelsea")[..., :128, :128].contiguous()
        comp = _at(1, model.compress, x)
        assert seen and all(seen)
        seen.clear()
        model.decompress(comp)
        assert seen and all(seen)
        seen.clear()
        _at(1, model, x)
        assert seen and not any(seen)
    finally:
        hook.remove()
