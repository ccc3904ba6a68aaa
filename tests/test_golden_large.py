"""HPCM-Large against the official release on a 256×512 crop of scikit-image's rocket (docs/architecture.md §6
weights), and the machinery that tells "another CPU" from "a bug".

The official code writes different bytes on different CPUs (one float rounds differently, one
symbol's scale index flips). The golden file records a fingerprint of every top-level module
output of the official compress (``hpcm_triton.models.golden``). Where this machine's outputs
equal the recorded ones, the bitstream must be byte-identical and the official strings must
decode to the official image; where they differ in the last bits, the tests say which module
differs first (a ``GoldenMachineWarning``) and require round-trip consistency instead; a
difference larger than float rounding, or in the order or shapes of the calls, fails.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from hpcm_triton import BitstreamError, HPCM_Large, get_model
from hpcm_triton.models import TINY
from hpcm_triton.models.golden import compare_calls, fingerprint, record_calls
from hpcm_triton.models.seeded import checksum, seeded_init_

GOLDEN = Path(__file__).parent / "data" / "hpcm_large_rocket256x512_slim.pt"
pytestmark = pytest.mark.usefixtures("one_thread")  # measured: 1 thread is ~2× faster than 2 on the shared CI box


class GoldenMachineWarning(UserWarning):
    """This machine computes different last bits from the machine that made a golden file."""


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture(scope="module")
def run(golden):
    model = seeded_init_(HPCM_Large()).eval()
    s, s2 = checksum(model)
    assert s == pytest.approx(golden["checksum"][0], rel=1e-7) and s2 == pytest.approx(golden["checksum"][1], rel=1e-7)
    model.update(golden["scale_table"], force=True)
    x = golden["input_uint8"].float().div(255).unsqueeze(0)
    with record_calls(model) as calls:
        enc = model.compress(x)
    cmp = compare_calls(calls, golden["compress_call_fingerprints"])
    return model, x, enc, cmp


def test_large_state_dict_is_official(golden):
    with torch.device("meta"):
        own = {k: list(v.shape) for k, v in HPCM_Large().state_dict().items()}
    assert own == {k: list(v) for k, v in golden["state_dict_shapes"].items()}


def test_large_module_calls_match_or_differ_only_in_last_bits(run, golden):
    *_, cmp = run
    assert cmp.n_calls == 25
    assert cmp.structure_error is None, cmp.report()
    # The first output that differs may differ only by float rounding; later ones inherit it.
    assert cmp.last_bits, cmp.report()


def test_large_bytes_identical_where_the_numbers_are(run, golden):
    model, x, enc, cmp = run
    assert list(enc["shape"]) == list(golden["shape"]) and enc["image_size"] == (256, 512)
    same_bytes = enc["strings"][1][0] == golden["strings"][1] and enc["strings"][0][0] == golden["strings"][0]
    if cmp.identical:
        assert enc["strings"][1][0] == golden["strings"][1], "z stream differs from the official coder"
        assert enc["strings"][0][0] == golden["strings"][0], "y stream differs from the official coder"
        return
    assert cmp.structure_error is None and cmp.last_bits, cmp.report()
    outcome = ("the bytes came out identical anyway, but byte identity is not required here" if same_bytes else
               "the bytes differ, as they may on such a machine")
    warnings.warn(GoldenMachineWarning(
        f"HPCM-Large golden: {cmp.report()}; so only round-trip consistency is required; {outcome}"))
    with torch.no_grad():
        ref = model(x)["x_hat"].clamp(0, 1)
    assert torch.equal(model.decompress(enc)["x_hat"], ref)


def test_large_decodes_the_official_strings(run, golden):
    model, _, _, cmp = run
    strings = [[golden["strings"][0]], [golden["strings"][1]]]
    if not cmp.identical:
        # Entropy parameters computed here differ in the last bits: a scale index may flip, and
        # the official strings may then not decode (or decode differently). Report only.
        try:
            x_hat = model.decompress(strings, golden["shape"])["x_hat"]
            diff = int((x_hat.mul(255).round().to(torch.uint8).int()
                        - golden["x_hat_decompress_uint8"][None].int()).abs().max())
            msg = f"decoded, max 8-bit difference {diff}"
        except BitstreamError as e:
            msg = f"not decodable here ({e})"
        warnings.warn(GoldenMachineWarning(f"HPCM-Large golden strings on this machine: {msg}"))
        return
    x_hat = model.decompress(strings, golden["shape"])["x_hat"]
    fp = golden["x_hat_decompress_fingerprint"]
    torch.testing.assert_close(x_hat.reshape(-1)[fp["index"]], fp["values"], rtol=0, atol=1e-5)
    # g_s is not fingerprinted: its last bits may still move a value across an 8-bit rounding edge.
    q = x_hat.mul(255).round().clamp(0, 255).to(torch.uint8)[0].int()
    assert int((q - golden["x_hat_decompress_uint8"].int()).abs().max()) <= 1


# ---------------------------------------------------------------- the comparison itself (TINY, fast)
@pytest.fixture(scope="module")
def tiny_calls():
    m = seeded_init_(get_model("hpcm-base", **TINY)).eval()
    m.update()
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    with record_calls(m) as calls:
        m.compress(x)
    return calls


def test_compare_calls_identical(tiny_calls):
    rec = [(n, fingerprint(t)) for n, t in tiny_calls]
    cmp = compare_calls(tiny_calls, rec)
    assert cmp.identical and cmp.n_calls == 25 and "bit-identical" in cmp.report()
    assert [n for n, _ in tiny_calls][:6] == ["g_a", "h_a", "h_s", "y_spatial_prior_s1_s2", "attn_s1", "context_net.0"]


def _perturbed(calls, i, delta):
    rec = []
    for j, (n, t) in enumerate(calls):
        if j == i:
            t = t.clone()
            flat = t.view(-1)
            g = fingerprint(t)["index"]
            flat[g[0]] = flat[g[0]] + delta(flat[g[0]])
        rec.append((n, fingerprint(t)))
    return rec


def test_compare_calls_names_the_first_last_bit_difference(tiny_calls):
    # One ulp in one value of the 4th call: what another CPU does.
    rec = _perturbed(tiny_calls, 3, lambda v: torch.nextafter(v, v + 1) - v)
    cmp = compare_calls(tiny_calls, rec)
    assert not cmp.identical and cmp.first_diff == 3 and cmp.first_diff_name == "y_spatial_prior_s1_s2"
    assert cmp.last_bits and "last bits" in cmp.report() and "call 3 (y_spatial_prior_s1_s2)" in cmp.report()


def test_compare_calls_flags_real_differences(tiny_calls):
    cmp = compare_calls(tiny_calls, _perturbed(tiny_calls, 7, lambda v: torch.tensor(0.05)))
    assert cmp.first_diff == 7 and not cmp.last_bits and "more than float rounding" in cmp.report()
    rec = [(n, fingerprint(t)) for n, t in tiny_calls]
    assert "structure" in compare_calls(tiny_calls[:-1], rec).report()
    bad_shape = rec[:2] + [("h_s", fingerprint(tiny_calls[2][1][..., :1]))] + rec[3:]
    assert "shape" in compare_calls(tiny_calls, bad_shape).structure_error
